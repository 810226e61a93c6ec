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

import codecs
import csv
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from .errors import DataFormatError, snippet

TABLE_COLUMNS = ("user", "item", "category", "timestamp")
AMAZON_ATTRIBUTES_SUFFIX = "_item2attributes.json"
INT64_MIN, INT64_MAX = -2 ** 63, 2 ** 63 - 1


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
    (0 is padding), and likewise for categories; ``item_category[i]`` is the
    dense category of dense item i (0 for the padding)."""

    item_ids: np.ndarray
    category_ids: np.ndarray
    item_category: np.ndarray

    def to_state(self) -> dict:
        return {name: torch.from_numpy(getattr(self, name))
                for name in ("item_ids", "category_ids", "item_category")}


@dataclass
class EncodedData:
    """Interactions with dense ids: ``items`` flat in user order (see
    Interactions.offsets; 0 for an id the id maps do not know). ``source``
    names the data in messages."""

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    id_maps: IdMaps
    source: str

    @property
    def item_category(self) -> np.ndarray:
        return self.id_maps.item_category

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
    if not path.exists():
        raise DataFormatError(f"data path {path} does not exist; expected a directory in the "
                              "Amazon layout or a CSV/TSV file")
    raise DataFormatError(f"data path {path} is not a regular file or a directory; expected "
                          "a directory in the Amazon layout or a CSV/TSV file")


def _parse_int(token: str, where: str, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        value = None
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        raise DataFormatError(f"{where}: expected an integer {what} in the int64 range, "
                              f"got {snippet(token)}")
    return value


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise DataFormatError(f"{path}: cannot be read ({error.strerror})") from None


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (a UTF-8 byte-order mark is dropped);
    DataFormatError naming the line where the file is not UTF-8 text."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DataFormatError(f"{path}: cannot be read ({error.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise DataFormatError(f"{path}: UTF-16 text; expected UTF-8 (convert it, "
                                      "e.g. iconv -f UTF-16 -t UTF-8)")
            if b"\0" in raw:
                raise DataFormatError(f"{path}, line {number}: a NUL byte; expected UTF-8 text")
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataFormatError(f"{path}, line {number}: not UTF-8 text; expected "
                                      "UTF-8 text") from None


def load_amazon_directory(directory) -> Interactions:
    """``<Name>.txt`` (``user item_1 item_2 ...`` per line, oldest first) and
    ``<Name>_item2attributes.json`` (item -> attribute ids, the last one being
    the leaf category, as in the original DIN code)."""
    directory = Path(directory)
    attribute_files = sorted(directory.glob("*" + AMAZON_ATTRIBUTES_SUFFIX))
    if len(attribute_files) != 1:
        raise DataFormatError(f"{directory}: expected exactly one '<Name>{AMAZON_ATTRIBUTES_SUFFIX}'"
                              f" file, found {len(attribute_files)}")
    name = attribute_files[0].name[:-len(AMAZON_ATTRIBUTES_SUFFIX)]
    sequences_file = directory / f"{name}.txt"
    if not sequences_file.is_file():
        raise DataFormatError(f"{directory}: found {attribute_files[0].name} but not the "
                              f"sequences file {sequences_file.name}")
    user_ids, lengths, items = [], [], []
    for line_number, line in enumerate(_text_lines(sequences_file), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"{sequences_file}, line {line_number}"
        if len(tokens) < 2:
            raise DataFormatError(f"{where}: expected 'user_id item_1 item_2 ...', got one field")
        user_ids.append(_parse_int(tokens[0], where, "user id"))
        items.extend(_parse_int(t, where, "item id") for t in tokens[1:])
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
    expected = 'a JSON object {"item_id": [attribute ids, ...]}'
    raw = _read_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataFormatError(f"{path}, line {line}: not UTF-8 text; expected {expected}") \
            from None

    def integer(token: str) -> int:
        return _parse_int(token, str(path), "attribute id")

    try:
        attributes = json.loads(text, parse_int=integer)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}, line {error.lineno}: {error.msg}; expected {expected}") \
            from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply; expected {expected}") from None
    if not isinstance(attributes, dict) or not attributes:
        raise DataFormatError(f"{path}: expected a non-empty {expected}")
    items, categories = [], []
    for key, values in attributes.items():
        where = f"{path}, item {snippet(key)}"
        if not isinstance(values, list) or not values or type(values[-1]) is not int:
            raise DataFormatError(f"{where}: expected a non-empty list of integer attribute ids")
        items.append(_parse_int(key, where, "item id as the key"))
        categories.append(values[-1])
    return np.asarray(items, dtype=np.int64), np.asarray(categories, dtype=np.int64)


def load_table(path) -> Interactions:
    """A CSV (or TSV: by the .tsv suffix or a tab in the header) whose header
    names the columns user, item, category, timestamp (others are ignored).
    Each user's rows are ordered by timestamp, ties kept in file order."""
    path = Path(path)
    lines = _text_lines(path)
    header_line = next(lines, "")
    if not header_line.strip():
        raise DataFormatError(f"{path}, line 1: empty file; expected a header naming the "
                              f"columns {','.join(TABLE_COLUMNS)}")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in header_line else ","
    reader = csv.reader(itertools.chain([header_line], lines), delimiter=delimiter)
    rows = []
    try:
        header = [name.strip().lower() for name in next(reader)]
        missing = [c for c in TABLE_COLUMNS if c not in header]
        if missing:
            raise DataFormatError(f"{path}, line 1: header is missing column(s) {missing}; "
                                  f"expected the columns {list(TABLE_COLUMNS)}")
        index = {c: header.index(c) for c in TABLE_COLUMNS}
        for fields in reader:
            where = f"{path}, line {reader.line_num}"
            if not fields or all(not f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataFormatError(f"{where}: expected {len(header)} fields "
                                      f"({','.join(header)}), got {len(fields)}")
            user, item, category = (_parse_int(fields[index[c]].strip(), where, c)
                                    for c in TABLE_COLUMNS[:3])
            timestamp = _parse_timestamp(fields[index["timestamp"]], where)
            rows.append((user, item, category, timestamp, reader.line_num))
    except csv.Error as error:
        raise DataFormatError(f"{path}, line {reader.line_num}: {error}; expected "
                              f"{delimiter!r}-separated fields") from None
    if not rows:
        raise DataFormatError(f"{path}: no data rows after the header; expected one row per "
                              "behaviour")
    return _interactions_from_rows(rows, path)


def _parse_timestamp(token: str, where: str) -> float:
    try:
        value = float(token)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataFormatError(f"{where}: expected a finite numeric timestamp, got "
                              f"{snippet(token)}")
    return value


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
    checkpoint) that encoding is kept, items' categories included: items it
    does not know become 0 and the data's categories are not looked at."""
    if id_maps is None:
        item_ids = np.unique(interactions.items)
        raw_category = _lookup(interactions.category_items, interactions.category_values,
                               item_ids, interactions.source)
        category_ids, dense_category = np.unique(raw_category, return_inverse=True)
        id_maps = IdMaps(item_ids, category_ids,
                         np.concatenate([[0], dense_category + 1]).astype(np.int64))
    return EncodedData(interactions.user_ids, interactions.offsets,
                       _dense(id_maps.item_ids, interactions.items), id_maps, interactions.source)


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


