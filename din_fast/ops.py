"""din_attention as torch.library custom ops, so that torch.compile sees one opaque op.

The torch backend packs the valid positions with nonzero() (a data-dependent
shape) and the triton backend launches kernels: neither traces. Wrapped as
custom ops with flat tensor arguments, a fake (meta) implementation and a
registered autograd formula, both compile with fullgraph=True.

- ``din_fast::attention_forward``: (pooled [B, C, Dv], scores [B, C, T] or an
  empty tensor, row_max, row_sum); for softmax the statistics are the [B, C]
  max / sum of the scaled scores (the fused backward takes the max as its
  exponent offset; the torch backend leaves them zero and recomputes); for
  normalization=None they are empty.
- ``din_fast::attention_backward``: the gradient of every tensor input.

``backend`` picks the implementation: "triton" runs the fused kernels (CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1), "torch" the torch backend
and its hand-written backward, on any device. Weight tiles too large for the
fused backward's on-chip budget (see ``backward_unsupported``: it depends on
the widths and the inputs' dtype) take the torch backward under "triton" too:
correct, but it stores per-position activations.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .problem import DINProblem
from .torch_backend import torch_din_attention, torch_din_attention_backward

PARAMS_PER_LAYER = {"sigmoid": 0, "relu": 0, "prelu": 1, "dice": 3}
NO_NORMALIZATION = "none"  # the op schema spells normalization=None as a string


def _problem(query, keys, values, lengths, mask, weights, biases, act_params, activation,
             normalization, scale, dice_eps) -> DINProblem:
    """The canonical problem back from the op's flat arguments (already validated)."""
    per_layer = PARAMS_PER_LAYER[activation]
    act_params = [tuple(act_params[i * per_layer:(i + 1) * per_layer])
                  for i in range(len(weights) - 1)]
    return DINProblem(
        query=query, keys=keys, values=values, lengths=lengths, mask=mask,
        weights=list(weights), biases=list(biases), activation=activation,
        act_params=act_params,
        normalization=None if normalization == NO_NORMALIZATION else normalization,
        scale=scale, dice_eps=dice_eps, squeeze_candidates=False,
    )


