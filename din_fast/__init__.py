"""din_fast: fused DIN attention for PyTorch."""

from .functional import din_attention
from .models import DIN, BaseModel
from .modules import DINAttention

__all__ = ["din_attention", "DINAttention", "DIN", "BaseModel"]
__version__ = "0.1.0"
