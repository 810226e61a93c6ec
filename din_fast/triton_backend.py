"""backend="triton": the fused Triton kernels (din_fast.kernels), as torch custom ops.

Where it runs: CUDA tensors, and CPU tensors under TRITON_INTERPRET=1 (set
before triton is imported; how the tests run it without a GPU).
:func:`unsupported_reason` says what it cannot run: "auto" then takes the
torch backend, an explicit backend="triton" raises with that reason.

The ops, registered with ``torch.library.triton_op`` and ``wrap_triton`` so
that torch.compile, torch.export and AOTInductor trace into the launchers and
see the kernels themselves (under the interpreter, whose kernels torch cannot
trace, as opaque custom ops with the fake implementations below):

- ``din_fast::triton_attention_forward`` (AttentionArgs, need_scores) ->
  (pooled [B, C, Dv], scores [B, C, T] or an empty tensor);
- ``din_fast::triton_attention_jagged_forward`` (JaggedAttentionArgs,
  need_scores) -> (pooled [B, C, Dv], scores [L, C] or an empty tensor);
- ``din_fast::triton_attention_backward`` (grad_pooled, grad_scores,
  AttentionArgs) -> InputGrads.flat().

Autograd: a forward saves its inputs, nothing per position. The backward is
the fused kernel, which recomputes the activation unit tile by tile, where
:func:`fused_backward_unsupported` allows; elsewhere (and for jagged input,
which has no fused backward yet) the torch backend's hand-written backward
op, which recomputes block by block (din_fast.chunked). Under
create_graph=True both recompute through autograd instead
(torch_backend.autograd_gradients), so double backward works; forward-mode
AD and torch.func transforms are among the unsupported reasons.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .kernels import MAX_HIDDEN_LAYERS, interpreting, triton_available
from .op_args import (AttentionArgs, InputGrads, JaggedAttentionArgs, check_signature,
                      fake_input_grads, save_arguments, saved_arguments)
from .problem import DINProblem, JaggedDINProblem
from .torch_backend import reverse_gradients, torch_attention_backward


def unsupported_reason(problem) -> Optional[str]:
    """Why the triton backend cannot run this problem (a DINProblem or a
    JaggedDINProblem), or None when it can."""
    if not triton_available():
        return "the triton package is not installed (or its import fails)"
    device = problem.query.device
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return (f"the tensors are on {device}; it needs CUDA tensors (or CPU tensors with "
                "TRITON_INTERPRET=1 set before triton is imported)")
    if problem.differentiated_forward():
        return ("the inputs are under a torch.func transform or forward-mode AD; the fused "
                "kernels have a reverse-mode backward only (backend='torch' runs these)")
    if problem.query.shape[-1] == 0:
        return "the embedding size D is 0 (backend='torch' runs it)"
    if problem.query.dtype == torch.float64:
        return ("the inputs are float64; it takes float32, float16 or bfloat16 (float64 runs "
                "on backend='torch' or 'reference')")
    layers = len(problem.hidden_units)
    if layers > MAX_HIDDEN_LAYERS:
        return f"the MLP has {layers} hidden layers; it supports 1 to {MAX_HIDDEN_LAYERS}"
    return None


def fused_backward_unsupported(problem: DINProblem) -> Optional[str]:
    """Why the fused backward kernel cannot take these widths and dtype (its
    accumulators must fit on chip: kernels.din_backward), or None."""
    from .kernels.din_backward import backward_unsupported_shape

    return backward_unsupported_shape(problem.keys.shape[2], problem.hidden_units,
                                      problem.keys.dtype)


def run(problem, need_scores: bool = True):
    """(pooled [B, C, Dv] in the keys' dtype, w or None) of a DINProblem (w [B,
    C, T]) or a JaggedDINProblem (w [L, C]), through the ops below."""
    if isinstance(problem, JaggedDINProblem):
        pooled, scores = triton_attention_jagged_forward(*JaggedAttentionArgs.of(problem),
                                                         need_scores)
    else:
        pooled, scores = triton_attention_forward(*AttentionArgs.of(problem), need_scores)
    return pooled, (scores if need_scores else None)


# ------------------------------------------------------------------ registration

def _register(name: str, function, fake):
    """The op ``din_fast::<name>`` running ``function``: a triton_op where the
    kernels compile, an opaque custom op with ``fake`` under the interpreter
    (and without triton, where unsupported_reason keeps every call away)."""
    if interpreting() or not triton_available():
        op = torch.library.custom_op(f"din_fast::{name}", function, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(f"din_fast::{name}", function, mutates_args=())


def _as_outputs(pooled: Tensor, scores: Optional[Tensor], history: Tensor, need_scores: bool
                ) -> Tuple[Tensor, Tensor]:
    """(pooled, scores or an empty tensor) in the history's dtype, contiguous, as
    the fake implementations promise."""
    pooled = pooled.to(history.dtype).contiguous()
    scores = scores.to(history.dtype).contiguous() if need_scores else history.new_empty(0)
    return pooled, scores


def _fake_outputs(query: Tensor, history: Tensor, values: Optional[Tensor],
                  scores_shape: tuple, need_scores: bool) -> Tuple[Tensor, Tensor]:
    batch, candidates = query.shape[:2]
    value_dim = (history if values is None else values).shape[-1]
    scores = history.new_empty(scores_shape if need_scores else (0,))
    return history.new_empty(batch, candidates, value_dim), scores


def _attention_forward(
    query: Tensor, keys: Tensor, values: Optional[Tensor], lengths: Optional[Tensor],
    mask: Optional[Tensor], weights: List[Tensor], biases: List[Tensor],
    act_params: List[Tensor], activation: str, normalization: str, scale: float,
    dice_eps: float, need_scores: bool,
) -> Tuple[Tensor, Tensor]:
    from .kernels.din_forward import din_forward

    args = AttentionArgs(query, keys, values, lengths, mask, weights, biases, act_params,
                         activation, normalization, scale, dice_eps)
    pooled, scores = din_forward(args.problem(), need_scores)[:2]
    return _as_outputs(pooled, scores, keys, need_scores)


def _attention_forward_fake(query, keys, values, lengths, mask, weights, biases, act_params,
                            activation, normalization, scale, dice_eps, need_scores):
    scores_shape = (*query.shape[:2], keys.shape[1])
    return _fake_outputs(query, keys, values, scores_shape, need_scores)


check_signature(_attention_forward, AttentionArgs, trailing=("need_scores",))
triton_attention_forward = _register("triton_attention_forward", _attention_forward,
                                     _attention_forward_fake)


def _attention_jagged_forward(
    query: Tensor, keys_values: Tensor, values: Optional[Tensor], offsets: Tensor,
    max_len: int, weights: List[Tensor], biases: List[Tensor], act_params: List[Tensor],
    activation: str, normalization: str, scale: float, dice_eps: float, need_scores: bool,
) -> Tuple[Tensor, Tensor]:
    from .kernels.din_forward import din_forward_jagged

    args = JaggedAttentionArgs(query, keys_values, values, offsets, max_len, weights, biases,
                               act_params, activation, normalization, scale, dice_eps)
    pooled, scores = din_forward_jagged(args.problem(), need_scores)[:2]
    return _as_outputs(pooled, scores, keys_values, need_scores)


def _attention_jagged_forward_fake(query, keys_values, values, offsets, max_len, weights,
                                   biases, act_params, activation, normalization, scale,
                                   dice_eps, need_scores):
    scores_shape = (keys_values.shape[0], query.shape[1])
    return _fake_outputs(query, keys_values, values, scores_shape, need_scores)


check_signature(_attention_jagged_forward, JaggedAttentionArgs, trailing=("need_scores",))
triton_attention_jagged_forward = _register(
    "triton_attention_jagged_forward", _attention_jagged_forward, _attention_jagged_forward_fake)


def _attention_backward(
    grad_pooled: Tensor, grad_scores: Optional[Tensor], query: Tensor, keys: Tensor,
    values: Optional[Tensor], lengths: Optional[Tensor], mask: Optional[Tensor],
    weights: List[Tensor], biases: List[Tensor], act_params: List[Tensor], activation: str,
    normalization: str, scale: float, dice_eps: float,
) -> List[Tensor]:
    from .kernels.din_backward import din_backward

    args = AttentionArgs(query, keys, values, lengths, mask, weights, biases, act_params,
                         activation, normalization, scale, dice_eps)
    return InputGrads.of(din_backward(args.problem(), grad_pooled, grad_scores), keys).flat()


check_signature(_attention_backward, AttentionArgs, leading=("grad_pooled", "grad_scores"))
triton_attention_backward = _register("triton_attention_backward", _attention_backward,
                                      fake_input_grads)


# ------------------------------------------------------------------ autograd

def _setup_context_for(fields: type):
    """setup_context of a forward op whose arguments are ``fields`` then need_scores."""
    def setup_context(ctx, inputs, output):
        # Only the inputs: the backward recomputes the rest.
        save_arguments(ctx, fields(*inputs[:-1]))
        ctx.need_scores = inputs[-1]
    return setup_context


def _backward(ctx, grad_pooled, grad_scores):
    args, _ = saved_arguments(ctx)
    grad_scores = grad_scores if ctx.need_scores else None
    problem = args.problem()
    if isinstance(problem, DINProblem) and fused_backward_unsupported(problem) is None:
        def backward():
            return triton_attention_backward(grad_pooled, grad_scores, *args)
    else:
        def backward():
            return torch_attention_backward(problem, grad_pooled, grad_scores)
    grads = InputGrads.unflat(reverse_gradients(problem, grad_pooled, grad_scores, backward),
                              len(args.weights))
    return grads.as_inputs(ctx.fields, problem.values is not None, need_scores=None)


triton_attention_forward.register_autograd(_backward,
                                           setup_context=_setup_context_for(AttentionArgs))
triton_attention_jagged_forward.register_autograd(
    _backward, setup_context=_setup_context_for(JaggedAttentionArgs))