@dataclass
class KnownTestSamples:
    """The test samples of data encoded with someone else's id maps (a
    checkpoint's), and what unknown items cost: see :func:`known_test_samples`."""

    data: EncodedData
    samples: Samples
    excluded_samples: int
    skipped_history_items: int


def known_test_samples(data: EncodedData, seed: int = 0) -> KnownTestSamples:
    """The protocol's test samples where ``data`` may hold unknown items (0).

    A user whose test item is unknown is left out (its positive and negative
    sample counted in ``excluded_samples``); unknown items earlier in a history
    are skipped, so the history is the known items before the test one (it
    may be empty). With every item known this is exactly the test set of
    :func:`build_samples`: the same users, histories and negatives.
    """
    lengths = np.diff(data.offsets)
    user_of_item = np.repeat(np.arange(len(lengths)), lengths)
    is_last = np.zeros(len(data.items), dtype=bool)
    is_last[data.offsets[1:][lengths > 0] - 1] = True
    keep = (data.items != 0) | is_last
    kept_lengths = np.bincount(user_of_item[keep], minlength=len(lengths))
    compact = EncodedData(data.user_ids, np.concatenate([[0], np.cumsum(kept_lengths)]),
                          data.items[keep], data.id_maps, data.source)
    test_users = np.flatnonzero(lengths >= 2)
    test = _with_negatives(compact, test_users, kept_lengths[test_users] - 1,
                           np.random.default_rng([seed, 1]))
    known = np.tile(data.items[data.offsets[test_users + 1] - 1] != 0, 2)
    samples = Samples(*(field[known] for field in (test.user, test.history_start,
                                                   test.history_length, test.target,
                                                   test.label)))
    kept_users = test_users[known[:len(test_users)]]
    skipped = int((lengths[kept_users] - kept_lengths[kept_users]).sum())
    return KnownTestSamples(compact, samples, int((~known).sum()), skipped)


def sample_negatives(data: EncodedData, user: np.ndarray, rng) -> np.ndarray:
    """For each entry of ``user``, a uniform item that user never touched
    (unknown items, 0, do not count as touched)."""
    stride = data.num_items + 1
    user_of_item = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    known = data.items != 0
    touched = np.unique(user_of_item[known] * stride + data.items[known])
    touched_count = np.bincount(touched // stride, minlength=len(data.offsets) - 1)
    full = np.flatnonzero(touched_count[np.unique(user)] >= data.num_items)
    if len(full):
        raise DataFormatError(f"{data.source}: user {data.user_ids[np.unique(user)[full[0]]]} "
                              f"touched every one of the {data.num_items} items, so no negative "
                              "can be drawn for it; the protocol needs an untouched item per user")
    negatives = rng.integers(1, data.num_items + 1, size=len(user))
    pending = np.arange(len(user) if len(touched) else 0)
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
