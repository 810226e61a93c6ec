"""The hand-written backward of the torch backend: the gradients of every input.

The custom op (din_fast.ops) needs a backward that runs below autograd, so it
cannot re-enter autograd; this is the chain rule written out, on the packed
valid positions, with the same formulas as the fused kernel (which makes it
the kernel's executable specification):
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
from .torch_backend import attention_weights, packed_first_layer, packed_positions, unpack


def torch_din_attention_backward(problem: DINProblem, grad_pooled: torch.Tensor,
                                 grad_scores: torch.Tensor | None = None):
    """Gradients from d loss / d pooled [B, C, Dv] (and d loss / d w [B, C, T]).

    Returns (dq, dk, dv or None, dweights, dbiases, dact_params) as
    din_fast.kernels.din_backward.din_backward does.
    """
    dtype = problem.compute_dtype()
    batch, length = problem.keys.shape[:2]
    candidates = problem.query.shape[1]
    values = problem.value_tensor.to(dtype)
    positions = packed_positions(problem)

    # Forward recompute, keeping each layer's input and pre-activation.
    first_layer, q_rows, packed_keys = packed_first_layer(problem, positions, dtype)
    layer_params = [tuple(p.to(dtype) for p in params) for params in problem.act_params]
    pre, inputs = [first_layer], []
    for i, (w, b) in enumerate(zip(problem.weights[1:], problem.biases[1:])):
        inputs.append(activate(pre[-1], problem.activation, layer_params[i], problem.dice_eps))
        pre.append(inputs[-1] @ w.to(dtype).t() + b.to(dtype))
    scores = pre.pop().squeeze(-1)                                       # [N, C]
    weights = attention_weights(problem, scores, positions)              # [B, C, T]

    # Pooling and normalization.
    grad_pooled = grad_pooled.to(dtype)
    dv = weights.transpose(1, 2) @ grad_pooled                           # [B, T, Dv]
    dw = grad_pooled @ values.transpose(1, 2)                            # [B, C, T]
    if grad_scores is not None:
        dw = dw + grad_scores.to(dtype)
    if problem.normalization == "softmax":
        ds = problem.scale * weights * (dw - (weights * dw).sum(-1, keepdim=True))
    else:
        ds = problem.scale * dw * problem.valid_mask()[:, None, :]
    ds = ds.transpose(1, 2)                                              # [B, T, C]
    ds = ds.reshape(batch * length, candidates) if positions is None else ds[positions]

    # The MLP, output layer first.
    dweights, dbiases, dact = [], [], []
    grad = ds[..., None]
    for i in reversed(range(len(inputs))):
        dweights.append(torch.einsum("nco,nci->oi", grad, inputs[i]))
        dbiases.append(grad.sum((0, 1)))
        grad = grad @ problem.weights[i + 1].to(dtype)
        grad, param_grads = activation_backward(pre[i], grad, problem.activation,
                                                layer_params[i], problem.dice_eps)
        dact.append(param_grads)

    # The first layer through the fold.
    w_q, w_k, w_d, w_p = split_first_layer(problem.weights[0].to(dtype))
    dw_q = torch.einsum("nch,ncd->hd", grad, q_rows)
    dw_k = torch.einsum("nch,nd->hd", grad, packed_keys)
    dw_p = torch.einsum("nch,ncd->hd", grad, q_rows * packed_keys[:, None, :])
    dweights.append(torch.cat([dw_q, dw_k, dw_q - dw_k, dw_p], dim=1))
    dbiases.append(grad.sum((0, 1)))
    through_p = grad @ w_p                                               # [N, C, D]
    dq_rows = grad @ (w_q + w_d) + through_p * packed_keys[:, None, :]
    dk_rows = (grad @ (w_k - w_d) + through_p * q_rows).sum(1)
    if positions is None:
        dq = dq_rows.view(batch, length, candidates, -1).sum(1)
    else:
        dq = torch.zeros_like(problem.query, dtype=dtype).index_add_(0, positions[0], dq_rows)
    dk = unpack(dk_rows, positions, batch, length)
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
