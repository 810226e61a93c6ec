"""din_fast.kernels: the Triton kernels of the fused DIN attention and their launchers.

This package module itself needs no triton (the package imports it where
triton may be missing): what the launchers' callers must know before any
kernel is touched lives here; the kernels and their shared helpers are in
the submodules, which import triton.
"""

import os

# The kernels unroll the MLP for 1 to 3 hidden layers.
MAX_HIDDEN_LAYERS = 3


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tensors, the tests' mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, at import: a constant is what torch.compile traces cleanly
# (an lru_cache-wrapped check made dynamo warn of "silent incorrectness" on
# every compiled call of the triton backend). Imported, not just found: a
# triton whose import fails (a missing shared library, an import hook that
# hides it) counts as absent, so the package still imports and "auto" takes
# the torch backend. Importing costs nothing extra: registering the ops
# imports triton anyway where it is present.
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_IMPORTS = _triton_imports()


def triton_available() -> bool:
    """Whether triton imports here (pyproject installs it on Linux only)."""
    return _TRITON_IMPORTS
