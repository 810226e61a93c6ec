"""Checkpoints: what ``din-fast train --checkpoint`` writes, and loading one as
untrusted input.

A checkpoint is a ``torch.save`` dict: ``format``, ``config`` (TrainConfig's
fields), ``id_maps`` (the raw string ids in encoding order, as UTF-8 bytes and
offsets, and each item's category) and the model's ``state_dict``. Saving
goes through din_fast.files (a temporary file renamed into place: a reader,
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .config import TrainConfig, build_model, config_problems
from .data import IdMaps
from .errors import CheckpointError, snippet
from .files import open_replacing

CHECKPOINT_FORMAT = "din_fast.checkpoint/3"
WRITTEN_BY = "a file written by din-fast train --checkpoint"
ADDED_CONFIG_FIELDS = {"compile": None, "top_k": None, "search": "din"}


@dataclass
class Checkpoint:
    config: TrainConfig
    id_maps: IdMaps
    state_dict: dict


def save_checkpoint(path, model: torch.nn.Module, id_maps: IdMaps, config: TrainConfig):
    """Write the checkpoint atomically (din_fast.files.replacing); OutputError
    when it cannot be written, the file at ``path`` unchanged."""
    with open_replacing(path, "--checkpoint", "wb") as handle:
        torch.save({"format": CHECKPOINT_FORMAT, "config": asdict(config),
                    "id_maps": {"item_ids": _strings_state(id_maps.item_ids),
                                "category_ids": _strings_state(id_maps.category_ids),
                                "item_category": torch.from_numpy(id_maps.item_category)},
                    "state_dict": model.state_dict()}, handle)


def load_checkpoint(path) -> Checkpoint:
    """The checkpoint at ``path``, every part checked; CheckpointError otherwise."""
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
            and found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where}: written by another version of din-fast (format "
                              f"{snippet(found)}); this one reads format "
                              f"{CHECKPOINT_FORMAT!r}: train again with it")
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where}: not a din_fast checkpoint (expected a dict with "
                              f"format {CHECKPOINT_FORMAT!r}, {WRITTEN_BY})")
    config = _checked_config(state.get("config"), where)
    id_maps = _checked_id_maps(state.get("id_maps"), where)
    state_dict = _checked_state_dict(state.get("state_dict"), config, id_maps, where)
    return Checkpoint(config, id_maps, state_dict)


def restored_model(checkpoint: Checkpoint, config: TrainConfig) -> torch.nn.Module:
    """The checkpoint's model with its weights, built by ``config`` (the
    checkpoint's, with the backend and device of this run), on config.device
    and in eval mode."""
    model = build_model(config, len(checkpoint.id_maps.item_ids),
                        len(checkpoint.id_maps.category_ids))
    model.load_state_dict(checkpoint.state_dict)
    return model.to(config.device).eval()


def _checked_config(values, where: str) -> TrainConfig:
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: `config` must be a dict of TrainConfig's fields")
    # A field added since this format was fixed is absent from older files:
    # its value there is the one they were trained with.
    values = {**ADDED_CONFIG_FIELDS, **values}
    known = {f.name for f in fields(TrainConfig)}
    if not set(values) <= known:
        raise CheckpointError(f"{where}: `config` has {len(set(values) - known)} field(s) "
                              f"TrainConfig does not have; expected only {sorted(known)}")
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
    """The sorted, repeat-free, non-empty list of strings id_maps[name] holds."""
    expected = (f"{where}: id_maps[{name!r}] must be {{'offsets': int64 tensor, 'bytes': "
                "uint8 tensor}} holding UTF-8 ids, sorted, without repeats")
    if not isinstance(state, dict):
        raise CheckpointError(expected)
    offsets, data = state.get("offsets"), state.get("bytes")
    if not (isinstance(offsets, torch.Tensor) and offsets.dtype == torch.int64
            and offsets.dim() == 1 and len(offsets) >= 2 and isinstance(data, torch.Tensor)
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


def _checked_id_maps(state, where: str) -> IdMaps:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: `id_maps` must be a dict")
    item_ids = _checked_strings(state.get("item_ids"), "item_ids", where)
    category_ids = _checked_strings(state.get("category_ids"), "category_ids", where)
    item_category = state.get("item_category")
    num_items, num_categories = len(item_ids), len(category_ids)
    if (not isinstance(item_category, torch.Tensor) or item_category.dtype != torch.int64
            or item_category.shape != (num_items + 1,) or item_category[0] != 0
            or not bool(((item_category[1:] >= 1) & (item_category[1:] <= num_categories)).all())):
        raise CheckpointError(f"{where}: id_maps['item_category'] must be an int64 tensor "
                              f"holding 0 (the padding) and then one category in "
                              f"1..{num_categories} for each of the {num_items} items")
    return IdMaps(item_ids, category_ids, item_category.numpy())


def _checked_state_dict(state, config: TrainConfig, id_maps: IdMaps, where: str) -> dict:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{where}: `state_dict` must be a dict of named tensors")
    # The model the config and id maps describe, on the meta device: shapes
    # and dtypes without allocating a byte, whatever sizes the file claims.
    with torch.device("meta"):
        expected = build_model(config, len(id_maps.item_ids),
                               len(id_maps.category_ids)).state_dict()
    if set(state) != set(expected):
        raise CheckpointError(f"{where}: `state_dict` does not hold the tensors of its config's "
                              f"model ({len(set(expected) - set(state))} missing, "
                              f"{len(set(state) - set(expected))} unexpected)")
    for name, want in expected.items():
        tensor = state[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise CheckpointError(f"{where}: state_dict[{name!r}] must be {want.dtype} of shape "
                                  f"{list(want.shape)} for its config and id maps")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where}: state_dict[{name!r}] holds NaN or Inf")
        if name.rpartition(".")[2].startswith("running_var") and bool((tensor < 0).any()):
            raise CheckpointError(f"{where}: state_dict[{name!r}] holds a negative variance")
    return state
