"""din_attention as torch.library custom ops, so that torch.compile sees one opaque op.

The torch backend packs the valid positions with nonzero() (a data-dependent
shape) and the triton backend launches kernels: neither traces. Wrapped as
custom ops with flat tensor arguments, a fake (meta) implementation and a
registered autograd formula, both compile with fullgraph=True.

- ``din_fast::attention_forward``: (pooled [B, C, Dv], scores [B, C, T] or an
  empty tensor). The backward recomputes everything else from the inputs.
- ``din_fast::attention_backward``: the gradient of every tensor input.

Under create_graph=True (double backward) the registered backward instead
recomputes through autograd (torch_backend.autograd_gradients), so that the
gradients are differentiable themselves; the ops have no forward-mode or
vmap rule, and the dispatcher never sends such calls here.
- ``din_fast::attention_jagged_forward`` / ``attention_jagged_backward``: the
  same on jagged histories (din_attention_jagged): (pooled [B, C, Dv], scores
  [L, C] or an empty tensor); every output size follows from the input sizes.
  The backward is the torch backend's on either backend (no fused jagged
  backward yet): it recomputes the forward and keeps its per-position
  pre-activations while it runs.

``backend`` picks the implementation: "triton" runs the fused kernels (CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1), "torch" the torch backend
and its hand-written backward, on any device. Weight tiles too large for the
fused backward's on-chip budget (see ``backward_unsupported``: it depends on
the widths and the inputs' dtype) take the torch backward under "triton" too:
correct, but it stores per-position activations.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .problem import DINProblem, JaggedDINProblem
from .torch_backend import (autograd_gradients, torch_din_attention,
                            torch_din_attention_backward, torch_din_attention_jagged)

PARAMS_PER_LAYER = {"sigmoid": 0, "relu": 0, "prelu": 1, "dice": 3}
NO_NORMALIZATION = "none"  # the op schema spells normalization=None as a string


def _unit_and_options(weights, biases, act_params, activation, normalization, scale,
                      dice_eps) -> dict:
    """The fields every problem form shares, back from the ops' flat arguments."""
    per_layer = PARAMS_PER_LAYER[activation]
    act_params = [tuple(act_params[i * per_layer:(i + 1) * per_layer])
                  for i in range(len(weights) - 1)]
    return dict(weights=list(weights), biases=list(biases), activation=activation,
                act_params=act_params,
                normalization=None if normalization == NO_NORMALIZATION else normalization,
                scale=scale, dice_eps=dice_eps, squeeze_candidates=False)


def _problem(query, keys, values, lengths, mask, *unit_and_options) -> DINProblem:
    """The canonical problem back from the op's flat arguments (already validated)."""
    return DINProblem(query=query, keys=keys, values=values, lengths=lengths, mask=mask,
                      **_unit_and_options(*unit_and_options))


def _jagged_problem(query, keys_values, values, offsets, max_len, *unit_and_options
                    ) -> JaggedDINProblem:
    return JaggedDINProblem(query=query, keys_values=keys_values, values=values,
                            offsets=offsets, max_len=max_len,
                            **_unit_and_options(*unit_and_options))


def _flat_act_params(problem) -> List[Tensor]:
    return [p for layer in problem.act_params for p in layer]


@torch.library.custom_op("din_fast::attention_forward", mutates_args=())
def attention_forward(
    query: Tensor, keys: Tensor, values: Optional[Tensor], lengths: Optional[Tensor],
    mask: Optional[Tensor], weights: List[Tensor], biases: List[Tensor],
    act_params: List[Tensor], activation: str, normalization: str, scale: float,
    dice_eps: float, need_scores: bool, backend: str,
) -> Tuple[Tensor, Tensor]:
    problem = _problem(query, keys, values, lengths, mask, weights, biases, act_params,
                       activation, normalization, scale, dice_eps)
    if backend == "triton":
        from .kernels.din_forward import din_forward

        pooled, scores = din_forward(problem, need_scores)[:2]
    else:
        pooled, scores = torch_din_attention(problem)
    return _as_outputs(pooled, scores, keys, need_scores)


def _as_outputs(pooled: Tensor, scores: Optional[Tensor], history: Tensor, need_scores: bool
                ) -> Tuple[Tensor, Tensor]:
    """(pooled, scores or an empty tensor) in the history's dtype, contiguous, as
    the fake implementations promise."""
    pooled = pooled.to(history.dtype).contiguous()
    scores = scores.to(history.dtype).contiguous() if need_scores else history.new_empty(0)
    return pooled, scores


def _fake_outputs(query: Tensor, history: Tensor, values: Optional[Tensor],
                  scores_shape: tuple, need_scores: bool) -> Tuple[Tensor, Tensor]:
    """Empty (pooled [B, C, Dv], scores of ``scores_shape`` or [0])."""
    batch, candidates = query.shape[:2]
    value_dim = (history if values is None else values).shape[-1]
    scores = history.new_empty(scores_shape if need_scores else (0,))
    return history.new_empty(batch, candidates, value_dim), scores


