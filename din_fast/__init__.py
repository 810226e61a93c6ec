"""din_fast: fused DIN attention for PyTorch.

The DIN (Deep Interest Network) local activation unit and attention pooling
as functions (din_attention on padded histories, din_attention_jagged on
jagged ones, din_attention_top_k two-stage over long ones) and as a layer
(DINAttention), the DIN and BaseModel CTR models, and
synchronize_dice_statistics for Dice under data parallelism. The adapters
for DeepCTR-Torch and FuxiCTR are in din_fast.compat; the ``din-fast``
command trains, evaluates, predicts and exports.
"""

from .dice_statistics import synchronize_dice_statistics
from .functional import din_attention, din_attention_jagged
from .models import DIN, BaseModel
from .modules import DINAttention
from .two_stage import din_attention_top_k

__all__ = ["din_attention", "din_attention_jagged", "din_attention_top_k", "DINAttention",
           "DIN", "BaseModel", "synchronize_dice_statistics"]
__version__ = "0.2.0"  # the one place the version is written
