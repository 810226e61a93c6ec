"""din_fast: fused DIN attention for PyTorch.

The attention library: the DIN (Deep Interest Network) local activation unit
and attention pooling as functions (din_attention on padded histories,
din_attention_jagged on jagged ones, din_attention_top_k two-stage over long
ones) and as a layer (DINAttention), and synchronize_dice_statistics for Dice
under data parallelism. The adapters for DeepCTR-Torch and FuxiCTR are in
din_fast.compat, the Triton kernels in din_fast.kernels.

The CTR application built on it is the subpackage din_fast.ctr: data,
training, checkpoints, the DIN and BaseModel models (also importable from
here), predict, export, serving and the ``din-fast`` command. The library
imports nothing from it; ``import din_fast`` does not load it.
"""

from . import moved_modules
from .dice_statistics import synchronize_dice_statistics
from .functional import din_attention, din_attention_jagged
from .modules import DINAttention
from .two_stage import din_attention_top_k

__all__ = ["din_attention", "din_attention_jagged", "din_attention_top_k", "DINAttention",
           "DIN", "BaseModel", "synchronize_dice_statistics"]
__version__ = "0.2.0"  # the one place the version is written

moved_modules.install()

# The models live in the application; importing them here on first use keeps
# ``from din_fast import DIN`` working without loading the application with
# the library.
_APPLICATION_NAMES = {"DIN": "din_fast.ctr.models", "BaseModel": "din_fast.ctr.models"}


def __getattr__(name):
    if name in _APPLICATION_NAMES:
        import importlib

        return getattr(importlib.import_module(_APPLICATION_NAMES[name]), name)
    raise AttributeError(f"module 'din_fast' has no attribute {name!r}")