@attention_forward.register_fake
def _(query, keys, values, lengths, mask, weights, biases, act_params, activation,
      normalization, scale, dice_eps, need_scores, backend):
    scores_shape = (*query.shape[:2], keys.shape[1])
    return _fake_outputs(query, keys, values, scores_shape, need_scores)


@torch.library.custom_op("din_fast::attention_backward", mutates_args=())
def attention_backward(
    grad_pooled: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys: Tensor,
    values: Optional[Tensor], lengths: Optional[Tensor],
    mask: Optional[Tensor], weights: List[Tensor], biases: List[Tensor],
    act_params: List[Tensor], activation: str, normalization: str, scale: float,
    dice_eps: float, backend: str,
) -> List[Tensor]:
    """[dq, dk, dv (empty without values), *dweights, *dbiases, *dact_params]."""
    problem = _problem(query, keys, values, lengths, mask, weights, biases, act_params,
                       activation, normalization, scale, dice_eps)
    from .kernels.din_backward import backward_unsupported, din_backward

    if backend == "triton" and backward_unsupported(problem) is None:
        grads = din_backward(problem, grad_pooled, grad_scores)
    else:
        grads = torch_din_attention_backward(problem, grad_pooled, grad_scores)
    return _flat_grads(grads, keys)


def _flat_grads(grads, history: Tensor) -> List[Tensor]:
    """A backward's (dq, d history, dv or None, ...) as the ops' flat list."""
    dq, dk, dv, dweights, dbiases, dact = grads
    flat = [dq, dk, history.new_empty(0) if dv is None else dv, *dweights, *dbiases,
            *(g for layer in dact for g in layer)]
    return [g.contiguous() for g in flat]


def _fake_grads(query, history, values, weights, biases, act_params) -> List[Tensor]:
    dv = history.new_empty(0) if values is None else torch.empty_like(values)
    return [torch.empty_like(query), torch.empty_like(history), dv,
            *(torch.empty_like(t) for t in (*weights, *biases, *act_params))]


def _save_inputs(ctx, inputs, layout: tuple, options: tuple) -> None:
    """What a backward keeps of a forward op's inputs. Both forward ops take
    (query, history, values, two layout arguments, weights, biases,
    act_params, activation, normalization, scale, dice_eps, need_scores,
    backend); ``layout`` holds the tensors the backward needs beside them."""
    query, history, values, _, _, weights, biases, act_params = inputs[:8]
    ctx.num_weights = len(weights)
    ctx.has_values = values is not None
    ctx.need_scores = inputs[12]
    ctx.options = options
    ctx.num_layout = len(layout)
    ctx.save_for_backward(query, history, values, *layout, *weights, *biases, *act_params)


def _saved_inputs(ctx):
    """(query, history, values, layout tensors, weights, biases, act_params) of _save_inputs."""
    query, history, values, *rest = ctx.saved_tensors
    layout, params = rest[:ctx.num_layout], rest[ctx.num_layout:]
    n = ctx.num_weights
    return query, history, values, layout, params[:n], params[n:2 * n], params[2 * n:]


def _input_grads(ctx, grads) -> tuple:
    """A backward op's flat gradients as the forward op's input gradients."""
    n = ctx.num_weights
    dq, dk, dv = grads[:3]
    return (dq, dk, dv if ctx.has_values else None, None, None, grads[3:3 + n],
            grads[3 + n:3 + 2 * n], grads[3 + 2 * n:], None, None, None, None, None, None)


@attention_backward.register_fake
def _(grad_pooled, grad_scores, query, keys, values, lengths, mask, weights, biases,
      act_params, activation, normalization, scale, dice_eps, backend):
    return _fake_grads(query, keys, values, weights, biases, act_params)


def _setup_context(ctx, inputs, output):
    # Nothing per position: only the inputs.
    lengths, mask = inputs[3:5]
    _save_inputs(ctx, inputs, (lengths, mask), inputs[8:12] + inputs[13:])


def _backward(ctx, grad_pooled, grad_scores):
    query, keys, values, (lengths, mask), weights, biases, act_params = _saved_inputs(ctx)
    grad_scores = grad_scores if ctx.need_scores else None
    if torch.is_grad_enabled():
        problem = _problem(query, keys, values, lengths, mask, weights, biases, act_params,
                           *ctx.options[:4])
        return _input_grads(ctx, _graph_grads(problem, grad_pooled, grad_scores))
    grads = attention_backward(grad_pooled, grad_scores, query, keys, values, lengths, mask,
                               weights, biases, act_params, *ctx.options)
    return _input_grads(ctx, grads)


