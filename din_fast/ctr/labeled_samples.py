"""Samples of a labeled log: every row is one sample with its own label.

No negative is sampled. A row's behaviour history is the same user's rows
with label 1 strictly earlier in time: never the row itself, nor a row of
the same timestamp, nor anything later (so no label leaks into its own
history). The rows are split by time: the latest ``test`` share is the test
set, the ``validation`` share before it the validation set, the rest
training; rows of one timestamp never straddle two sets (a boundary moves
back to the first row of its timestamp). Histories cross the boundaries: a
test row's history holds the user's earlier clicks of every set, as serving
would know them.

The id maps hold what the training rows hold: the ids seen at least
``min_count`` times there have rows of their own, the rarer ones are listed
as rare (they share the reserved row); anything else, at validation, test,
evaluate or predict time, maps to each table's reserved id too
(IdMaps.unknown). Listing the rare ids keeps every id of the training rows
known to the maps, so that a checkpoint tells its own data from another's
(din_fast.ctr.foreign_data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .data import EncodedData, IdMaps, RowFeatures, Samples, SampleSplits, dense_ids
from .errors import DataFormatError, InputError
from .labeled_loader import LabeledLog


# The largest magnitude a standardized numeric feature may take: the model
# reads float32, in which a larger one is Inf (and the scores NaN).
FLOAT32_MAX = float(np.finfo(np.float32).max)


def standardized(values, mean: float, std: float) -> np.ndarray:
    """A numeric feature as the model takes it: ``(values - mean) / std``,
    float32.

    Args:
        values: the raw numbers, finite, array-like of any shape.
        mean: the training rows' mean of the feature.
        std: their standard deviation (1 where they do not vary).

    Returns:
        float32 array, the shape of ``values``.

    Raises:
        ValueError: a value whose standardized value lies beyond float32's
            range (naming the first and the range the model takes).
    """
    values = np.asarray(values, dtype=np.float64)
    scaled = (values - mean) / std
    bad = np.flatnonzero(~(np.abs(scaled) <= FLOAT32_MAX))
    if bad.size:
        low, high = mean - FLOAT32_MAX * std, mean + FLOAT32_MAX * std
        raise ValueError(f"{float(values.flat[bad[0]])!r} is beyond float32's range once "
                         f"standardized as in training ((value - {mean:g}) / {std:g}); "
                         f"expected a number in [{low:.4g}, {high:.4g}]")
    return scaled.astype(np.float32)


@dataclass(frozen=True)
class LogSplit:
    """The shares of the rows, latest first, that are the test and the
    validation set; ``min_count``: fewer training rows than this, and an id
    maps to the reserved one (it then trains that row)."""

    validation: float = 0.1
    test: float = 0.1
    min_count: int = 1


@dataclass
class EncodedLog:
    """A labeled log with dense ids: ``data`` holds each user's clicks (the
    label-1 rows, oldest first) as the behaviours histories are taken from,
    and the rows' side features; ``samples`` holds every row, in time order
    (the log's order), its history the user's clicks before it."""

    data: EncodedData
    samples: Samples
    timestamps: np.ndarray


def split_points(timestamps: np.ndarray, split: LogSplit, source: str) -> tuple[int, int]:
    """(first validation row, first test row) of rows in time order;
    InputError when no training row is left."""
    validation_start, test_start = _boundaries(timestamps, split)
    if validation_start == 0:
        raise InputError(f"{source}: no training rows: the latest {split.test:g} of the "
                         f"{len(timestamps)} rows (test) and the {split.validation:g} before "
                         "them (validation) leave none earlier (rows of one timestamp stay in "
                         "one set); give more rows or smaller --test-fraction/"
                         "--validation-fraction")
    return validation_start, test_start


def training_rows(timestamps: np.ndarray, split: LogSplit) -> int:
    """How many of the rows (in time order) ``split`` puts in training: the
    rows an id map built by it holds; all of them where the split would
    leave none (a log too short to split, as a few rows of behaviours given
    to predict)."""
    return _boundaries(timestamps, split)[0] or len(timestamps)


def _boundaries(timestamps: np.ndarray, split: LogSplit) -> tuple[int, int]:
    n = len(timestamps)

    def start_before(end: int, share: float) -> int:
        start = end - math.ceil(n * share)
        # Back to the first row of its timestamp: equal times stay in one set.
        return int(np.searchsorted(timestamps, timestamps[max(start, 0)], side="left")) \
            if start > 0 else 0
    test_start = start_before(n, split.test)
    return start_before(test_start, split.validation), test_start


def build_id_maps(log: LabeledLog, train_end: int, min_count: int = 1) -> IdMaps:
    """The id maps of the training rows (the first ``train_end``): ids seen
    there at least ``min_count`` times, sorted, and with ``min_count`` above
    1 the rarer ones as the maps' rare ids (each rare item with its
    category); numeric features' mean and standard deviation (1 where they
    do not vary) over those rows."""
    items, rare_items = _vocabulary(log.items[:train_end], min_count)
    category_ids = item_category = rare_categories = rare_item_category = None
    if log.categories is not None:
        category_ids, rare_categories = _vocabulary(log.categories[:train_end], min_count)
        maps = IdMaps(items, category_ids, None, unknown=True)
        # Each item's category (one per item: the loader checks it) as a dense id.
        first_row = np.unique(log.items.indices.to_numpy(), return_index=True)[1]
        of_item = dict(zip(log.items.take(pa.array(first_row)).to_pylist(),
                           log.categories.take(pa.array(first_row)).to_pylist()))
        category_of = lambda ids: maps.dense(category_ids, pa.array(
            [of_item[i] for i in ids.to_pylist()], pa.string()))
        item_category = np.concatenate([[0], category_of(items)])
        rare_item_category = None if rare_items is None else category_of(rare_items)
    features, rare_features = {}, {}
    for name, values in log.features.items():
        features[name], rare = _vocabulary(values[:train_end].flatten(), min_count)
        if rare is not None:
            rare_features[name] = rare
    numeric = {name: (float(values[:train_end].mean()), float(values[:train_end].std() or 1.0))
               for name, values in log.numeric.items()}
    return IdMaps(items, category_ids, item_category, True, features, numeric, rare_items,
                  rare_item_category, rare_categories, rare_features)


def _vocabulary(values, min_count: int) -> tuple:
    """(the distinct strings of ``values`` seen at least ``min_count``
    times, the others), each sorted; the others None for ``min_count`` 1
    (none: the maps of such a run are as before rare ids were kept)."""
    if isinstance(values, pa.DictionaryArray):
        counts = np.bincount(values.indices.to_numpy(), minlength=len(values.dictionary))
        distinct = values.dictionary
    else:
        encoded = values.dictionary_encode()
        counts = np.bincount(encoded.indices.to_numpy(), minlength=len(encoded.dictionary))
        distinct = encoded.dictionary
    sorted_strings = lambda kept: kept.take(pc.sort_indices(kept)).cast(pa.string())
    frequent = counts >= min_count
    rare = None if min_count <= 1 else sorted_strings(distinct.filter(pa.array(
        ~frequent & (counts > 0))))
    return sorted_strings(distinct.filter(pa.array(frequent))), rare


def encode_log(log: LabeledLog, id_maps: IdMaps) -> EncodedLog:
    """The log's rows as samples and its clicks as histories, with ``id_maps``
    (ids it does not hold map to the reserved id)."""
    user_ids = log.users.dictionary.take(pc.sort_indices(log.users.dictionary))
    user = dense_ids(user_ids, log.users) - 1
    item = id_maps.dense(id_maps.item_ids, log.items)
    category = None if id_maps.category_ids is None or log.categories is None \
        else id_maps.dense(id_maps.category_ids, log.categories)
    # Each timestamp's rank (rows are in time order), then one sortable key
    # per (user, time): a row's history is the clicks with a smaller key.
    rank = np.concatenate([[0], np.cumsum(log.timestamps[1:] != log.timestamps[:-1])])
    key = user * (int(rank[-1]) + 1) + rank if len(rank) else rank
    clicks = np.flatnonzero(log.labels == 1)
    clicks = clicks[np.argsort(user[clicks], kind="stable")]        # by user, then time
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user[clicks],
                                                         minlength=len(user_ids)))])
    start = offsets[user]
    length = np.searchsorted(key[clicks], key, side="left") - start
    data = EncodedData(user_ids, offsets.astype(np.int64), item[clicks], id_maps, log.source,
                       None if category is None else category[clicks], _row_features(log, id_maps))
    samples = Samples(user, start.astype(np.int64), length.astype(np.int64), item,
                      log.labels, category, np.arange(len(log)))
    return EncodedLog(data, samples, log.timestamps)


def _row_features(log: LabeledLog, id_maps: IdMaps):
    if not log.features and not log.numeric:
        return None
    values = {name: id_maps.dense(id_maps.features[name], log.features[name].flatten())
              for name in id_maps.features}
    offsets = {name: log.features[name].offsets.to_numpy().astype(np.int64)
               - log.features[name].offsets[0].as_py() for name in id_maps.features}
    numeric = None
    if id_maps.numeric:
        columns = []
        for name, (mean, std) in id_maps.numeric.items():
            try:
                columns.append(standardized(log.numeric[name], mean, std))
            except ValueError as error:
                raise DataFormatError(f"{log.source}, column {name}: {error}") from None
        numeric = np.stack(columns, 1)
    return RowFeatures(values, offsets, numeric)


def split_log(encoded: EncodedLog, split: LogSplit) -> SampleSplits:
    """The training, validation and test samples of an encoded log."""
    validation_start, test_start = split_points(encoded.timestamps, split, encoded.data.source)
    rows = encoded.samples
    return SampleSplits(rows.subset(slice(0, validation_start)),
                        rows.subset(slice(validation_start, test_start)),
                        rows.subset(slice(test_start, len(rows))), negatives=False)


def labeled_samples(log: LabeledLog, split: LogSplit) -> tuple[EncodedData, SampleSplits]:
    """(EncodedData, SampleSplits) of a log, with the id maps of its training rows."""
    validation_start, _ = split_points(log.timestamps, split, log.source)
    encoded = encode_log(log, build_id_maps(log, validation_start, split.min_count))
    return encoded.data, split_log(encoded, split)
