"""The TorchRec trainer's command-line options, their defaults and checks:
what the command needs without TorchRec installed."""

from __future__ import annotations

import argparse
import os

from ..errors import InputError

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise")
"""How --sharding splits both tables over the processes (TorchRec's sharding types)."""
# Optimizers of the embedding tables, applied inside the backward by FBGEMM's
# fused kernel (TorchRec's FUSED compute kernel): rows untouched by a batch are
# not updated. fbgemm has no CPU kernel for Adam, hence a CPU-capable default.
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
"""The tables' optimizers (--embedding-optimizer), fused into the backward;
adam needs CUDA."""
DEFAULT_EMBEDDING_OPTIMIZER = "rowwise_adagrad"
"""--embedding-optimizer's default: row-wise Adagrad (one accumulator per row)."""
DEFAULT_EMBEDDING_LR = 0.1
"""--embedding-lr's default, the tables' learning rate."""
# The mini-batch aware L2's default here: with the tables' row-wise Adagrad at
# lr 0.1, single-process training's 0.1 (tuned with Adam) shrinks rare rows too
# hard; 0.01 won on Amazon Beauty validation GAUC (see docs/guides/jagged-torchrec.md, "Measured").
DEFAULT_L2 = 0.01
"""train --l2's default under sharded training (single-process training's is 0.1)."""


class OptionError(InputError):
    """Sharded training cannot run as asked; the message says why and what to change."""


def check_options(model: str, embedding_optimizer: str, embedding_lr: float,
                  device_type: str) -> None:
    """Check the options of sharded training that need no TorchRec.

    Args:
        model: the config's model; sharded training runs "din" only.
        embedding_optimizer: one of EMBEDDING_OPTIMIZERS.
        embedding_lr: the tables' learning rate, > 0.
        device_type: "cpu" or "cuda".

    Raises:
        OptionError: a model other than "din", an unknown optimizer, a
            learning rate that is not > 0 (NaN included), or "adam" off
            CUDA (FBGEMM's fused Adam has no CPU kernel).
    """
    if model != "din":
        raise OptionError(f"sharded training runs DIN only (--model din); got --model {model}")
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise OptionError(f"--embedding-optimizer must be one of {EMBEDDING_OPTIMIZERS}; "
                          f"got {embedding_optimizer!r}")
    if not embedding_lr > 0:
        raise OptionError(f"--embedding-lr must be a positive number; got {embedding_lr}")
    if embedding_optimizer == "adam" and device_type != "cuda":
        raise OptionError("--embedding-optimizer adam needs --device cuda: FBGEMM's fused Adam "
                          f"has no CPU kernel; on CPU use one of {EMBEDDING_OPTIMIZERS[:-1]}")


def check_single_process_options(config, resume=None, log_dir=None) -> None:
    """Refuse what only single-process training offers: labeled logs (and
    their side features), the linear part, the history cross term, weight averaging (--ema: the
    tables' rows live on several processes and train in a fused optimizer),
    --resume and --log-dir.

    Args:
        config: the run's din_fast.ctr.config.TrainConfig (its
            ``label_column``, ``linear``, ``history_cross`` and ``ema``).
        resume: the --resume file, or None.
        log_dir: the --log-dir directory, or None.

    Raises:
        OptionError: any of them is given (naming the first: its option,
            the argument it is, its value and what sharded training needs).
    """
    offered = [("--label-column", "config.label_column", config.label_column, "labeled logs",
                "None"),
               ("--linear", "config.linear", config.linear or None, "the linear part", "False"),
               ("--history-cross", "config.history_cross", config.history_cross or None,
                "the history cross term", "0"),
               ("--ema", "config.ema", config.ema, "weight averaging", "None"),
               ("--resume", "resume", resume, "run states", "None"),
               ("--log-dir", "log_dir", log_dir, "a log directory", "None")]
    for option, argument, value, what, needed in offered:
        if value is not None:
            raise OptionError(f"{option} {value!r} ({argument}): sharded training runs the DIN "
                              f"protocol from the start, without {what}; it needs {argument} "
                              f"{needed}: leave {option} out, or train in one process "
                              "(without --sharding or torchrun)")


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add the train command's TorchRec options (--sharding,
    --embedding-optimizer, --embedding-lr), as one argument group.

    Args:
        parser: the train command's argparse parser.
    """
    group = parser.add_argument_group(
        "sharded embedding tables (TorchRec; run under torchrun, or alone as one process)")
    group.add_argument("--sharding", choices=SHARDING_TYPES,
                       help="how both tables are split over the processes; omitted under "
                       "torchrun: TorchRec's planner chooses among these")
    group.add_argument("--embedding-optimizer", choices=EMBEDDING_OPTIMIZERS,
                       default=DEFAULT_EMBEDDING_OPTIMIZER,
                       help="the tables' optimizer, fused into the backward (adam: CUDA only); "
                       "the dense layers keep Adam with --lr")
    group.add_argument("--embedding-lr", type=float, default=DEFAULT_EMBEDDING_LR,
                       help="the tables' learning rate")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (WORLD_SIZE is set in
    the environment)."""
    return "WORLD_SIZE" in os.environ   # set by torchrun for every process it starts


def requested(args: argparse.Namespace) -> bool:
    """Whether a parsed train command runs the TorchRec model: --sharding was
    given, or the command runs under torchrun.

    Args:
        args: the parsed ``din-fast train`` arguments (its ``sharding``).

    Returns:
        True for sharded training.
    """
    return args.sharding is not None or under_torchrun()