def _graph_grads(problem, grad_pooled: Tensor, grad_scores: Optional[Tensor]) -> list:
    """create_graph=True: autograd_gradients in the backward ops' flat order
    (None where an input needs none, and for absent values)."""
    grads = autograd_gradients(problem, grad_pooled, grad_scores)
    if problem.values is None:
        grads.insert(2, None)
    return grads


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def run_attention_op(problem: DINProblem, backend: str, need_scores: bool
                     ) -> Tuple[Tensor, Optional[Tensor]]:
    """(pooled [B, C, Dv], scores [B, C, T] or None) through the custom op."""
    pooled, scores = attention_forward(
        problem.query, problem.keys, problem.values, problem.lengths, problem.mask,
        problem.weights, problem.biases, _flat_act_params(problem), problem.activation,
        problem.normalization or NO_NORMALIZATION, problem.scale, problem.dice_eps,
        need_scores, backend)
    return pooled, (scores if need_scores else None)


@torch.library.custom_op("din_fast::attention_jagged_forward", mutates_args=())
def attention_jagged_forward(
    query: Tensor, keys_values: Tensor, values: Optional[Tensor], offsets: Tensor,
    max_len: int, weights: List[Tensor], biases: List[Tensor], act_params: List[Tensor],
    activation: str, normalization: str, scale: float, dice_eps: float, need_scores: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    problem = _jagged_problem(query, keys_values, values, offsets, max_len, weights, biases,
                              act_params, activation, normalization, scale, dice_eps)
    if backend == "triton":
        from .kernels.din_forward import din_forward_jagged

        pooled, scores = din_forward_jagged(problem, need_scores)[:2]
    else:
        pooled, scores = torch_din_attention_jagged(problem)
    return _as_outputs(pooled, scores, keys_values, need_scores)


@attention_jagged_forward.register_fake
def _(query, keys_values, values, offsets, max_len, weights, biases, act_params, activation,
      normalization, scale, dice_eps, need_scores, backend):
    scores_shape = (keys_values.shape[0], query.shape[1])
    return _fake_outputs(query, keys_values, values, scores_shape, need_scores)


@torch.library.custom_op("din_fast::attention_jagged_backward", mutates_args=())
def attention_jagged_backward(
    grad_pooled: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys_values: Tensor,
    values: Optional[Tensor], offsets: Tensor, max_len: int, weights: List[Tensor],
    biases: List[Tensor], act_params: List[Tensor], activation: str, normalization: str,
    scale: float, dice_eps: float,
) -> List[Tensor]:
    """[dq, d keys_values, dv (empty without values), *dweights, *dbiases, *dact_params]."""
    problem = _jagged_problem(query, keys_values, values, offsets, max_len, weights, biases,
                              act_params, activation, normalization, scale, dice_eps)
    return _flat_grads(torch_din_attention_backward(problem, grad_pooled, grad_scores),
                       keys_values)


@attention_jagged_backward.register_fake
def _(grad_pooled, grad_scores, query, keys_values, values, offsets, max_len, weights, biases,
      act_params, activation, normalization, scale, dice_eps):
    return _fake_grads(query, keys_values, values, weights, biases, act_params)


def _setup_jagged_context(ctx, inputs, output):
    # Only the inputs: the backward recomputes the forward.
    offsets, max_len = inputs[3:5]
    _save_inputs(ctx, inputs, (offsets,), (max_len, *inputs[8:12]))


def _jagged_backward(ctx, grad_pooled, grad_scores):
    query, keys_values, values, (offsets,), weights, biases, act_params = _saved_inputs(ctx)
    max_len, *options = ctx.options
    grad_scores = grad_scores if ctx.need_scores else None
    if torch.is_grad_enabled():
        problem = _jagged_problem(query, keys_values, values, offsets, max_len, weights,
                                  biases, act_params, *options)
        return _input_grads(ctx, _graph_grads(problem, grad_pooled, grad_scores))
    grads = attention_jagged_backward(
        grad_pooled, grad_scores, query, keys_values, values, offsets, max_len, weights,
        biases, act_params, *options)
    return _input_grads(ctx, grads)


attention_jagged_forward.register_autograd(_jagged_backward, setup_context=_setup_jagged_context)


def run_jagged_op(problem: JaggedDINProblem, backend: str, need_scores: bool
                  ) -> Tuple[Tensor, Optional[Tensor]]:
    """(pooled [B, C, Dv], scores [L, C] or None) through the jagged custom op."""
    pooled, scores = attention_jagged_forward(
        problem.query, problem.keys_values, problem.values, problem.offsets, problem.max_len,
        problem.weights, problem.biases, _flat_act_params(problem), problem.activation,
        problem.normalization or NO_NORMALIZATION, problem.scale, problem.dice_eps,
        need_scores, backend)
    return pooled, (scores if need_scores else None)
