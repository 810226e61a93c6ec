"""backend="triton": the fused kernels, run as the custom op din_fast::attention_forward.

The op (din_fast.ops) runs din_fast.kernels.din_forward; its registered
autograd formula is the fused backward (din_fast.kernels.din_backward), which
needs only the inputs, the pooled output and the per-(b, c) softmax
statistics. Inference (no input requiring grad, or grad disabled) saves nothing.

Jagged input runs the same forward kernel reading the histories in place
(din_fast.kernels.din_forward.din_forward_jagged), outside the custom op.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .ops import run_attention_op
from .problem import DINProblem, JaggedDINProblem
from .torch_backend import torch_din_attention_jagged

MAX_HIDDEN_LAYERS = 3  # the kernels' unrolled layer count (kernels.din_forward)


def triton_unsupported_reason(problem) -> Optional[str]:
    """Why the triton backend cannot run this problem (a DINProblem or a
    JaggedDINProblem), or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    device = problem.query.device
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        return (f"the tensors are on {device}; it needs CUDA tensors (or CPU tensors with "
                "TRITON_INTERPRET=1 set before triton is imported)")
    if problem.query.dtype == torch.float64:
        return "the inputs are float64; it takes float32, float16 or bfloat16 (float64 runs " \
               "on backend='torch' or 'reference')"
    layers = len(problem.hidden_units)
    if layers > MAX_HIDDEN_LAYERS:
        return f"the MLP has {layers} hidden layers; it supports 1 to {MAX_HIDDEN_LAYERS}"
    return None


def triton_din_attention(problem: DINProblem, need_scores: bool = True):
    """(pooled [B, C, Dv] in the keys' dtype, w [B, C, T] or None), through the custom op."""
    return run_attention_op(problem, "triton", need_scores)


def triton_din_attention_jagged(problem: JaggedDINProblem, need_scores: bool = True):
    """(pooled [B, C, Dv] in the keys' dtype, w [L, C] or None) from the fused
    forward on jagged input; differentiable through _FusedJaggedForward."""
    tensors = problem.float_tensors()
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _FusedJaggedForward.apply(problem, need_scores, *tensors)
    from .kernels.din_forward import din_forward_jagged

    pooled, scores, _, _ = din_forward_jagged(problem, need_scores)
    return pooled, scores


class _FusedJaggedForward(torch.autograd.Function):
    """The fused jagged forward, with a backward that recomputes through the
    torch jagged path (torch_din_attention_jagged under torch.autograd.grad).

    A fused jagged backward is future work: until then the backward holds the
    torch path's per-position activations, [L, C, H] per layer, for as long as
    it runs (the forward saves only the inputs).
    """

    @staticmethod
    def forward(ctx, problem, need_scores, *tensors):
        from .kernels.din_forward import din_forward_jagged

        pooled, scores, _, _ = din_forward_jagged(problem, need_scores)
        ctx.problem = problem
        ctx.save_for_backward(*tensors)
        return pooled, scores

    @staticmethod
    def backward(ctx, grad_pooled, grad_scores):
        wanted = ctx.needs_input_grad[2:]
        tensors = [t.detach().requires_grad_(needed)
                   for t, needed in zip(ctx.saved_tensors, wanted)]
        with torch.enable_grad():
            pooled, scores = torch_din_attention_jagged(ctx.problem.with_float_tensors(tensors))
            outputs, cotangents = [pooled], [grad_pooled.to(pooled.dtype)]
            if grad_scores is not None:
                outputs.append(scores)
                cotangents.append(grad_scores.to(scores.dtype))
            inputs = [t for t in tensors if t.requires_grad]
            grads = iter(torch.autograd.grad(outputs, inputs, cotangents, allow_unused=True))
        return (None, None, *(next(grads) if needed else None for needed in wanted))
