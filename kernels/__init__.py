"""din_fast.kernels: the Triton kernels of the fused DIN attention and their launchers.

This package module itself needs no triton (the package imports it where
triton may be missing): what the launchers' callers must know before any
kernel is touched lives here; the kernels and their shared helpers are in
the submodules, which import triton.
"""

import importlib.util
import os

# The kernels unroll the MLP for 1 to 3 hidden layers.
MAX_HIDDEN_LAYERS = 3


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, the tests' mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, without importing triton: a constant is what torch.compile
# traces cleanly (an lru_cache-wrapped check made dynamo warn of "silent
# incorrectness" on every compiled call of the triton backend).
def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:     # an import hook that hides triton (or a broken parent)
        return False


_TRITON_INSTALLED = _triton_installed()


def triton_available() -> bool:
    """Whether triton is installed here (pyproject installs it on Linux only)."""
    return _TRITON_INSTALLED