@torch.library.custom_op("din_fast::attention_forward", mutates_args=())
def attention_forward(
    query: Tensor, keys: Tensor, values: Optional[Tensor], lengths: Optional[Tensor],
    mask: Optional[Tensor], weights: List[Tensor], biases: List[Tensor],
    act_params: List[Tensor], activation: str, normalization: str, scale: float,
    dice_eps: float, need_scores: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = _problem(query, keys, values, lengths, mask, weights, biases, act_params,
                       activation, normalization, scale, dice_eps)
    if backend == "triton":
        from .kernels.din_forward import din_forward

        pooled, scores, row_max, row_sum = din_forward(problem, need_scores)
    else:
        pooled, scores = torch_din_attention(problem)
        row_max = row_sum = None
    if row_max is None or problem.normalization is None:
        row_max, row_sum = _stats_like(query, problem.normalization)
    # Outputs contiguous, as the fake implementation promises.
    pooled = pooled.to(keys.dtype).contiguous()
    scores = scores.to(keys.dtype).contiguous() if need_scores else keys.new_empty(0)
    return pooled, scores, row_max, row_sum


def _stats_like(query: Tensor, normalization) -> Tuple[Tensor, Tensor]:
    """Zero softmax statistics, [B, C] for softmax, [0] when there are none.

    The torch backend's backward recomputes them, and normalization=None has none.
    """
    shape = query.shape[:2] if normalization == "softmax" else (0,)
    return tuple(query.new_zeros(shape, dtype=torch.float32) for _ in range(2))


@attention_forward.register_fake
def _(query, keys, values, lengths, mask, weights, biases, act_params, activation,
      normalization, scale, dice_eps, need_scores, backend):
    batch, candidates = query.shape[:2]
    value_dim = (keys if values is None else values).shape[2]
    pooled = keys.new_empty(batch, candidates, value_dim)
    scores = keys.new_empty(batch, candidates, keys.shape[1]) if need_scores \
        else keys.new_empty(0)
    return (pooled, scores, *_stats_like(query, normalization))


@torch.library.custom_op("din_fast::attention_backward", mutates_args=())
def attention_backward(
    grad_pooled: Tensor, grad_scores: Optional[Tensor], row_max: Tensor, query: Tensor, keys: Tensor, values: Optional[Tensor], lengths: Optional[Tensor],
    mask: Optional[Tensor], weights: List[Tensor], biases: List[Tensor],
    act_params: List[Tensor], activation: str, normalization: str, scale: float,
    dice_eps: float, backend: str,
) -> List[Tensor]:
    """[dq, dk, dv (empty without values), *dweights, *dbiases, *dact_params]."""
    problem = _problem(query, keys, values, lengths, mask, weights, biases, act_params,
                       activation, normalization, scale, dice_eps)
    from .kernels.din_backward import backward_unsupported, din_backward

    if backend == "triton" and backward_unsupported(problem) is None:
        grads = din_backward(problem, grad_pooled, row_max, grad_scores)
    else:
        grads = torch_din_attention_backward(problem, grad_pooled, grad_scores)
    dq, dk, dv, dweights, dbiases, dact = grads
    flat = [dq, dk, keys.new_empty(0) if dv is None else dv, *dweights, *dbiases,
            *(g for layer in dact for g in layer)]
    return [g.contiguous() for g in flat]


@attention_backward.register_fake
def _(grad_pooled, grad_scores, row_max, query, keys, values, lengths, mask, weights, biases,
      act_params, activation, normalization, scale, dice_eps, backend):
    dv = keys.new_empty(0) if values is None else torch.empty_like(values)
    return [torch.empty_like(query), torch.empty_like(keys), dv,
            *(torch.empty_like(t) for t in (*weights, *biases, *act_params))]


def _setup_context(ctx, inputs, output):
    (query, keys, values, lengths, mask, weights, biases, act_params, activation,
     normalization, scale, dice_eps, need_scores, backend) = inputs
    # Nothing per position: the inputs and the [B, C] row max.
    row_max = output[2]
    ctx.num_weights = len(weights)
    ctx.has_values = values is not None
    ctx.options = (activation, normalization, scale, dice_eps, backend)
    ctx.need_scores = need_scores
    ctx.save_for_backward(query, keys, values, lengths, mask, row_max, *weights, *biases,
                          *act_params)


def _backward(ctx, grad_pooled, grad_scores, grad_row_max, grad_row_sum):
    query, keys, values, lengths, mask, row_max, *params = ctx.saved_tensors
    num_weights = ctx.num_weights
    weights, biases = params[:num_weights], params[num_weights:2 * num_weights]
    act_params = params[2 * num_weights:]
    grads = attention_backward(
        grad_pooled, grad_scores if ctx.need_scores else None, row_max, query, keys, values,
        lengths, mask, weights, biases, act_params, *ctx.options)
    dq, dk, dv = grads[:3]
    dweights = grads[3:3 + num_weights]
    dbiases = grads[3 + num_weights:3 + 2 * num_weights]
    dact = grads[3 + 2 * num_weights:]
    return (dq, dk, dv if ctx.has_values else None, None, None, dweights, dbiases, dact,
            None, None, None, None, None, None)


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def run_attention_op(problem: DINProblem, backend: str, need_scores: bool
                     ) -> Tuple[Tensor, Optional[Tensor]]:
    """(pooled [B, C, Dv], scores [B, C, T] or None) through the custom op."""
    act_params: Sequence[Tensor] = [p for layer in problem.act_params for p in layer]
    pooled, scores, _, _ = attention_forward(
        problem.query, problem.keys, problem.values, problem.lengths, problem.mask,
        problem.weights, problem.biases, act_params, problem.activation,
        problem.normalization or NO_NORMALIZATION, problem.scale, problem.dice_eps,
        need_scores, backend)
    return pooled, (scores if need_scores else None)
