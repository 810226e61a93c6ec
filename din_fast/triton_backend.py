"""backend="triton": the fused kernels, run as the custom op din_fast::attention_forward.

The op (din_fast.ops) runs din_fast.kernels.din_forward; its registered
autograd formula is the fused backward (din_fast.kernels.din_backward), which
needs only the inputs, the pooled output and the per-(b, c) softmax
statistics. Inference (no input requiring grad, or grad disabled) saves nothing.

Jagged input runs the same forward kernel reading the histories in place
(din_fast.kernels.din_forward.din_forward_jagged), as the custom op
din_fast::attention_jagged_forward.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .ops import run_attention_op, run_jagged_op
from .problem import DINProblem, JaggedDINProblem

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
    if problem.differentiated_forward():
        return ("the inputs are under a torch.func transform or forward-mode AD; the fused "
                "kernels have a reverse-mode backward only (backend='torch' runs these)")
    if problem.query.shape[-1] == 0:
        return "the embedding size D is 0 (backend='torch' runs it)"
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
    """(pooled [B, C, Dv] in the keys' dtype, w [L, C] or None), through the
    jagged custom op: the fused forward reads the jagged values in place; the
    backward recomputes through the torch backend (no fused jagged backward
    yet), holding its per-position pre-activations, [L, C, H] per layer, while
    it runs (the forward saves only the inputs)."""
    return run_jagged_op(problem, "triton", need_scores)
