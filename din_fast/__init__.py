"""din_fast: fused DIN attention for PyTorch."""

from .dice_statistics import synchronize_dice_statistics
from .functional import din_attention, din_attention_jagged
from .models import DIN, BaseModel
from .modules import DINAttention

__all__ = ["din_attention", "din_attention_jagged", "DINAttention", "DIN", "BaseModel",
           "synchronize_dice_statistics"]
__version__ = "0.2.0"  # the one place the version is written
