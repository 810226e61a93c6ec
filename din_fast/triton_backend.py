"""backend="triton": the fused forward kernel behind an autograd Function.

The forward runs din_fast.kernels.din_forward and saves only the inputs and
the per-(b, c) softmax statistics. Until the fused backward lands, the
backward recomputes the forward through the torch backend with autograd
(exact, but it materializes what the torch backend does). Inference (no input
requiring grad, or grad disabled) saves nothing.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .problem import DINProblem
from .torch_backend import torch_din_attention

MAX_HIDDEN_LAYERS = 3  # the kernels' unrolled layer count (kernels.din_forward)


def triton_unsupported_reason(problem: DINProblem) -> Optional[str]:
    """Why the triton backend cannot run this problem, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    device = problem.keys.device
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type != "cuda" and not (device.type == "cpu" and interpret):
        return (f"the tensors are on {device}; it needs CUDA tensors (or CPU tensors with "
                "TRITON_INTERPRET=1 set before triton is imported)")
    if problem.keys.dtype == torch.float64:
        return "the inputs are float64; it takes float32, float16 or bfloat16 (float64 runs " \
               "on backend='torch' or 'reference')"
    layers = len(problem.hidden_units)
    if layers > MAX_HIDDEN_LAYERS:
        return f"the MLP has {layers} hidden layers; it supports 1 to {MAX_HIDDEN_LAYERS}"
    return None


class _TritonDINAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem: DINProblem, need_scores: bool, *tensors):
        from din_fast.kernels.din_forward import din_forward

        pooled, scores, row_max, row_sum = din_forward(problem, need_scores)
        ctx.problem = problem
        ctx.need_scores = need_scores
        # row_max / row_sum are for the fused backward (issue 4); the interim
        # backward below recomputes everything.
        ctx.save_for_backward(*tensors, row_max, row_sum)
        ctx.mark_non_differentiable(row_max, row_sum)
        return pooled, scores

    @staticmethod
    def backward(ctx, d_pooled, d_scores):
        tensors = ctx.saved_tensors[:-2]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(needs)
                      for t, needs in zip(tensors, ctx.needs_input_grad[2:])]
            problem = ctx.problem.with_float_tensors(leaves)
            pooled, scores = torch_din_attention(problem)
            outputs, grads_out = [pooled.to(d_pooled.dtype)], [d_pooled]
            if ctx.need_scores and d_scores is not None:
                outputs.append(scores.to(d_scores.dtype))
                grads_out.append(d_scores)
            wanted = [t for t in leaves if t.requires_grad]
            found = iter(torch.autograd.grad(outputs, wanted, grads_out, allow_unused=True))
        grads = [next(found) if t.requires_grad else None for t in leaves]
        return (None, None, *grads)


def triton_din_attention(problem: DINProblem, need_scores: bool = True):
    """(pooled [B, C, Dv] in the keys' dtype, w [B, C, T] float32 or None)."""
    tensors = problem.float_tensors()
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _TritonDINAttention.apply(problem, need_scores, *tensors)
    from din_fast.kernels.din_forward import din_forward

    pooled, scores, _, _ = din_forward(problem, need_scores)
    return pooled, scores
