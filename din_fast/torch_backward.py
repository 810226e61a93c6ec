"""The torch backend's backward as a plain function, for the custom op.

The custom op (din_fast.ops) runs below autograd, so neither the torch
backend's autograd.Function nor its local autograd of the activations can
run there; this is the chain rule written out, on the packed valid positions,
with the same formulas as the fused kernel (its executable specification):
  pooling:        dv_t = sum_c w_ct dout_c,  dw_ct = dout_c . v_t (+ d loss / d w_ct)
  normalization:  None: ds = scale dw;  softmax: ds = scale w (dw - sum_t w dw)
  first layer:    dq = (W_q + W_d)^T dz1 + (W_p^T dz1) * k,
                  dk = (W_k - W_d)^T dz1 + (W_p^T dz1) * q,
                  dW_1 = dz1 against the blocks [q | k | q - k | q * k].
"""

from __future__ import annotations

import torch

from .activations import activate, activation_backward
from .problem import DINProblem, split_first_layer
from .reference import masked_normalize
from .torch_backend import PackedPositions


def torch_din_attention_backward(problem: DINProblem, grad_pooled: torch.Tensor,
                                 grad_scores: torch.Tensor | None = None):
    """Gradients from d loss / d pooled [B, C, Dv] (and d loss / d w [B, C, T]).

    Returns (dq, dk, dv or None, dweights, dbiases, dact_params) as
    din_fast.kernels.din_backward.din_backward does.
    """
    dtype = problem.compute_dtype()
    packed = PackedPositions(problem.valid_mask(),
                             all_valid=problem.lengths is None and problem.mask is None)
    query, keys = problem.query.to(dtype), problem.keys.to(dtype)
    values = problem.value_tensor.to(dtype)
    weights = [w.to(dtype) for w in problem.weights]
    biases = [b.to(dtype) for b in problem.biases]
    layer_params = [tuple(p.to(dtype) for p in params) for params in problem.act_params]

    # Forward recompute, keeping each layer's input and pre-activation.
    w_q, w_k, w_d, w_p = split_first_layer(weights[0])
    k_rows = packed.gather(keys)                                         # [N, D]
    q_rows = packed.expand_rows(query)                                   # [N, C, D]
    first = packed.expand_rows(query @ (w_q + w_d).t() + biases[0]) \
        + (k_rows @ (w_k - w_d).t())[:, None, :] + (q_rows * k_rows[:, None, :]) @ w_p.t()
    pre, inputs = [first], []
    for i, (w, b) in enumerate(zip(weights[1:], biases[1:])):
        inputs.append(activate(pre[-1], problem.activation, layer_params[i], problem.dice_eps))
        pre.append(inputs[-1] @ w.t() + b)
    scores = packed.scatter(pre.pop().squeeze(-1)).transpose(1, 2)      # [B, C, T]
    attn = masked_normalize(scores, packed.valid, problem.normalization, problem.scale)

    # Pooling and normalization.
    grad_pooled = grad_pooled.to(dtype)
    dv = attn.transpose(1, 2) @ grad_pooled                              # [B, T, Dv]
    dw = grad_pooled @ values.transpose(1, 2)                            # [B, C, T]
    if grad_scores is not None:
        dw = dw + grad_scores.to(dtype)
    if problem.normalization == "softmax":
        ds = problem.scale * attn * (dw - (attn * dw).sum(-1, keepdim=True))
    else:
        ds = problem.scale * dw * packed.valid[:, None, :]
    grad = packed.gather(ds.transpose(1, 2))[..., None]                  # [N, C, 1]

    # The MLP, output layer first.
    dweights, dbiases, dact = [], [], []
    for i in reversed(range(len(inputs))):
        dweights.append(torch.einsum("nco,nci->oi", grad, inputs[i]))
        dbiases.append(grad.sum((0, 1)))
        grad, param_grads = activation_backward(pre[i], grad @ weights[i + 1],
                                                problem.activation, layer_params[i],
                                                problem.dice_eps)
        dact.append(param_grads)

    # The first layer through the fold.
    dw_q = torch.einsum("nch,ncd->hd", grad, q_rows)
    dw_k = torch.einsum("nch,nd->hd", grad, k_rows)
    dw_p = torch.einsum("nch,ncd->hd", grad, q_rows * k_rows[:, None, :])
    dweights.append(torch.cat([dw_q, dw_k, dw_q - dw_k, dw_p], dim=1))
    dbiases.append(grad.sum((0, 1)))
    through_p = grad @ w_p                                               # [N, C, D]
    dq = packed.sum_rows(grad @ (w_q + w_d) + through_p * k_rows[:, None, :])
    dk = packed.scatter((grad @ (w_k - w_d) + through_p * q_rows).sum(1))
    if problem.values is None:
        dk = dk + dv
    for listed in (dweights, dbiases, dact):
        listed.reverse()

    keys_dtype = problem.keys.dtype
    return (
        dq.to(keys_dtype), dk.to(keys_dtype),
        None if problem.values is None else dv.to(keys_dtype),
        [d.to(w.dtype) for d, w in zip(dweights, problem.weights)],
        [d.to(b.dtype) for d, b in zip(dbiases, problem.biases)],
        [tuple(d.to(p.dtype) for d, p in zip(grads, params))
         for grads, params in zip(dact, problem.act_params)],
    )
