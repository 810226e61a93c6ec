"""Rare ids by the DIN protocol: one shared row per table for ids seen seldom.

With ``min_count`` N above 1, the items and categories seen fewer than N
times among the training behaviours (din_fast.ctr.data.training_behaviours:
never a validation or test target) have no embedding row of their own: they
share each table's reserved row, ``len(ids) + 1`` (IdMaps.unknown, as a
labeled log's maps have; ``--min-count`` is the option of both). An item
seen once then does not feed a vector that one or two updates moved from its
random start into the attention, the reserved row is trained on every rare
item together, and an item never seen (at evaluate or predict time) maps to
it too: an item that is new means what a rare one meant in training. A rare
item keeps its category's row: a category is rare only where all of its
items together are.

The protocol itself does not depend on the threshold: the samples
(histories, targets, and negatives drawn among every item of the data) are
built with every id of the data its own (data.encode), as with N = 1, and
data.RareIds maps them to the model's ids. The validation samples a
tuner compares thresholds on are therefore the same samples. N = 1 keeps
every id of the data its own row, without a reserved one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .data import EncodedData, IdMaps, RareIds, SampleSplits, encode, training_behaviours
from .loaders import Interactions


def rare_ids(data: EncodedData, maps: IdMaps) -> RareIds:
    """The model's ids, by ``maps`` (which have the reserved row), of ``data``
    encoded with every id its own: the items and categories the maps lack
    take the reserved id, each item's category is the data's own."""
    items = np.concatenate([[0], maps.dense_items(data.id_maps.item_ids)])
    categories = None
    if maps.category_ids is not None:
        by_category = np.concatenate([[0], maps.dense(maps.category_ids,
                                                      data.id_maps.category_ids)])
        categories = by_category[data.id_maps.item_category]
    return RareIds(data, maps, items, categories)


def rare_id_maps(data: EncodedData, min_count: int) -> IdMaps:
    """The model's id maps of ``data`` (encoded with every id its own): the
    items and categories seen at least ``min_count`` times among its
    training behaviours, and the reserved id; every other item of the data
    is listed among the rare ones, with the (model's) id of its category."""
    full = data.id_maps
    training = data.items[training_behaviours(data)]
    kept = np.bincount(training, minlength=len(full.item_ids) + 1)[1:] >= min_count
    category_ids = item_category = rare_item_category = None
    if full.category_ids is not None:
        seen = np.bincount(full.item_category[training],
                           minlength=len(full.category_ids) + 1)[1:] >= min_count
        category_ids = full.category_ids.filter(pa.array(seen))
        # The model's category of each of the data's: its rank among those
        # kept, else the reserved one.
        model_category = np.concatenate([[0], np.where(seen, np.cumsum(seen),
                                                       len(category_ids) + 1)])
        of_item = model_category[full.item_category[1:]]
        item_category = np.concatenate([[0], of_item[kept]])
        rare_item_category = of_item[~kept]
    return IdMaps(full.item_ids.filter(pa.array(kept)), category_ids, item_category,
                  unknown=True, rare_items=full.item_ids.filter(pa.array(~kept)),
                  rare_item_category=rare_item_category)


def with_rare_ids(data: EncodedData, splits: SampleSplits,
                  min_count: int) -> tuple[EncodedData, SampleSplits]:
    """(EncodedData, SampleSplits) in the model's ids of the DIN protocol's
    ``data`` and ``splits`` (every id of the data its own), its ids seen
    fewer than ``min_count`` times in training sharing the reserved row."""
    rare = rare_ids(data, rare_id_maps(data, min_count))
    return rare.encoded(), SampleSplits(splits.train, rare.samples(splits.validation),
                                        rare.samples(splits.test), rare=rare)


def encode_for(interactions: Interactions, maps: IdMaps) -> EncodedData:
    """Behaviours in a checkpoint's ids: with the reserved row
    (``maps.unknown``), every item the maps lack takes it and keeps its
    category; without, such items are 0 (data.encode)."""
    if not maps.unknown:
        return encode(interactions, maps)
    return rare_ids(encode(interactions), maps).encoded()
