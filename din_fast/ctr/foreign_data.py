"""Refusing data a checkpoint was not trained for.

A checkpoint's id maps say which ids it knows and each item's category: the
ids of its training data, the rare ones that share the reserved row among
them (IdMaps' rare ids). Data whose rows hold ids the maps do not know,
beyond ``max_unknown`` of them (MAX_UNKNOWN, 10%, unless a command is told
otherwise), in any column (items, categories, each side feature), or whose
items known to the maps carry another category than the maps', beyond
MAX_CONFLICTS (1%) of those items, is other data whose ids happen to
overlap: ``evaluate`` and ``predict`` refuse it with one line instead of
scoring it. The checkpoint's own data is never refused.

Of a labeled log, only the rows the checkpoint's time split puts in
training (the earliest; all of a log too short to split) count for unknown
ids: those are the rows its maps were built from, while the later ones
legitimately bring new users, items and feature values (a time split's
validation and test rows, or impressions logged after training, which
predict takes as histories). Within the tolerances, unknown ids are what
they always are: the reserved id where the maps have one (a labeled log's,
or the DIN protocol's with rare ids), else skipped or left out. Ids are
compared as the strings they are, so data of another source with integer
ids of the same range and no categories or features to contradict is
beyond what this can tell. Checkpoints of format 5 and older kept a labeled
log's rare ids (``--min-count`` above 1) without listing them: for those,
the ids the data's training rows hold fewer than ``--min-count`` times are
taken as the rare ones, which for the checkpoint's own data they are (an id
frequent there that the maps lack still counts as unknown).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .data import IdMaps, dense_ids, listed_in
from .errors import InputError, snippet
from .labeled_loader import LabeledLog
from .labeled_samples import LogSplit, build_id_maps, training_rows
from .loaders import Interactions

MAX_UNKNOWN = 0.1
MAX_CONFLICTS = 0.01


def check_behaviours(interactions: Interactions, id_maps: IdMaps, checkpoint: str,
                     max_unknown: float = MAX_UNKNOWN) -> None:
    """InputError when behaviours (the DIN protocol's data) contradict a
    checkpoint's id maps (see the module's docstring).

    Args:
        interactions: the data, from din_fast.ctr.loaders.
        id_maps: the checkpoint's IdMaps.
        checkpoint: the checkpoint's path, named in the message.
        max_unknown: the largest share, in [0, 1], of behaviours holding
            an item the maps do not know.

    Raises:
        din_fast.ctr.errors.InputError: the data contradicts the maps.
    """
    where = f"{interactions.source} does not fit checkpoint {checkpoint}"
    items = interactions.items
    _check_unknown(where, "rows", "an item", items, id_maps.listed(items), max_unknown)
    if id_maps.category_ids is not None:
        category_of = dict(zip(interactions.category_items.to_pylist(),
                               interactions.category_values.to_pylist()))
        distinct = items.dictionary
        data_categories = pa.array([category_of.get(i) for i in distinct.to_pylist()],
                                   pa.string())
        _check_conflicts(where, id_maps, distinct, data_categories)


def check_log(log: LabeledLog, id_maps: IdMaps, checkpoint: str, split: LogSplit,
              max_unknown: float = MAX_UNKNOWN) -> None:
    """InputError when a labeled log contradicts a checkpoint's id maps, or
    lacks the category column its model reads (see the module's docstring).

    Args:
        log: the data.
        id_maps: the checkpoint's IdMaps.
        checkpoint: the checkpoint's path, named in the message.
        split: the checkpoint's time split (din_fast.ctr.training.log_split
            of its config): unknown ids count in the rows it puts in
            training only; its ``min_count`` tells the rare ids of maps
            that do not list them (:func:`_rare_ids`).
        max_unknown: the largest share, in [0, 1], of those rows holding an
            id the maps do not know, in any column.

    Raises:
        din_fast.ctr.errors.InputError: the log contradicts the maps, or
            has no category column where the model reads categories.
    """
    where = f"{log.source} does not fit checkpoint {checkpoint}"
    if id_maps.category_ids is not None and log.categories is None:
        raise InputError(f"{where}: the data has no category column; the checkpoint's model "
                         "reads each item's category")
    end = training_rows(log.timestamps, split)
    rows = f"training rows (its first {end} of {len(log)}, by the checkpoint's time split)"
    rare_items, rare_categories, rare_features = _rare_ids(log, id_maps, end, split.min_count)
    items = log.items[:end]
    _check_unknown(where, rows, "an item", items, listed_in(id_maps.item_ids, rare_items, items),
                   max_unknown)
    if id_maps.category_ids is not None:
        categories = log.categories[:end]
        _check_unknown(where, rows, "a category", categories,
                       listed_in(id_maps.category_ids, rare_categories, categories),
                       max_unknown)
        # One category per item in a log (the loader checks), so its first row tells.
        codes = log.items.indices.to_numpy()
        first_row = pa.array(np.unique(codes, return_index=True)[1])
        _check_conflicts(where, id_maps, log.items.take(first_row).cast(pa.string()),
                         log.categories.take(first_row).cast(pa.string()))
    for name, values in id_maps.features.items():
        column = log.features[name][:end]
        flat = column.flatten()
        unknown_value = ~listed_in(values, rare_features.get(name), flat)
        of_row = np.repeat(np.arange(len(column)), np.diff(column.offsets.to_numpy()))
        unknown_rows = np.zeros(len(column), dtype=bool)
        unknown_rows[of_row[unknown_value]] = True
        if unknown_rows.mean() > max_unknown:
            example = flat[int(np.flatnonzero(unknown_value)[0])].as_py()
            _refuse(where, rows, f"a value of feature {name}", unknown_rows, example,
                    max_unknown)


def _rare_ids(log: LabeledLog, id_maps: IdMaps, end: int, min_count: int) -> tuple:
    """(rare items, rare categories, {feature: rare values}) that the maps'
    own ids do not list: the maps' rare lists, or for maps that kept rare
    ids without listing them (a labeled log's, --min-count above 1, in a
    checkpoint of format 5 or older) the ids the log's first ``end`` rows
    (its training rows) hold fewer than ``min_count`` times: the ones
    training kept that way, where the log is the checkpoint's own."""
    if min_count <= 1 or id_maps.rare_items is not None:
        return id_maps.rare_items, id_maps.rare_categories, id_maps.rare_features
    data_maps = build_id_maps(log, end, min_count)
    return data_maps.rare_items, data_maps.rare_categories, data_maps.rare_features


