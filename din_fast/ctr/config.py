"""TrainConfig: every setting of a training run, how each is checked, and the
model a config describes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch

from din_fast.problem import ACTIVATIONS, BACKENDS
from din_fast.search import SEARCHES
from .errors import InputError
from .files import write_json
from .models import MLP_ACTIVATIONS, MLP_INPUTS, MODELS

DEVICES = ("cpu", "cuda")
# torch.compile backends for --compile: inductor generates code (a C++
# compiler on CPU, Triton on CUDA); aot_eager and eager trace the same graphs
# and run them as they are (quick to compile: for checking).
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
ATTENTION_NORMALIZATIONS = (None, "softmax")
# The default learning rate depends on the data's mode, each measured across
# datasets (benchmarks/default_recipe.py, the training guide's "Checked across
# datasets"): by the DIN protocol 1e-3 (Beauty's recipe; 3e-4 lowered DIN's
# validation GAUC on a cold-start sample); on a labeled log 3e-4, where at
# 1e-3 the deep part overfits the training users in two epochs and the
# BaseModel caught up with DIN (MovieLens validation: DIN ahead at three seeds
# of three with 3e-4, two of three with 1e-3).
DIN_PROTOCOL_LR, LABELED_LOG_LR = 1e-3, 3e-4
# The history cross term's own Adam rate (HistoryCross): on MovieLens' labeled
# log, with the deep part at 4e-5 and the linear part at 0.024, 1e-3 raised
# the validation GAUC at every seed, where the linear part's rate overfit
# after one epoch (the labeled-logs guide).
HISTORY_CROSS_LR = 1e-3


def _positive_int(value) -> bool:
    return type(value) is int and value >= 1


def _positive_float(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _fraction(value) -> bool:
    return type(value) in (int, float) and 0 < value < 1


def _names(value) -> bool:
    return type(value) is tuple and all(type(v) is str and v for v in value)


def _widths(value) -> bool:
    return type(value) is tuple and len(value) >= 1 and all(map(_positive_int, value))


# field -> (accepts the value, what it must be)
FIELD_RULES = {
    "data": (lambda v: v is None or type(v) is str, "None (the synthetic set) or a path"),
    "model": (lambda v: v in MODELS, f"one of {tuple(MODELS)}"),
    "epochs": (_positive_int, "a positive integer"),
    "batch_size": (_positive_int, "a positive integer"),
    "lr": (_positive_float, "a finite number > 0"),
    "embed_dim": (_positive_int, "a positive integer"),
    "max_len": (lambda v: v is None or _positive_int(v), "None or a positive integer"),
    "seed": (lambda v: type(v) is int and 0 <= v < 2 ** 63, "an integer in [0, 2**63)"),
    "backend": (lambda v: v in BACKENDS, f"one of {BACKENDS}"),
    "device": (lambda v: v in DEVICES, f"one of {DEVICES}"),
    "attention_normalization": (lambda v: v in ATTENTION_NORMALIZATIONS,
                                f"one of {ATTENTION_NORMALIZATIONS}"),
    "patience": (_positive_int, "a positive integer"),
    "lr_decay": (lambda v: _positive_float(v) and v <= 1, "a number in (0, 1]"),
    "l2": (lambda v: _positive_float(v) or v == 0, "a finite number >= 0"),
    "attention_activation": (lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}"),
    "mlp_activation": (lambda v: v in MLP_ACTIVATIONS, f"one of {MLP_ACTIVATIONS}"),
    "mlp_input": (lambda v: v in MLP_INPUTS, f"one of {MLP_INPUTS}"),
    "compile": (lambda v: v is None or v in COMPILE_BACKENDS,
                f"None (eager) or one of {COMPILE_BACKENDS}"),
    "top_k": (lambda v: v is None or _positive_int(v), "None (exact DIN) or a positive integer"),
    "search": (lambda v: v in SEARCHES, f"one of {SEARCHES}"),
    "label_column": (lambda v: v is None or (type(v) is str and bool(v.strip())),
                     "None (the DIN protocol) or a column name"),
    "features": (_names, "a tuple of column names"),
    "numeric_features": (_names, "a tuple of column names"),
    "feature_dim": (lambda v: v is None or _positive_int(v), "None (embed_dim) or a positive "
                    "integer"),
    "validation_fraction": (_fraction, "a number in (0, 1)"),
    "test_fraction": (_fraction, "a number in (0, 1)"),
    "min_count": (_positive_int, "a positive integer"),
    "linear": (lambda v: type(v) is bool, "True or False"),
    "linear_lr": (lambda v: v is None or _positive_float(v), "None (lr) or a finite number > 0"),
    "history_cross": (lambda v: type(v) is int and v >= 0, "an integer >= 0 (0: none)"),
    "history_cross_lr": (lambda v: v is None or _positive_float(v),
                         "None (HISTORY_CROSS_LR) or a finite number > 0"),
    "attention_hidden": (_widths, "a tuple of positive integers (layer widths)"),
    "mlp_hidden": (_widths, "a tuple of positive integers (layer widths)"),
    "ema": (lambda v: v is None or (type(v) is float and 0 < v < 1),
            "None (no weight averaging) or a number in (0, 1)"),
}
# Fields holding tuples, which JSON (a --config file, a metrics file) holds as lists.
TUPLE_FIELDS = ("features", "numeric_features", "attention_hidden", "mlp_hidden")


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in checkpoints.

    Each field is a ``din-fast train`` option of the same name (``--batch-size``
    for ``batch_size``, ...), with the same default except ``device`` (the
    command's is cuda where there is one).
    ``label_column`` None reads behaviours by the DIN protocol (negatives
    sampled); a column name reads a labeled log
    (din_fast.ctr.labeled_samples), whose side ``features`` (categorical)
    and ``numeric_features`` the model takes, split by time into the
    ``test_fraction`` and ``validation_fraction`` latest rows. Lists given
    for the tuple fields (TUPLE_FIELDS) are kept as tuples.

    Args:
        data: the path, a str, of a CSV/TSV or Parquet file or an
            Amazon-layout directory (din_fast.ctr.loaders); None: the seeded
            synthetic set.
        model: "din" (attention pooling) or "base" (sum pooling).
        epochs: the most epochs to train, a positive int.
        patience: stop after this many epochs without a validation GAUC
            gain, a positive int.
        batch_size: training samples per step, a positive int (at least 2
            with ``mlp_activation`` "dice").
        lr: Adam's learning rate, a finite float > 0; None (the default)
            becomes DIN_PROTOCOL_LR (1e-3) by the DIN protocol and
            LABELED_LOG_LR (3e-4) on a labeled log (``label_column``).
        lr_decay: multiplies the learning rate after every epoch, in (0, 1].
        l2: the weight of the DIN paper's mini-batch aware L2 on the
            embeddings, a finite float >= 0 (0: none).
        embed_dim: the size of the item and of the category embedding each.
        max_len: keep the most recent ``max_len`` behaviours of each
            history; None keeps them all.
        seed: in [0, 2**63): seeds the weights, the negatives and the
            batches' order.
        backend: the attention backend, "auto", "triton", "torch" or
            "reference".
        device: "cpu" or "cuda".
        attention_normalization: "softmax" over the history or None (the
            paper's raw scores).
        attention_activation: the attention unit's, "sigmoid", "relu",
            "prelu" or "dice".
        mlp_activation: the scoring MLP's, "prelu" or "dice".
        mlp_input: "concat" ([interest, candidate]) or "product" (with
            interest * candidate appended).
        compile: None trains eagerly; else the torch.compile backend,
            "inductor", "aot_eager" or "eager".
        top_k: None (exact DIN) or K, two-stage attention over the K
            history items ``search`` ranks highest (``model`` "din" only).
        search: how ``top_k`` ranks the history: "din", "dot" or
            "category"; not "din" only with ``top_k``.
        label_column: None (the DIN protocol) or the 0/1 label's column of
            a labeled log.
        features: the labeled log's categorical side-feature columns, a
            tuple of names (needs ``label_column``).
        numeric_features: its numeric side-feature columns, likewise.
        feature_dim: each side feature's embedding size; None: ``embed_dim``.
        validation_fraction: the share of rows before the test rows that
            validates, in (0, 1) (labeled logs).
        test_fraction: the share of the latest rows that tests, in (0, 1);
            with ``validation_fraction`` below 1 (labeled logs).
        min_count: ids seen fewer times in the training split map to each
            table's reserved id, a positive int; by the DIN protocol 1 gives
            every id of the data its own row and no reserved one
            (din_fast.ctr.rare_ids).
        linear: add the models' linear part (a weight per id, summed into
            the logit).
        linear_lr: the linear part's learning rate (needs ``linear``);
            None: ``lr``.
        history_cross: the width of the models' history cross term
            (din_fast.ctr.models.HistoryCross: the candidate's factors
            against the mean of its history's, added to the logit); 0 for
            none.
        history_cross_lr: its learning rate (needs ``history_cross``);
            None: HISTORY_CROSS_LR.
        attention_hidden: the hidden widths of DIN's attention unit, a
            tuple of positive ints.
        mlp_hidden: the hidden widths of the scoring MLP, likewise.
        ema: None trains and keeps the weights as they are; a decay in
            (0, 1): an exponential moving average of the weights, moved
            ``1 - ema`` of the way to them after every optimizer step
            (din_fast.ctr.weight_average), is what validation, early
            stopping, the saved model and the test metrics use.

    Raises:
        din_fast.ctr.errors.InputError: a value of the wrong type or
            outside its range (the message names the field, see
            FIELD_RULES), or options that do not go together (``top_k``
            with model "base", a ``search`` other than "din" without
            ``top_k``, side features without ``label_column``,
            ``validation_fraction + test_fraction >= 1``, ``linear_lr``
            without ``linear``, ``history_cross_lr`` without
            ``history_cross``, ``batch_size`` 1 with Dice in the MLP).
    """

    data: Optional[str] = None
    model: str = "din"
    epochs: int = 30
    patience: int = 3
    batch_size: int = 256
    lr: Optional[float] = None
    lr_decay: float = 1.0
    l2: float = 0.1
    embed_dim: int = 32
    max_len: Optional[int] = 50
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    attention_normalization: Optional[str] = "softmax"
    attention_activation: str = "dice"
    mlp_activation: str = "dice"
    mlp_input: str = "concat"
    compile: Optional[str] = None
    top_k: Optional[int] = None
    search: str = "din"
    label_column: Optional[str] = None
    features: tuple = ()
    numeric_features: tuple = ()
    feature_dim: Optional[int] = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    min_count: int = 1
    linear: bool = False
    linear_lr: Optional[float] = None
    history_cross: int = 0
    history_cross_lr: Optional[float] = None
    attention_hidden: tuple = (80, 40)
    mlp_hidden: tuple = (200, 80)
    ema: Optional[float] = None

    def __post_init__(self):
        if self.lr is None:
            self.lr = DIN_PROTOCOL_LR if self.label_column is None else LABELED_LOG_LR
        for name in TUPLE_FIELDS:   # a list reads as the tuple it means
            if type(getattr(self, name)) is list:
                setattr(self, name, tuple(getattr(self, name)))
        for name, expected in config_problems(vars(self)):
            raise InputError(f"TrainConfig: `{name}` must be {expected}; "
                             f"got {getattr(self, name)!r}")
        if self.top_k is not None and self.model != "din":
            raise InputError(f"TrainConfig: `top_k` is DIN's two-stage attention; model "
                             f"{self.model!r} has no attention (got top_k {self.top_k})")
        if self.search != "din" and self.top_k is None:
            raise InputError(f"TrainConfig: `search` {self.search!r} is the first stage of "
                             "two-stage attention; it needs `top_k`")
        if self.label_column is None:
            given = [name for name in ("features", "numeric_features") if getattr(self, name)]
            if given:
                raise InputError(f"TrainConfig: `{given[0]}` needs `label_column`: side "
                                 "features belong to the rows of a labeled log (the DIN "
                                 "protocol samples negatives, which have none)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise InputError(f"TrainConfig: `validation_fraction` + `test_fraction` must be "
                             f"below 1 (the rest trains); got {self.validation_fraction} + "
                             f"{self.test_fraction}")
        if self.linear_lr is not None and not self.linear:
            raise InputError(f"TrainConfig: `linear_lr` is the linear part's learning rate; it "
                             f"needs `linear` True (got linear_lr {self.linear_lr})")
        if self.history_cross_lr is not None and not self.history_cross:
            raise InputError(f"TrainConfig: `history_cross_lr` is the history cross term's "
                             f"learning rate; it needs `history_cross` > 0 (got "
                             f"history_cross_lr {self.history_cross_lr}): give --history-cross "
                             f"DIM, or leave out --history-cross-lr (and history_cross_lr "
                             f"from a --config file)")
        if self.mlp_activation == "dice" and self.batch_size < 2:
            raise InputError(f"TrainConfig: `batch_size` must be at least 2 with mlp_activation "
                             f"'dice' (its batch normalization needs two rows); "
                             f"got {self.batch_size}")


