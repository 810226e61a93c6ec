"""Checkpoints: what ``din-fast train --checkpoint`` writes, and loading one as
untrusted input.

A checkpoint is a ``torch.save`` dict: ``format``, ``config`` (TrainConfig's
fields), ``id_maps`` (the raw string ids in encoding order, as UTF-8 bytes and
offsets, each item's category, the side features' values and the numeric
ones' standardization, the rare items sharing the reserved row with their
categories, a labeled log's rare categories and feature values, and the
``fingerprint`` of it all) and the model's
``state_dict``. A run state file (:func:`resume_path`, written after every
epoch) adds ``run``: what ``din-fast train --resume`` continues from. Saving
goes through din_fast.ctr.files (a temporary file renamed into place: a reader,
or a crash, never sees half a checkpoint). Loading reads the whole file into
memory with ``weights_only=True`` (no code runs; not memory-mapped, so a file
rewritten or truncated afterwards changes nothing the caller holds), then
checks every part against the others (config values, id maps, the shape and
dtype of every tensor, finite values) before anything is allocated from them.
Errors say what was expected and never quote the file's contents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .config import TrainConfig, config_problems, model_for
from .data import IdMaps
from .errors import CheckpointError, snippet
from .files import open_replacing

CHECKPOINT_FORMAT = "din_fast.checkpoint/6"
# Formats this version reads: 3 lacks what 4 added (labeled logs, side
# features, run states, fingerprints), 4 what 5 added (the DIN protocol's
# rare ids: the rare items in the id maps; the attention's and the MLP's
# widths in the config), 5 what 6 added (a labeled log's rare ids: its rare
# items, categories and feature values), which it reads as their defaults
# (none listed). A version that reads 5 would take a file of 6 as altered
# (the fingerprint covers the rare ids), hence the new number.
READABLE_FORMATS = ("din_fast.checkpoint/3", "din_fast.checkpoint/4", "din_fast.checkpoint/5",
                    CHECKPOINT_FORMAT)
WRITTEN_BY = "a file written by din-fast train --checkpoint"
ADDED_CONFIG_FIELDS = {"compile": None, "top_k": None, "search": "din", "label_column": None,
                       "features": (), "numeric_features": (), "feature_dim": None,
                       "validation_fraction": 0.1, "test_fraction": 0.1, "min_count": 1,
                       "linear": False, "linear_lr": None, "attention_hidden": (80, 40),
                       "mlp_hidden": (200, 80), "ema": None, "history_cross": 0,
                       "history_cross_lr": None}
# A field added with a default that leaves training as it was (``ema``,
# ``linear_lr``) needs no new format: older files read with it, and an older
# version refuses a newer file as one of another version (a config field it
# lacks) rather than misreading it.
RUN_STATE_SUFFIX = ".run"


@dataclass
class RunState:
    """A run after ``epoch`` epochs, all --resume needs to go on as if never
    stopped: the epochs' records, the best one and its weights, and the
    learner's state (optimizer, learning-rate schedule, random streams).

    Args:
        epoch: the epochs finished, >= 1.
        epochs: their records, one dict per epoch (``epoch``,
            ``validation_auc``, ``validation_gauc``, ``validation_logloss``,
            ``train_loss``, ``lr``, ``epoch_seconds``, ``samples_per_second``).
        best: the record of the best epoch so far (by validation GAUC), one
            of ``epochs``.
        best_weights: that epoch's model state dict.
        learner: the learner's ``state_dict()`` (din_fast.ctr.training.Learner:
            ``optimizer``, ``schedule``, ``batch_rng``, ``torch_rng``; with
            ``config.ema``, ``average`` too: the weight average's
            ``weights`` and ``steps``, din_fast.ctr.weight_average).
    """

    epoch: int
    epochs: list
    best: dict
    best_weights: dict
    learner: dict


@dataclass
class Checkpoint:
    """A checkpoint as :func:`load_checkpoint` returns it, every part checked.

    Args:
        config: the run's TrainConfig (fields added since an older format
            hold the values that format was trained with).
        id_maps: the din_fast.ctr.data.IdMaps the model's tables index.
        state_dict: the model's weights, {name: CPU tensor}, exactly the
            tensors of ``model_for(config, id_maps)``.
        run: the run state of a file ``resume_path`` names (what --resume
            continues from); None for a best-epoch checkpoint.
    """

    config: TrainConfig
    id_maps: IdMaps
    state_dict: dict
    run: Optional[RunState] = None


def resume_path(checkpoint) -> str:
    """Where a run with ``--checkpoint din.pt`` writes its run state:
    ``din.run.pt`` (the suffix kept, as torch files are named).

    Args:
        checkpoint: the --checkpoint path, a str or os.PathLike.

    Returns:
        The run state's path, a str beside ``checkpoint``.
    """
    path = Path(checkpoint)
    return str(path.with_name(path.stem + RUN_STATE_SUFFIX + path.suffix))


def save_checkpoint(path, model: torch.nn.Module, id_maps: IdMaps, config: TrainConfig,
                    run: Optional[RunState] = None, option: str = "--checkpoint"):
    """Write a checkpoint of ``model`` atomically (see :func:`save_weights`).

    Args:
        path: the file to write, a str or os.PathLike.
        model: the trained din_fast.DIN or BaseModel (its ``state_dict``
            is saved, on whatever device it is).
        id_maps: the din_fast.ctr.data.IdMaps its tables index.
        config: the run's TrainConfig.
        run: the RunState to save with it (a run state file), or None.
        option: the option ``path`` came from, named in errors.

    Raises:
        din_fast.ctr.errors.OutputError: the file cannot be written (the
            file at ``path`` is then unchanged).
    """
    save_weights(path, model.state_dict(), id_maps, config, run, option)


def save_weights(path, weights: dict, id_maps: IdMaps, config: TrainConfig,
                 run: Optional[RunState] = None, option: str = "--checkpoint"):
    """Write a checkpoint of a model's weights atomically
    (din_fast.ctr.files.replacing): the file at ``path`` is the old one or
    the new one, never part of one.

    Args:
        path: the file to write, a str or os.PathLike.
        weights: the state dict of the config's model (a snapshot the
            training loop took: a run's best epoch).
        id_maps: the din_fast.ctr.data.IdMaps its tables index.
        config: the run's TrainConfig.
        run: the RunState to save with it (a run state file), or None.
        option: the option ``path`` came from, named in errors.

    Raises:
        din_fast.ctr.errors.OutputError: the file cannot be written (the
            file at ``path`` is then unchanged).
    """
    state = {"format": CHECKPOINT_FORMAT, "config": asdict(config),
             "id_maps": _id_maps_state(id_maps), "state_dict": weights}
    if run is not None:
        state["run"] = asdict(run)
    with open_replacing(path, option, "wb") as handle:
        torch.save(state, handle)


def save_run_state(path, model: torch.nn.Module, id_maps: IdMaps, config: TrainConfig,
                   run: RunState):
    """Write the run state file: a checkpoint of the latest epoch's model
    with ``run`` (see :func:`save_checkpoint`).

    Args:
        path: the file to write, ``resume_path(checkpoint)``.
        model: the model after the latest epoch.
        id_maps: the din_fast.ctr.data.IdMaps its tables index.
        config: the run's TrainConfig.
        run: the run after that epoch.

    Raises:
        din_fast.ctr.errors.OutputError: the file cannot be written.
    """
    save_checkpoint(path, model, id_maps, config, run, "--checkpoint's run state")


def _id_maps_state(id_maps: IdMaps) -> dict:
    state = {"item_ids": _strings_state(id_maps.item_ids), "unknown": id_maps.unknown,
             "features": {name: _strings_state(values)
                          for name, values in id_maps.features.items()},
             "numeric": {name: torch.tensor(stats, dtype=torch.float64)
                         for name, stats in id_maps.numeric.items()},
             "fingerprint": id_maps.fingerprint()}
    if id_maps.category_ids is not None:
        state.update(category_ids=_strings_state(id_maps.category_ids),
                     item_category=torch.from_numpy(id_maps.item_category))
    if id_maps.rare_items is not None:
        state["rare_items"] = _strings_state(id_maps.rare_items)
        if id_maps.category_ids is not None:
            state["rare_item_category"] = torch.from_numpy(id_maps.rare_item_category)
    if id_maps.rare_categories is not None:
        state["rare_categories"] = _strings_state(id_maps.rare_categories)
    if id_maps.rare_features:
        state["rare_features"] = {name: _strings_state(values)
                                  for name, values in id_maps.rare_features.items()}
    return state


def load_checkpoint(path) -> Checkpoint:
    """Load a checkpoint as untrusted input, every part checked.

    The file is read whole with ``weights_only=True`` (no code runs), then
    the config, the id maps, every tensor's shape, dtype and values and the
    run state are checked against each other before the caller gets them.
    Files of an older format read with what later formats added at its
    defaults (READABLE_FORMATS).

    Args:
        path: a file ``din-fast train --checkpoint`` (or its run state)
            wrote, a str or os.PathLike.

    Returns:
        The Checkpoint, its tensors on the CPU.

    Raises:
        din_fast.ctr.errors.CheckpointError: the file is missing or not a
            regular file, not a torch file, of another din-fast version or
            not a din_fast checkpoint, or a part of it is invalid or does not
            fit the others (the message says which part, never quoting the
            file's contents).
    """
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.exists():
        raise CheckpointError(f"{where} does not exist; expected {WRITTEN_BY}")
    if not path.is_file():
        raise CheckpointError(f"{where} is not a regular file; expected {WRITTEN_BY}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as error:  # noqa: BLE001 - any bytes reach the unpickler; name the kind only
        raise CheckpointError(f"{where}: not a readable torch checkpoint "
                              f"({type(error).__name__}); expected {WRITTEN_BY}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if isinstance(found, str) and found.startswith(CHECKPOINT_FORMAT.rpartition("/")[0] + "/") \
            and found not in READABLE_FORMATS:
        raise CheckpointError(f"{where}: written by another version of din-fast (format "
                              f"{snippet(found)}); this one reads formats "
                              f"{', '.join(map(repr, READABLE_FORMATS))}: train again with it")
    if found not in READABLE_FORMATS:
        raise CheckpointError(f"{where}: not a din_fast checkpoint (expected a dict with "
                              f"format {CHECKPOINT_FORMAT!r}, {WRITTEN_BY})")
    config = _checked_config(state.get("config"), where)
    id_maps = _checked_id_maps(state.get("id_maps"), where, config)
    with torch.device("meta"):
        # The model the config and id maps describe, on the meta device: shapes
        # and dtypes without allocating a byte, whatever sizes the file claims.
        expected = model_for(config, id_maps)
    state_dict = _checked_state_dict(state.get("state_dict"), expected.state_dict(), where)
    run = None if state.get("run") is None else _checked_run(state["run"], expected, where,
                                                             config.ema is not None)
    return Checkpoint(config, id_maps, state_dict, run)


def restored_model(checkpoint: Checkpoint, config: TrainConfig) -> torch.nn.Module:
    """The checkpoint's model with its weights.

    Args:
        checkpoint: a Checkpoint from :func:`load_checkpoint`.
        config: the TrainConfig to build it by: the checkpoint's, with the
            backend and device of this run
            (din_fast.ctr.training.checkpoint_for_run gives both).

    Returns:
        The din_fast.DIN or BaseModel on ``config.device``, in eval mode.
    """
    model = model_for(config, checkpoint.id_maps)
    model.load_state_dict(checkpoint.state_dict)
    return model.to(config.device).eval()


def _checked_config(values, where: str) -> TrainConfig:
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: `config` must be a dict of TrainConfig's fields")
    # A field added since this format was fixed is absent from older files:
    # its value there is the one they were trained with.
    values = {**ADDED_CONFIG_FIELDS, **values}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:     # counted, not listed: a file's own strings are never quoted, and
        # TrainConfig's fields have grown past one line
        raise CheckpointError(f"{where}: `config` has {len(unknown)} field(s) TrainConfig "
                              "does not have; it was written by another version of din-fast "
                              "or altered")
    for name, expected in config_problems(values):
        raise CheckpointError(f"{where}: config field `{name}` must be {expected}")
    return TrainConfig(**values)


def _strings_state(array: pa.Array) -> dict:
    """Strings as two tensors (weights_only loads nothing else): UTF-8 bytes
    back to back and int64 offsets, string i being bytes[offsets[i]:offsets[i+1]]."""
    array = array.cast(pa.large_string())
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset:
                                                                 array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2] or b"", dtype=np.uint8)[offsets[0]:offsets[-1]]
    return {"offsets": torch.from_numpy(offsets - offsets[0]),
            "bytes": torch.from_numpy(data.copy())}


def _checked_strings(state, name: str, where: str) -> pa.Array:
    """The sorted, repeat-free list of strings id_maps[name] holds."""
    expected = (f"{where}: id_maps[{name!r}] must be {{'offsets': int64 tensor, 'bytes': "
                "uint8 tensor}} holding UTF-8 ids, sorted, without repeats")
    if not isinstance(state, dict):
        raise CheckpointError(expected)
    offsets, data = state.get("offsets"), state.get("bytes")
    if not (isinstance(offsets, torch.Tensor) and offsets.dtype == torch.int64
            and offsets.dim() == 1 and len(offsets) >= 1 and isinstance(data, torch.Tensor)
            and data.dtype == torch.uint8 and data.dim() == 1 and offsets[0] == 0
            and offsets[-1] == len(data) and bool((offsets[1:] >= offsets[:-1]).all())):
        raise CheckpointError(expected)
    array = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets.numpy()),
                                             pa.py_buffer(data.numpy()))
    try:
        array.validate(full=True)
    except pa.ArrowInvalid:
        raise CheckpointError(expected) from None
    # Encoding looks ids up in these maps, so order and uniqueness are meaning.
    if len(array) > 1 and not pc.all(pc.greater(array[1:], array[:-1])).as_py():
        raise CheckpointError(expected)
    return array.cast(pa.string())


def _checked_id_maps(state, where: str, config: TrainConfig) -> IdMaps:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: `id_maps` must be a dict")
    unknown = state.get("unknown", False)
    if not isinstance(unknown, bool):
        raise CheckpointError(f"{where}: id_maps['unknown'] must be True or False")
    item_ids = _checked_strings(state.get("item_ids"), "item_ids", where)
    category_ids = item_category = None
    if state.get("category_ids") is not None or state.get("item_category") is not None:
        category_ids = _checked_strings(state.get("category_ids"), "category_ids", where)
        item_category = state.get("item_category")
        num_items, num_categories = len(item_ids), len(category_ids) + unknown
        if (not isinstance(item_category, torch.Tensor) or item_category.dtype != torch.int64
                or item_category.shape != (num_items + 1,) or item_category[0] != 0
                or not bool(((item_category[1:] >= 1)
                             & (item_category[1:] <= num_categories)).all())):
            raise CheckpointError(f"{where}: id_maps['item_category'] must be an int64 tensor "
                                  f"holding 0 (the padding) and then one category in "
                                  f"1..{num_categories} for each of the {num_items} items")
        item_category = item_category.numpy()
    features, numeric = state.get("features", {}), state.get("numeric", {})
    if not isinstance(features, dict) or list(features) != list(config.features):
        raise CheckpointError(f"{where}: id_maps['features'] must map each of the config's "
                              f"features {list(config.features)} to its values, in that order")
    features = {name: _checked_strings(values, f"features/{name}", where)
                for name, values in features.items()}
    if not isinstance(numeric, dict) or list(numeric) != list(config.numeric_features) or not \
            all(isinstance(v, torch.Tensor) and v.dtype == torch.float64 and v.shape == (2,)
                and bool(torch.isfinite(v).all()) and v[1] > 0 for v in numeric.values()):
        raise CheckpointError(f"{where}: id_maps['numeric'] must map each of the config's "
                              f"numeric features {list(config.numeric_features)} to a float64 "
                              "tensor [mean, standard deviation > 0]")
    rare_items, rare_item_category = _checked_rare_items(state, where, item_ids, category_ids,
                                                         unknown)
    rare_categories = None
    if state.get("rare_categories") is not None:
        if category_ids is None:
            raise CheckpointError(f"{where}: id_maps['rare_categories'] without "
                                  "id_maps['category_ids']")
        rare_categories = _checked_rare_ids(state["rare_categories"], "rare_categories",
                                            category_ids, unknown, where)
    rare_features = state.get("rare_features", {})
    if not isinstance(rare_features, dict) or not set(rare_features) <= set(features):
        raise CheckpointError(f"{where}: id_maps['rare_features'] must map some of the "
                              f"config's features {list(config.features)} to their rare values")
    rare_features = {name: _checked_rare_ids(rare_features[name], f"rare_features/{name}",
                                             values, unknown, where)
                     for name, values in features.items() if name in rare_features}
    id_maps = IdMaps(item_ids, category_ids, item_category, unknown, features,
                     {name: tuple(v.tolist()) for name, v in numeric.items()}, rare_items,
                     rare_item_category, rare_categories, rare_features)
    recorded = state.get("fingerprint")
    if recorded is not None and recorded != id_maps.fingerprint():
        raise CheckpointError(f"{where}: its id maps do not match the fingerprint recorded with "
                              f"them (the file was altered); expected {WRITTEN_BY}")
    return id_maps


def _checked_rare_items(state: dict, where: str, item_ids: pa.Array,
                        category_ids: Optional[pa.Array], unknown: bool) -> tuple:
    """(rare_items, rare_item_category) of the id maps' state: none, or
    items the maps do not hold with one category each (the reserved one
    included), where the maps have the reserved row they share."""
    if state.get("rare_items") is None:
        if state.get("rare_item_category") is not None:
            raise CheckpointError(f"{where}: id_maps['rare_item_category'] without "
                                  "id_maps['rare_items']")
        return None, None
    rare_items = _checked_rare_ids(state["rare_items"], "rare_items", item_ids, unknown, where)
    if category_ids is None:
        return rare_items, None
    category = state.get("rare_item_category")
    highest = len(category_ids) + 1
    if not (isinstance(category, torch.Tensor) and category.dtype == torch.int64
            and category.shape == (len(rare_items),)
            and bool(((category >= 1) & (category <= highest)).all())):
        raise CheckpointError(f"{where}: id_maps['rare_item_category'] must be an int64 tensor "
                              f"holding one category in 1..{highest} for each of the "
                              f"{len(rare_items)} rare items")
    return rare_items, category.numpy()


def _checked_rare_ids(state, name: str, own: pa.Array, unknown: bool, where: str) -> pa.Array:
    """The rare ids id_maps[name] holds: strings (as _checked_strings) that
    are not the map's ``own`` ids, sharing the reserved row (``unknown``)."""
    rare = _checked_strings(state, name, where)
    if not unknown or pc.any(pc.is_in(rare, value_set=own)).as_py():
        raise CheckpointError(f"{where}: id_maps[{name!r}] must be ids the maps do not hold "
                              "as their own, sharing their reserved row (id_maps['unknown'] "
                              "True)")
    return rare


def _checked_state_dict(state, expected: dict, where: str, name: str = "state_dict") -> dict:
    """``state`` holding exactly the tensors of ``expected`` (a state dict
    on the meta device), finite, variances not negative."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{where}: `{name}` must be a dict of named tensors")
    if set(state) != set(expected):
        raise CheckpointError(f"{where}: `{name}` does not hold the tensors of its config's "
                              f"model ({len(set(expected) - set(state))} missing, "
                              f"{len(set(state) - set(expected))} unexpected)")
    for key, want in expected.items():
        tensor = state[key]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(f"{where}: {name}[{key!r}] must be {want.dtype} of shape "
                                  f"{list(want.shape)} for its config and id maps")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: {name}[{key!r}] holds NaN or Inf")
        if key.rpartition(".")[2].startswith("running_var") and bool((tensor < 0).any()):
            raise CheckpointError(f"{where}: {name}[{key!r}] holds a negative variance")
    return state


RECORD_KEYS = ("epoch", "validation_auc", "validation_gauc", "validation_logloss", "train_loss",
               "lr", "epoch_seconds", "samples_per_second")


def _checked_run(state, model: torch.nn.Module, where: str, averaged: bool) -> RunState:
    """A run state's structure: the epochs' records (epoch 1 on, numbers),
    the best among them, its weights as the model's, the learner's parts
    (whose contents the learner checks as it loads them), among them the
    weight average's (weights as the model's) where the run ``averaged``."""
    expected = f"{where}: `run` must be the run state din-fast train writes after an epoch"
    if not isinstance(state, dict) or set(state) != {f.name for f in fields(RunState)}:
        raise CheckpointError(expected)
    epoch, epochs, best = state["epoch"], state["epochs"], state["best"]
    if not (type(epoch) is int and epoch >= 1 and isinstance(epochs, list)
            and len(epochs) == epoch and isinstance(best, dict)):
        raise CheckpointError(f"{expected} (epoch, its records, the best)")
    for number, record in enumerate(epochs, start=1):
        if not (isinstance(record, dict) and set(RECORD_KEYS) <= set(record)
                and record["epoch"] == number
                and all(type(record[k]) in (int, float) for k in RECORD_KEYS)):
            raise CheckpointError(f"{expected} (the record of epoch {number})")
    if best not in epochs:
        raise CheckpointError(f"{expected} (the best epoch among the records)")
    best_weights = _checked_state_dict(state["best_weights"], model.state_dict(), where,
                                       "run.best_weights")
    learner = state["learner"]
    parts = {"optimizer", "schedule", "batch_rng", "torch_rng"} | ({"average"} if averaged
                                                                   else set())
    if not (isinstance(learner, dict) and set(learner) == parts
            and all(isinstance(learner[k], dict) for k in ("optimizer", "schedule",
                                                           "batch_rng"))
            and isinstance(learner["torch_rng"], torch.Tensor)):
        raise CheckpointError(f"{expected} (the optimizer, schedule and random states"
                              f"{', the weight average' if averaged else ''})")
    if averaged:
        average = learner["average"]
        if not (isinstance(average, dict) and set(average) == {"weights", "steps"}
                and type(average["steps"]) is int and average["steps"] >= 0):
            raise CheckpointError(f"{expected} (the weight average: its weights and steps)")
        _checked_state_dict(average["weights"], model.state_dict(), where,
                            "run.learner.average.weights")
    return RunState(epoch, epochs, best, best_weights, learner)
