"""Behaviour data for training DIN: loaders, the DIN sample protocol, batching.

The pipeline is: a loader returns :class:`Interactions` (raw ids, each user's
behaviours in time order); :func:`encode` maps raw ids to dense ones with 0
kept for padding; :func:`build_samples` applies the protocol of the DIN paper
(every prefix of a user's history predicts the next behaviour, the last
behaviour is the test target, one seeded negative per positive);
:func:`iterate_batches` pads each batch to its longest history, grouping
samples of similar length so that little padding is built.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

TABLE_COLUMNS = ("user", "item", "category", "timestamp")
AMAZON_ATTRIBUTES_SUFFIX = "_item2attributes.json"


class DataFormatError(ValueError):
    """A data file that does not have the expected layout; the message names the
    file, the line and what was expected there."""


@dataclass
class Interactions:
    """Behaviours with raw ids, grouped by user and in time order.

    User ``u``'s items are ``items[offsets[u]:offsets[u + 1]]``, oldest first.
    ``category_items[j]`` has category ``category_values[j]``.
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    category_items: np.ndarray
    category_values: np.ndarray
    source: str


@dataclass
class IdMaps:
    """Raw ids in encoding order: raw ``item_ids[i]`` is dense item ``i + 1``
    (0 is padding), and likewise for categories."""

    item_ids: np.ndarray
    category_ids: np.ndarray

    def to_state(self) -> dict:
        return {"item_ids": torch.from_numpy(self.item_ids),
                "category_ids": torch.from_numpy(self.category_ids)}

    @classmethod
    def from_state(cls, state: dict) -> "IdMaps":
        return cls(state["item_ids"].numpy(), state["category_ids"].numpy())


@dataclass
class EncodedData:
    """Interactions with dense ids: ``items`` flat in user order (see
    Interactions.offsets) and ``item_category[i]`` the category of item i."""

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    item_category: np.ndarray
    id_maps: IdMaps

    @property
    def num_items(self) -> int:
        return len(self.id_maps.item_ids)

    @property
    def num_categories(self) -> int:
        return len(self.id_maps.category_ids)


@dataclass
class Samples:
    """DIN samples: the history of sample n is
    ``items[history_start[n]:history_start[n] + history_length[n]]`` of the
    EncodedData they were built from; ``user`` indexes its users."""

    user: np.ndarray
    history_start: np.ndarray
    history_length: np.ndarray
    target: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


class Batch(NamedTuple):
    """One padded batch: histories [B, L] with 0 after ``lengths[b]``."""

    history_items: torch.Tensor
    history_categories: torch.Tensor
    lengths: torch.Tensor
    target_items: torch.Tensor
    target_categories: torch.Tensor
    labels: torch.Tensor
    users: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self))


# ---------------------------------------------------------------- loaders

def load_interactions(path) -> Interactions:
    """A directory in the Amazon layout, or a CSV/TSV file with a header."""
    path = Path(path)
    if path.is_dir():
        return load_amazon_directory(path)
    if path.is_file():
        return load_table(path)
    raise FileNotFoundError(f"data path {str(path)!r} is neither a directory in the Amazon "
                            "layout nor a CSV/TSV file")