def config_problems(values: dict, complete: bool = True) -> list:
    """The fields of TrainConfig that ``values`` lacks or holds an invalid
    value for (each field alone; the rules between fields are TrainConfig's).

    Args:
        values: {field name: value}, a TrainConfig's ``vars`` or a saved
            config's dict; keys that are not fields are not looked at.
        complete: whether every field must be there (a saved config); False
            checks the fields given (a --config file).

    Returns:
        [(field, what it must be)]: "present" for a missing field, else the
        rule's description ("a positive integer", ...); empty when all hold.
    """
    problems = [(f.name, "present") for f in fields(TrainConfig)
                if complete and f.name not in values]
    problems += [(name, expected) for name, (accepts, expected) in FIELD_RULES.items()
                 if name in values and not accepts(values[name])]
    return problems


def read_config_file(path, option: str = "--config") -> dict:
    """The TrainConfig fields a JSON file sets: an object {field: value},
    any of the fields (what ``din-fast tune`` writes: all of them); lists
    stand for tuples.

    Args:
        path: the JSON file (``din-fast train --config``).
        option: the option that named it, for messages.

    Returns:
        {field: value}, each value valid on its own (the rules between
        fields are TrainConfig's, checked once the command line joins them).

    Raises:
        din_fast.ctr.errors.InputError: a file that cannot be read, is not
            a JSON object, names a field TrainConfig lacks or holds an
            invalid value (naming the file and the field).
    """
    expected = "expected a JSON object {setting: value} of din-fast train's settings"
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{option} {path}: cannot be read ({error.strerror or error}); "
                         f"{expected}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InputError(f"{option} {path}: not JSON text; {expected}") from None
    if not isinstance(values, dict):
        raise InputError(f"{option} {path}: holds a JSON {type(values).__name__}; {expected}")
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise InputError(f"{option} {path}: {unknown[0]!r} is not a setting of din-fast train; "
                         f"{expected} (such as {', '.join(names[:4])}, ...)")
    values = {name: tuple(value) if name in TUPLE_FIELDS and isinstance(value, list) else value
              for name, value in values.items()}
    for name, must in config_problems(values, complete=False):
        raise InputError(f"{option} {path}: `{name}` must be {must}; got {values[name]!r}")
    return values


