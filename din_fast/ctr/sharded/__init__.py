"""DIN with its embedding tables sharded across processes by TorchRec.

``din_fast.ctr.sharded.model`` holds the model (TorchRecDIN: the item and category
tables as a TorchRec EmbeddingCollection, the history pooled by
din_attention_jagged) and its sharding; ``din_fast.ctr.sharded.training`` the
distributed training loop behind ``torchrun ... -m din_fast train``. Both need
the optional TorchRec install (see docs/install.md); this module does not, so the
command line can offer the options without it.
"""

from __future__ import annotations

from .options import (DEFAULT_EMBEDDING_LR, DEFAULT_EMBEDDING_OPTIMIZER, DEFAULT_L2,
                      EMBEDDING_OPTIMIZERS, SHARDING_TYPES, OptionError, add_options,
                      check_options, check_single_process_options, requested,
                      under_torchrun)

__all__ = ["DEFAULT_EMBEDDING_LR", "DEFAULT_EMBEDDING_OPTIMIZER", "DEFAULT_L2",
           "EMBEDDING_OPTIMIZERS", "SHARDING_TYPES", "OptionError", "add_options", "check_options",
           "check_single_process_options", "load_trainer", "requested", "under_torchrun"]


def load_trainer():
    """Import the TorchRec trainer (TorchRec is an optional install).

    Returns:
        din_fast.ctr.sharded.training.train_sharded.

    Raises:
        OptionError: TorchRec or FBGEMM is not installed; the message says
            how to install them.
        ModuleNotFoundError: another module is missing (a broken install).
    """
    try:
        from .training import train_sharded
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in ("torchrec", "fbgemm_gpu"):
            raise
        raise OptionError(
            f"sharded training needs TorchRec ({error.name} is missing): din_fast's "
            "torchrec extra (pip install -e '.[torchrec]' in a checkout) && pip install "
            "--no-deps fbgemm-gpu-cpu==1.8.0 "
            "torchrec==1.8.0 (on a GPU machine fbgemm-gpu instead of fbgemm-gpu-cpu)") from None
    return train_sharded