def _parse_int(token: str, path: Path, line: int, what: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise DataFormatError(f"{path}, line {line}: expected an integer {what}, "
                              f"got {token!r}") from None


def load_amazon_directory(directory) -> Interactions:
    """``<Name>.txt`` (``user item_1 item_2 ...`` per line, oldest first) and
    ``<Name>_item2attributes.json`` (item -> attribute ids, the last one being
    the leaf category, as in the original DIN code)."""
    directory = Path(directory)
    attribute_files = sorted(directory.glob("*" + AMAZON_ATTRIBUTES_SUFFIX))
    if len(attribute_files) != 1:
        raise DataFormatError(f"{directory}: expected exactly one '<Name>{AMAZON_ATTRIBUTES_SUFFIX}'"
                              f" file, found {[p.name for p in attribute_files]}")
    name = attribute_files[0].name[:-len(AMAZON_ATTRIBUTES_SUFFIX)]
    sequences_file = directory / f"{name}.txt"
    if not sequences_file.is_file():
        raise DataFormatError(f"{directory}: found {attribute_files[0].name} but not the "
                              f"sequences file {sequences_file.name}")
    user_ids, lengths, items = [], [], []
    with open(sequences_file) as handle:
        for line_number, line in enumerate(handle, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise DataFormatError(f"{sequences_file}, line {line_number}: expected "
                                      f"'user_id item_1 item_2 ...', got {line.strip()!r}")
            user_ids.append(_parse_int(tokens[0], sequences_file, line_number, "user id"))
            items.extend(_parse_int(t, sequences_file, line_number, "item id") for t in tokens[1:])
            lengths.append(len(tokens) - 1)
    if not user_ids:
        raise DataFormatError(f"{sequences_file}: empty file; expected one line per user, "
                              "'user_id item_1 item_2 ...'")
    category_items, category_values = _load_leaf_categories(attribute_files[0])
    return Interactions(np.asarray(user_ids, dtype=np.int64),
                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        np.asarray(items, dtype=np.int64), category_items, category_values,
                        str(directory))


def _load_leaf_categories(path: Path):
    try:
        with open(path) as handle:
            attributes = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}, line {error.lineno}: expected a JSON object "
                              f"{{\"item_id\": [attribute ids]}}: {error.msg}") from None
    if not isinstance(attributes, dict) or not attributes:
        raise DataFormatError(f"{path}: expected a non-empty JSON object "
                              "{\"item_id\": [attribute ids]}")
    items, categories = [], []
    for key, values in attributes.items():
        if not isinstance(values, list) or not values or not isinstance(values[-1], int):
            raise DataFormatError(f"{path}: item {key!r} needs a non-empty list of integer "
                                  f"attribute ids, got {values!r}")
        items.append(_parse_int(key, path, 1, "item id as key"))
        categories.append(values[-1])
    return np.asarray(items, dtype=np.int64), np.asarray(categories, dtype=np.int64)


