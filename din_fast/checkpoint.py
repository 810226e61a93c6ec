"""Checkpoints: what ``din-fast train --checkpoint`` writes, and loading one as
untrusted input.

A checkpoint is a ``torch.save`` dict: ``format``, ``config`` (TrainConfig's
fields), ``id_maps`` (raw ids in encoding order, each item's category) and the
model's ``state_dict``. Loading reads it with ``weights_only=True`` (no code
runs) and memory-mapped, then checks every part against the others (config
values, id maps, the shape and dtype of every tensor, finite values) before
anything is allocated from them. Errors say what was expected and never quote
the file's contents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .config import TrainConfig, build_model, config_problems
from .data import IdMaps
from .errors import CheckpointError

CHECKPOINT_FORMAT = "din_fast.checkpoint/2"
WRITTEN_BY = "a file written by din-fast train --checkpoint"


@dataclass
class Checkpoint:
    config: TrainConfig
    id_maps: IdMaps
    state_dict: dict


def save_checkpoint(path, model: torch.nn.Module, id_maps: IdMaps, config: TrainConfig):
    torch.save({"format": CHECKPOINT_FORMAT, "config": asdict(config),
                "id_maps": id_maps.to_state(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path) -> Checkpoint:
    """The checkpoint at ``path``, every part checked; CheckpointError otherwise."""
    path = Path(path)
    where = f"checkpoint {path}"
    if not path.exists():
        raise CheckpointError(f"{where} does not exist; expected {WRITTEN_BY}")
    if not path.is_file():
        raise CheckpointError(f"{where} is not a regular file; expected {WRITTEN_BY}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any bytes reach the unpickler; name the kind only
        raise CheckpointError(f"{where}: not a readable torch checkpoint "
                              f"({type(error).__name__}); expected {WRITTEN_BY}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where}: not a din_fast checkpoint (expected a dict with "
                              f"format {CHECKPOINT_FORMAT!r}, {WRITTEN_BY})")
    config = _checked_config(state.get("config"), where)
    id_maps = _checked_id_maps(state.get("id_maps"), where)
    state_dict = _checked_state_dict(state.get("state_dict"), config, id_maps, where)
    return Checkpoint(config, id_maps, state_dict)


def _checked_config(values, where: str) -> TrainConfig:
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: `config` must be a dict of TrainConfig's fields")
    known = {f.name for f in fields(TrainConfig)}
    if not set(values) <= known:
        raise CheckpointError(f"{where}: `config` has {len(set(values) - known)} field(s) "
                              f"TrainConfig does not have; expected only {sorted(known)}")
    for name, expected in config_problems(values):
        raise CheckpointError(f"{where}: config field `{name}` must be {expected}")
    return TrainConfig(**values)


def _id_tensor(state: dict, name: str, where: str) -> torch.Tensor:
    tensor = state.get(name)
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tensor.dim() != 1:
        raise CheckpointError(f"{where}: id_maps[{name!r}] must be a 1-D int64 tensor")
    return tensor


def _checked_id_maps(state, where: str) -> IdMaps:
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: `id_maps` must be a dict of tensors")
    raw = {}
    for name in ("item_ids", "category_ids"):
        ids = _id_tensor(state, name, where)
        if len(ids) == 0 or not bool((ids[1:] > ids[:-1]).all()):
            # Encoding looks raw ids up by binary search: order is meaning.
            raise CheckpointError(f"{where}: id_maps[{name!r}] must be non-empty, sorted and "
                                  "without repeats")
        raw[name] = ids
    item_category = _id_tensor(state, "item_category", where)
    num_items, num_categories = len(raw["item_ids"]), len(raw["category_ids"])
    if (len(item_category) != num_items + 1 or item_category[0] != 0
            or not bool(((item_category[1:] >= 1) & (item_category[1:] <= num_categories)).all())):
        raise CheckpointError(f"{where}: id_maps['item_category'] must hold 0 (the padding) and "
                              f"then one category in 1..{num_categories} for each of the "
                              f"{num_items} items")
    return IdMaps(raw["item_ids"].numpy(), raw["category_ids"].numpy(), item_category.numpy())


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