def _check_unknown(where: str, rows: str, what: str, raw, known: np.ndarray,
                   max_unknown: float) -> None:
    """The ``rows`` whose id (``what``) is not in the maps (``known``
    False), within the tolerance."""
    unknown = ~known
    if unknown.mean() > max_unknown:
        _refuse(where, rows, what, unknown, raw[int(np.flatnonzero(unknown)[0])].as_py(),
                max_unknown)


def _refuse(where: str, rows: str, what: str, unknown: np.ndarray, example, max_unknown: float):
    raise InputError(f"{where}: {unknown.mean():.1%} of its {rows} ({int(unknown.sum())} of "
                     f"{len(unknown)}) hold {what} the checkpoint has never seen (such as "
                     f"{snippet(str(example))}), more than the {max_unknown:.0%} tolerated "
                     "(--max-unknown); the checkpoint was trained on other data")


def _check_conflicts(where: str, id_maps: IdMaps, items: pa.Array, categories: pa.Array) -> None:
    """Items the maps know whose category in the data is not the maps' one,
    at most MAX_CONFLICTS of the known items."""
    saved = id_maps.categories_of(items)
    known = saved != 0
    if not known.any():
        return
    saved = saved[known]
    categories = categories.filter(pa.array(known))
    # A category the maps hold as the reserved id (a rare one) is that id in both.
    conflict = saved != id_maps.dense(id_maps.category_ids, categories)
    if conflict.mean() > MAX_CONFLICTS:
        first = int(np.flatnonzero(conflict)[0])
        item = items.filter(pa.array(known))[first].as_py()
        was = int(saved[first])
        was = snippet(id_maps.category_ids[was - 1].as_py()) if was <= len(id_maps.category_ids) \
            else "a category too rare to keep"
        raise InputError(
            f"{where}: {conflict.mean():.1%} of the items both know ({int(conflict.sum())} of "
            f"{len(conflict)}) have another category in the data than in the checkpoint (item "
            f"{snippet(item)}: {snippet(str(categories[first].as_py()))} against {was}), more "
            f"than the {MAX_CONFLICTS:.0%} tolerated; the checkpoint was trained on other data")