def load_table(path) -> Interactions:
    """A CSV (or TSV: by the .tsv suffix or a tab in the header) whose header
    names the columns user, item, category, timestamp (others are ignored).
    Each user's rows are ordered by timestamp, ties kept in file order."""
    path = Path(path)
    with open(path, newline="") as handle:
        header_line = handle.readline()
        if not header_line.strip():
            raise DataFormatError(f"{path}, line 1: empty file; expected a header naming the "
                                  f"columns {','.join(TABLE_COLUMNS)}")
        delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in header_line else ","
        header = [name.strip().lower() for name in next(csv.reader([header_line],
                                                                   delimiter=delimiter))]
        missing = [c for c in TABLE_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(f"{path}, line 1: header is missing column(s) {missing}; "
                                  f"expected the columns {list(TABLE_COLUMNS)}, got {header}")
        index = {c: header.index(c) for c in TABLE_COLUMNS}
        rows = []
        for line_number, fields in enumerate(csv.reader(handle, delimiter=delimiter), start=2):
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataFormatError(f"{path}, line {line_number}: expected {len(header)} "
                                      f"fields ({','.join(header)}), got {len(fields)}")
            user, item, category = (_parse_int(fields[index[c]].strip(), path, line_number, c)
                                    for c in TABLE_COLUMNS[:3])
            try:
                timestamp = float(fields[index["timestamp"]])
            except ValueError:
                raise DataFormatError(f"{path}, line {line_number}: expected a numeric "
                                      f"timestamp, got {fields[index['timestamp']]!r}") from None
            rows.append((user, item, category, timestamp, line_number))
    if not rows:
        raise DataFormatError(f"{path}: no data rows after the header; expected one row per "
                              "behaviour")
    return _interactions_from_rows(rows, path)


def _interactions_from_rows(rows, path: Path) -> Interactions:
    users, items, categories, timestamps, lines = (np.asarray(col) for col in zip(*rows))
    first_line = {}
    for item, category, line in zip(items.tolist(), categories.tolist(), lines.tolist()):
        seen = first_line.setdefault(item, (category, line))
        if seen[0] != category:
            raise DataFormatError(f"{path}, line {line}: item {item} has category {category}, "
                                  f"but category {seen[0]} on line {seen[1]}; expected one "
                                  "category per item")
    # Group by user, then time, then file order (lexsort's last key is primary).
    order = np.lexsort((np.arange(len(users)), timestamps, users))
    users, items = users[order].astype(np.int64), items[order].astype(np.int64)
    user_ids, starts = np.unique(users, return_index=True)
    category_items = np.fromiter(first_line.keys(), dtype=np.int64, count=len(first_line))
    category_values = np.asarray([c for c, _ in first_line.values()], dtype=np.int64)
    return Interactions(user_ids, np.append(starts, len(users)).astype(np.int64), items,
                        category_items, category_values, str(path))


# ---------------------------------------------------------------- synthetic data

def synthetic_interactions(num_users: int = 2000, num_categories: int = 40,
                           items_per_category: int = 25, interests_per_user: int = 6,
                           min_length: int = 8, max_length: int = 30,
                           seed: int = 0) -> Interactions:
    """A seeded dataset where the next click depends on the history items related
    to it, which is what DIN's attention is for.

    Each user has a few interest categories and, in each, a favourite spot on
    that category's ring of items. Every behaviour picks one interest and an
    item close to that interest's spot. So the target is predicted by the
    user's earlier items of the same category (and their positions), while the
    other interests in the history are noise: attention can pick the related
    items out, sum pooling has to see them blurred with all the rest.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, max_length + 1, size=num_users)
    interests = np.stack([rng.choice(num_categories, interests_per_user, replace=False)
                          for _ in range(num_users)])
    spots = rng.integers(0, items_per_category, size=(num_users, interests_per_user))
    user_of = np.repeat(np.arange(num_users), lengths)
    which = rng.integers(0, interests_per_user, size=len(user_of))
    category = interests[user_of, which]
    offset = rng.integers(-1, 2, size=len(user_of))           # the spot or a neighbour
    position = (spots[user_of, which] + offset) % items_per_category
    items = category * items_per_category + position + 1      # raw ids from 1
    all_items = np.arange(1, num_categories * items_per_category + 1, dtype=np.int64)
    return Interactions(np.arange(1, num_users + 1, dtype=np.int64),
                        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        items.astype(np.int64), all_items,
                        (all_items - 1) // items_per_category + 1, "synthetic")


# ---------------------------------------------------------------- encoding and protocol

def encode(interactions: Interactions, id_maps: Optional[IdMaps] = None) -> EncodedData:
    """Dense ids (from 1; 0 is padding). With ``id_maps`` (say, from a
    checkpoint) the same encoding is reused; ids it does not know become 0."""
    if id_maps is None:
        item_ids = np.unique(interactions.items)
        item_raw_category = _lookup(interactions.category_items, interactions.category_values,
                                    item_ids, interactions.source)
        id_maps = IdMaps(item_ids, np.unique(item_raw_category))
    dense_items = _dense(id_maps.item_ids, interactions.items)
    known = id_maps.item_ids
    item_category = np.zeros(len(known) + 1, dtype=np.int64)
    lookup_rows = np.isin(known, interactions.category_items)
    item_category[1:][lookup_rows] = _dense(
        id_maps.category_ids,
        _lookup(interactions.category_items, interactions.category_values, known[lookup_rows],
                interactions.source))
    return EncodedData(interactions.user_ids, interactions.offsets, dense_items, item_category,
                       id_maps)


def _dense(sorted_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    position = np.searchsorted(sorted_ids, raw).clip(max=len(sorted_ids) - 1)
    return np.where(sorted_ids[position] == raw, position + 1, 0).astype(np.int64)


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray, source: str) -> np.ndarray:
    order = np.argsort(keys, kind="stable")
    position = np.searchsorted(keys[order], wanted).clip(max=len(keys) - 1)
    found = keys[order][position] == wanted
    if not found.all():
        raise DataFormatError(f"{source}: no category for item(s) "
                              f"{wanted[~found][:5].tolist()}; every item needs one")
    return values[order][position]


def build_samples(data: EncodedData, seed: int = 0):
    """(train, test) Samples by the DIN protocol.

    For a user with behaviours i_1..i_n: training samples have history
    i_1..i_k and target i_{k+1} for k = 1..n-2; the test sample has history
    i_1..i_{n-1} and target i_n. Each positive gets a negative with the same
    history: an item drawn uniformly from those the user never touched. Train
    and test draw from separate seeded streams, so the test set depends on
    the seed and the data only.
    """
    lengths = np.diff(data.offsets)
    per_user_train = np.maximum(lengths - 2, 0)
    user = np.repeat(np.arange(len(lengths)), per_user_train)
    k = np.arange(len(user)) - np.repeat(np.cumsum(per_user_train) - per_user_train,
                                         per_user_train) + 1
    train = _with_negatives(data, user, k, np.random.default_rng([seed, 0]))
    test_users = np.flatnonzero(lengths >= 2)
    test = _with_negatives(data, test_users, lengths[test_users] - 1,
                           np.random.default_rng([seed, 1]))
    return train, test


def _with_negatives(data: EncodedData, user, history_length, rng) -> Samples:
    start = data.offsets[user]
    positives = data.items[start + history_length]
    negatives = sample_negatives(data, user, rng)
    both = lambda a, b: np.concatenate([a, b])
    return Samples(both(user, user), both(start, start),
                   both(history_length, history_length), both(positives, negatives),
                   both(np.ones(len(user), np.float32), np.zeros(len(user), np.float32)))


def sample_negatives(data: EncodedData, user: np.ndarray, rng) -> np.ndarray:
    """For each entry of ``user``, a uniform item that user never touched."""
    stride = data.num_items + 1
    user_of_item = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    touched = np.unique(user_of_item * stride + data.items)
    touched_count = np.bincount(touched // stride, minlength=len(data.offsets) - 1)
    full = np.flatnonzero(touched_count[np.unique(user)] >= data.num_items)
    if len(full):
        raise ValueError(f"user {data.user_ids[np.unique(user)[full[0]]]} touched every item; "
                         "no negative can be sampled for it")
    negatives = rng.integers(1, data.num_items + 1, size=len(user))
    pending = np.arange(len(user))
    while len(pending):
        keys = user[pending] * stride + negatives[pending]
        position = np.searchsorted(touched, keys).clip(max=len(touched) - 1)
        pending = pending[touched[position] == keys]
        negatives[pending] = rng.integers(1, data.num_items + 1, size=len(pending))
    return negatives


# ---------------------------------------------------------------- batching

def iterate_batches(data: EncodedData, samples: Samples, batch_size: int, *,
                    max_len: Optional[int] = None, shuffle: bool = False,
                    rng: Optional[np.random.Generator] = None,
                    bucket_batches: int = 64) -> Iterator[tuple]:
    """Yield (sample indices, Batch). Histories keep the ``max_len`` most recent
    items and pad to the batch's longest one.

    Without ``shuffle`` samples go in order of history length (least padding).
    With it, samples are shuffled, then sorted by length within windows of
    ``bucket_batches`` batches, and the batches of all windows shuffled: each
    batch holds similar lengths, yet the order stays random.
    """
    if batch_size < 1:
        raise ValueError(f"iterate_batches: `batch_size` must be >= 1; got {batch_size}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"iterate_batches: `max_len` must be >= 1 or None; got {max_len}")
    length = samples.history_length if max_len is None else np.minimum(samples.history_length,
                                                                       max_len)
    if shuffle:
        rng = rng if rng is not None else np.random.default_rng()
        order = rng.permutation(len(samples))
        window = batch_size * bucket_batches
        order = np.concatenate([chunk[np.argsort(length[chunk], kind="stable")]
                                for chunk in np.split(order, range(window, len(order), window))])
        batches = np.split(order, range(batch_size, len(order), batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
    else:
        order = np.argsort(length, kind="stable")
        batches = np.split(order, range(batch_size, len(order), batch_size))
    for indices in batches:
        yield indices, make_batch(data, samples, indices, length[indices])


def make_batch(data: EncodedData, samples: Samples, indices: np.ndarray,
               length: np.ndarray) -> Batch:
    """The padded batch of ``indices``, keeping the last ``length`` items of each history."""
    width = max(int(length.max()), 1)
    start = samples.history_start[indices] + samples.history_length[indices] - length
    position = np.arange(width)
    valid = position < length[:, None]
    history = np.where(valid, data.items[np.where(valid, start[:, None] + position, 0)], 0)
    target = samples.target[indices]
    as_tensor = torch.from_numpy
    return Batch(as_tensor(history), as_tensor(data.item_category[history]),
                 as_tensor(length.astype(np.int64)), as_tensor(target),
                 as_tensor(data.item_category[target]), as_tensor(samples.label[indices]),
                 as_tensor(samples.user[indices]))
