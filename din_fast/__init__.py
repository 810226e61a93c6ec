"""din_fast: fused DIN attention for PyTorch."""

from .functional import din_attention
from .modules import DINAttention

__all__ = ["din_attention", "DINAttention"]
__version__ = "0.1.0"