def write_config_file(path, config: TrainConfig, option: str) -> None:
    """``config`` as the JSON file :func:`read_config_file` reads,
    written atomically (din_fast.ctr.files).

    Args:
        path: the file to write.
        config: the TrainConfig to write.
        option: the option that named the path, for messages.

    Raises:
        din_fast.ctr.errors.OutputError: the file cannot be written (the
            one at ``path`` is then unchanged).
    """
    write_json(path, asdict(config), option)


def build_model(config: TrainConfig, num_items: int, num_categories: int,
                feature_sizes: Optional[dict] = None) -> torch.nn.Module:
    """The untrained model of ``config``, on the current default device.

    Args:
        config: the run's settings (model, embed_dim, the activations, the
            attention's options, side features, linear part).
        num_items: the item table's ids beyond the padding.
        num_categories: the category table's; 0 for no category table.
        feature_sizes: {side feature: its ids beyond the padding}, one
            table each; None for none.

    Returns:
        din_fast.DIN or din_fast.BaseModel (``config.model``), in training
        mode.

    Raises:
        ValueError: from the model's constructor, for options it cannot
            build (the "category" search without categories, say);
            TrainConfig has checked the rest.
    """
    options = {"attention_normalization": config.attention_normalization,
               "attention_activation": config.attention_activation,
               "top_k": config.top_k, "search": config.search} \
        if config.model == "din" else {}
    if config.model == "din":
        options["attention_hidden"] = config.attention_hidden
    return MODELS[config.model](num_items, num_categories, embed_dim=config.embed_dim,
                                mlp_hidden=config.mlp_hidden,
                                mlp_activation=config.mlp_activation, backend=config.backend,
                                mlp_input=config.mlp_input, features=feature_sizes,
                                numeric_features=len(config.numeric_features),
                                feature_dim=config.feature_dim, linear=config.linear,
                                history_cross=config.history_cross,
                                **options)


def model_for(config: TrainConfig, id_maps) -> torch.nn.Module:
    """build_model for the tables of ``id_maps``.

    Args:
        config: the run's settings.
        id_maps: a din_fast.ctr.data.IdMaps (of the data or of a
            checkpoint): its items, categories and side features size the
            tables.

    Returns:
        The untrained din_fast.DIN or din_fast.BaseModel.
    """
    return build_model(config, id_maps.num_items, id_maps.num_categories,
                       id_maps.feature_sizes())
