"""din_fast.kernels: the Triton kernels of the fused DIN attention and their launchers.

This package module itself needs no triton (the package imports it where
triton may be missing): what the launchers' callers must know before any
kernel is touched lives here; the kernels and their shared helpers are in
the submodules, which import triton.
"""

import functools
import os

# The kernels unroll the MLP for 1 to 3 hidden layers.
MAX_HIDDEN_LAYERS = 3


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, the tests' mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports here (pyproject installs it on Linux only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
