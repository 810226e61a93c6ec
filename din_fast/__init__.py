"""din_fast: fused DIN attention for PyTorch."""

from .dice_statistics import synchronize_dice_statistics
from .functional import din_attention, din_attention_jagged
from .models import DIN, BaseModel
from .modules import DINAttention
from .two_stage import din_attention_top_k

__all__ = ["din_attention", "din_attention_jagged", "din_attention_top_k", "DINAttention",
           "DIN", "BaseModel", "synchronize_dice_statistics"]
__version__ = "0.2.0"  # the one place the version is written
