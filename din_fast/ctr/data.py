"""Behaviour data for training DIN: dense ids, the DIN sample protocol, batching.

The pipeline is: a loader (:mod:`din_fast.ctr.loaders`) returns Interactions (raw
string ids, each user's behaviours in time order); :func:`encode` maps raw ids
to dense ones with 0 kept for padding; :func:`build_samples` applies the
leave-one-out protocol of the DIN paper (every prefix of a user's history
predicts the next behaviour; the last behaviour is the test target, the one
before it the validation target; one seeded negative per positive, the
training ones redrawn every epoch by :func:`training_samples`);
:func:`iterate_batches` pads each batch to its longest history, grouping
samples of similar length so that little padding is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, NamedTuple, Optional


import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .errors import DataFormatError, snippet
from .loaders import Interactions

# Seeded random streams, [seed, stream]: each split's negatives and the
# training batches' order draw from their own, so that one never shifts another.
TEST_STREAM, VALIDATION_STREAM, BATCH_STREAM, TRAIN_STREAM = range(4)


@dataclass
class IdMaps:
    """Raw ids in encoding order: raw ``item_ids[i]`` is dense item ``i + 1``
    (0 is padding), and likewise for categories and each side feature's
    values; ``item_category[i]`` is the dense category of dense item i (0
    for the padding). The raw ids are sorted strings without repeats.

    ``unknown``: every table has one more id, ``len(ids) + 1``, that any raw
    id not listed maps to (labeled logs, whose maps hold the training split's
    ids, and the DIN protocol with rare ids: din_fast.ctr.rare_ids); without
    it such ids map to 0 (the DIN protocol, whose maps then hold every id of
    the data). ``category_ids`` is None for data without categories (and
    ``item_category`` then too). ``features`` maps each categorical side
    feature to its values, ``numeric`` each numeric one to the (mean,
    standard deviation) that standardizes it. ``rare_items`` are the items
    of the training data that share the reserved row, with their
    categories, and ``rare_categories`` and ``rare_features`` the rare
    categories and side-feature values (a labeled log's): with the maps'
    own ids, every id the training data held, for telling other data
    apart, and a cold item's category.

    Args:
        item_ids: the raw item ids, a sorted pyarrow string array without
            repeats: dense item i + 1.
        category_ids: the raw category ids, likewise; None for data without
            categories.
        item_category: [len(item_ids) + 1] int64, the dense category of
            each dense item, 0 for the padding; None without categories.
        unknown: each table has a reserved id for raw ids not listed
            (labeled logs, the DIN protocol with rare ids); False: they map
            to 0 (the DIN protocol).
        features: {categorical side feature: its raw values, a sorted
            string array}, in the model's order.
        numeric: {numeric side feature: (mean, standard deviation)}.
        rare_items: the training data's items without a row of their own
            (they share the reserved one), a sorted string array; None
            where not kept (labeled logs, the DIN protocol without rare
            ids).
        rare_item_category: [len(rare_items)] int64, their dense categories
            (the reserved one for a rare category); None without categories
            or rare items.
        rare_categories: the training data's categories without a row of
            their own, a sorted string array; None where not kept (the DIN
            protocol, whose checks read items only, and maps without rare
            ids).
        rare_features: {categorical side feature: its training values
            without a row of their own, a sorted string array}; empty where
            not kept.
    """

    item_ids: pa.Array
    category_ids: Optional[pa.Array]
    item_category: Optional[np.ndarray]
    unknown: bool = False
    features: dict = field(default_factory=dict)
    numeric: dict = field(default_factory=dict)
    rare_items: Optional[pa.Array] = None
    rare_item_category: Optional[np.ndarray] = None
    rare_categories: Optional[pa.Array] = None
    rare_features: dict = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        """The item table's ids beyond the padding (the reserved one included)."""
        return len(self.item_ids) + self.unknown

    @property
    def num_categories(self) -> int:
        """Likewise for categories; 0 without categories."""
        return 0 if self.category_ids is None else len(self.category_ids) + self.unknown

    def feature_sizes(self) -> dict:
        """{feature: its table's ids beyond the padding}."""
        return {name: len(values) + self.unknown for name, values in self.features.items()}

    def dense_items(self, raw: pa.Array) -> np.ndarray:
        """Dense ids of raw item ids.

        Args:
            raw: a pyarrow string array (or DictionaryArray of strings) of raw
                item ids.

        Returns:
            [len(raw)] int64: position + 1 in ``item_ids``; for ids not there,
            the reserved id ``len(item_ids) + 1`` (``unknown``) or 0.
        """
        return self.dense(self.item_ids, raw)

    def dense(self, ids: pa.Array, raw) -> np.ndarray:
        """Dense ids of ``raw`` in one of this IdMaps' maps.

    Args:
        ids: the map: ``item_ids``, ``category_ids`` or a feature's values.
        raw: a pyarrow string array (or DictionaryArray) of raw ids.

    Returns:
        [len(raw)] int64: position + 1 in ``ids``; for ids not there, the
        reserved id ``len(ids) + 1`` (``unknown``) or 0.
    """
        return dense_ids(ids, raw, len(ids) + 1 if self.unknown else 0)

    def categories_of(self, raw: pa.Array) -> np.ndarray:
        """The dense category of each raw item the maps list.

        Args:
            raw: raw item ids, a pyarrow string array.

        Returns:
            [len(raw)] int64: the category of each of the maps' own items
            and rare ones, 0 for the others; None without categories.
        """
        if self.category_ids is None:
            return None
        category = self.item_category[dense_ids(self.item_ids, raw)]
        if self.rare_items is not None:
            rare = dense_ids(self.rare_items, raw)
            category = np.where(rare != 0, np.append(0, self.rare_item_category)[rare], category)
        return category

    def listed(self, raw: pa.Array) -> np.ndarray:
        """Whether each raw item is one the maps were built from.

        Args:
            raw: raw item ids, a pyarrow string array.

        Returns:
            [len(raw)] bool: True for the maps' own items and rare ones.
        """
        return listed_in(self.item_ids, self.rare_items, raw)

    def fingerprint(self) -> str:
        """A SHA-256 of everything the maps hold: equal maps give equal
        fingerprints, whatever the data they were built from."""
        digest = hashlib.sha256()

        def add(tag: str, value) -> None:
            data = value if isinstance(value, bytes) else repr(value).encode()
            digest.update(f"{tag}:{len(data)}:".encode() + data)
        strings = lambda array: "\0".join(array.to_pylist()).encode()
        add("unknown", self.unknown)
        add("items", strings(self.item_ids))
        if self.category_ids is not None:
            add("categories", strings(self.category_ids))
            add("item_category", np.ascontiguousarray(self.item_category, np.int64).tobytes())
        for name, values in self.features.items():
            add("feature " + name, strings(values))
        for name, (mean, std) in self.numeric.items():
            add("numeric " + name, (float(mean), float(std)))
        if self.rare_items is not None:     # absent before rare ids: old fingerprints hold
            add("rare items", strings(self.rare_items))
            if self.category_ids is not None:
                add("rare item_category",
                    np.ascontiguousarray(self.rare_item_category, np.int64).tobytes())
        if self.rare_categories is not None:    # absent before format 6: old fingerprints hold
            add("rare categories", strings(self.rare_categories))
        for name, values in self.rare_features.items():
            add("rare feature " + name, strings(values))
        return digest.hexdigest()


def listed_in(ids: pa.Array, rare: Optional[pa.Array], raw) -> np.ndarray:
    """Whether each raw id is one of a map's own (``ids``) or rare ones.

    Args:
        ids: the map's own ids (a sorted string array).
        rare: its rare ids, sharing the reserved row; None: none kept.
        raw: a pyarrow string array (or DictionaryArray) of raw ids.

    Returns:
        [len(raw)] bool.
    """
    listed = dense_ids(ids, raw) != 0
    return listed if rare is None else listed | (dense_ids(rare, raw) != 0)


def dense_ids(ids: pa.Array, raw, missing: int = 0) -> np.ndarray:
    """Position + 1 in ``ids`` of each string of ``raw``.

    Args:
        ids: a pyarrow string array without repeats, the map.
        raw: a pyarrow string array; a DictionaryArray is looked up once per
            distinct value.
        missing: the id of a string not in ``ids``.

    Returns:
        [len(raw)] int64, a writable numpy array.
    """
    if isinstance(raw, pa.DictionaryArray):
        return dense_ids(ids, raw.dictionary, missing)[raw.indices.to_numpy()]
    position = pc.index_in(raw, value_set=ids)
    dense = pc.fill_null(pc.add(position.cast(pa.int64()), 1), missing)
    return np.array(dense.to_numpy(zero_copy_only=False))     # a writable copy


@dataclass
class RowFeatures:
    """The side features of a labeled log's rows: each categorical feature's
    dense ids, ragged (row r holds ``values[name][offsets[name][r]:
    offsets[name][r + 1]]``, several for a multi-valued cell, none for an
    empty one), and the numeric features standardized, [rows, N] float32
    (None without any).

    Args:
        values: {categorical feature: int64 dense ids of every row, back to
            back}.
        offsets: {categorical feature: [rows + 1] int64 offsets into its
            values}.
        numeric: [rows, N] float32, standardized; None without numeric
            features.
    """

    values: dict
    offsets: dict
    numeric: Optional[np.ndarray]


@dataclass
class EncodedData:
    """Behaviours with dense ids: ``items`` flat in user order (see
    Interactions.offsets; 0 for an id the id maps do not know), the
    histories samples take their items from. ``categories``, where given,
    holds the category of each of them (else the id maps' item_category
    gives it); ``rows`` the side features samples point to (Samples.row).
    ``source`` names the data in messages.

    Args:
        user_ids: [U] pyarrow string array, the users' raw ids.
        offsets: [U + 1] int64: user u's behaviours are
            ``items[offsets[u]:offsets[u + 1]]``, oldest first.
        items: [N] int64 dense item ids.
        id_maps: the IdMaps the ids are dense in.
        source: names the data in messages.
        categories: [N] int64 dense category of each item of ``items``; None:
            ``id_maps.item_category`` gives them.
        rows: a labeled log's RowFeatures; None without side features.
    """

    user_ids: pa.Array
    offsets: np.ndarray
    items: np.ndarray
    id_maps: IdMaps
    source: str
    categories: Optional[np.ndarray] = None
    rows: Optional[RowFeatures] = None

    @property
    def item_category(self) -> np.ndarray:
        return self.id_maps.item_category

    @property
    def num_items(self) -> int:
        return self.id_maps.num_items

    @property
    def num_categories(self) -> int:
        return self.id_maps.num_categories


@dataclass
class Samples:
    """DIN samples: the history of sample n is
    ``items[history_start[n]:history_start[n] + history_length[n]]`` of the
    EncodedData they were built from; ``user`` indexes its users. The
    target's category is ``target_category[n]`` where given (else the id
    maps' category of the target item); ``row`` indexes the data's
    RowFeatures (None: no side features). All arrays have one entry per
    sample.

    Args:
        user: int64 user index (into EncodedData.user_ids).
        history_start: int64 start of each history in EncodedData.items.
        history_length: int64 length of each history (may be 0).
        target: int64 dense item id of the target.
        label: float32, 1 for a click, 0 not.
        target_category: int64 dense category of the target; None: the id
            maps' ``item_category`` of the target.
        row: int64 row of EncodedData.rows; None without side features.
    """

    user: np.ndarray
    history_start: np.ndarray
    history_length: np.ndarray
    target: np.ndarray
    label: np.ndarray
    target_category: Optional[np.ndarray] = None
    row: Optional[np.ndarray] = None

    def subset(self, indices) -> "Samples":
        """The samples at ``indices``.

        Args:
            indices: what indexes a numpy array: an int array, a bool mask
                of len(self), a slice.

        Returns:
            A new Samples (numpy's copies or views).
        """
        return Samples(*(None if a is None else a[indices] for a in
                         (self.user, self.history_start, self.history_length, self.target,
                          self.label, self.target_category, self.row)))

    def __len__(self) -> int:
        return len(self.label)


class Batch(NamedTuple):
    """One padded batch: histories [B, L] with 0 after ``lengths[b]``; the
    categories None for data without them. ``features`` maps each
    categorical side feature to its ids [B, V] (0 after a row's values),
    ``numeric`` holds the numeric ones [B, N]; both None without any.

    Fields (dense ids int64, from :func:`make_batch`): ``history_items``
    [B, L], ``history_categories`` [B, L], ``lengths`` [B] in [0, L],
    ``target_items`` [B], ``target_categories`` [B], ``labels`` [B] float32,
    ``users`` [B] (user indices, for GAUC), ``features`` {name: [B, V]},
    ``numeric`` [B, N] float32.
    """

    history_items: torch.Tensor
    history_categories: Optional[torch.Tensor]
    lengths: torch.Tensor
    target_items: torch.Tensor
    target_categories: Optional[torch.Tensor]
    labels: torch.Tensor
    users: torch.Tensor
    features: Optional[dict] = None
    numeric: Optional[torch.Tensor] = None

    def map(self, fn) -> "Batch":
        """The batch with ``fn`` applied to each of its tensors (each
        feature's too); an absent field stays None.

        Args:
            fn: tensor -> tensor (``lambda t: t.pin_memory()``, say).

        Returns:
            A new Batch.
        """
        apply = lambda t: None if t is None else fn(t)
        return Batch(*(apply(t) for t in self[:7]),
                     None if self.features is None else {k: fn(v) for k, v in
                                                          self.features.items()},
                     apply(self.numeric))

    def to(self, device) -> "Batch":
        """The batch with every tensor on ``device``.

        Args:
            device: a str or torch.device.

        Returns:
            A new Batch.
        """
        return self.map(lambda t: t.to(device))

    def model_inputs(self) -> tuple:
        """(args, kwargs) of a model's forward (din_fast.DIN's) for this batch."""
        side = {"features": self.features, "numeric": self.numeric}
        return self[:5], {k: v for k, v in side.items() if v is not None}


# ---------------------------------------------------------------- encoding and protocol

def encode(interactions: Interactions, id_maps: Optional[IdMaps] = None) -> EncodedData:
    """Behaviours with dense ids (from 1; 0 is padding).

    Args:
        interactions: the behaviours, from din_fast.ctr.loaders.
        id_maps: None: new maps of the data's own ids (sorted), every item
            with its category. Given (say, a checkpoint's), that encoding is
            kept, items' categories included: items it does not know become
            0 (also with ``unknown`` maps: this is the DIN protocol's
            encoding) and the data's categories are not looked at.

    Returns:
        The EncodedData.

    Raises:
        din_fast.ctr.errors.DataFormatError: without ``id_maps``, an item
            with no category in the data.
    """
    seen = interactions.items.dictionary
    if id_maps is None:
        item_ids = seen.take(pc.sort_indices(seen))
        where = pc.index_in(item_ids, value_set=interactions.category_items)
        missing = _first_null(where)
        if missing is not None:
            raise DataFormatError(f"{interactions.source}: no category for item "
                                  f"{snippet(item_ids[missing].as_py())} (and maybe others); "
                                  "every item needs one")
        raw_category = interactions.category_values.take(where)
        category_ids = pc.unique(raw_category)
        category_ids = category_ids.take(pc.sort_indices(category_ids))
        id_maps = IdMaps(item_ids, category_ids,
                         np.concatenate([[0], dense_ids(category_ids, raw_category)]))
    dense_seen = dense_ids(id_maps.item_ids, seen)
    items = dense_seen[interactions.items.indices.to_numpy(zero_copy_only=False)]
    return EncodedData(interactions.user_ids, interactions.offsets, items.astype(np.int64),
                       id_maps, interactions.source)


def _first_null(array: pa.Array) -> Optional[int]:
    nulls = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))
    return int(nulls[0]) if len(nulls) else None


@dataclass
class RareIds:
    """Rare ids sharing a row by the DIN protocol (din_fast.ctr.rare_ids
    builds them): the model's ids of data encoded with every id its own
    (``data``, the protocol's: negatives are drawn among its items).
    ``items[i]`` is the model's item of the data's dense item i (the
    reserved one where the maps lack it), ``categories[i]`` the model's
    category of that item's category (None without categories); ``maps``
    the model's id maps.

    Args:
        data: the protocol's EncodedData, every id of the data its own.
        maps: the model's IdMaps (with the reserved row).
        items: [len(data's items) + 1] int64, the model's item of each of
            the data's dense items (0 for the padding).
        categories: likewise, the model's category of each; None without
            categories.
    """

    data: EncodedData
    maps: IdMaps
    items: np.ndarray
    categories: Optional[np.ndarray]

    def samples(self, samples: Samples) -> Samples:
        """Samples in the model's ids.

        Args:
            samples: Samples of :attr:`data`.

        Returns:
            The same samples with the model's targets and their categories.
        """
        return replace(samples, target=self.items[samples.target],
                       target_category=None if self.categories is None
                       else self.categories[samples.target])

    def encoded(self) -> EncodedData:
        """:attr:`data` with the model's ids: the behaviours' items and, each
        behaviour's own, their categories (so a rare item keeps its category)."""
        data = self.data
        return EncodedData(data.user_ids, data.offsets, self.items[data.items], self.maps,
                           data.source, None if self.categories is None
                           else self.categories[data.items])


@dataclass
class SampleSplits:
    """The samples of one dataset. By the DIN protocol (``negatives``):
    training positives (a fresh negative is drawn for each, every epoch:
    :func:`with_negatives`), and the validation and test samples with their
    negatives drawn once. Of a labeled log (no ``negatives``): its rows.

    ``rare`` (:class:`RareIds`): the DIN protocol with rare ids sharing a
    row. The training positives are then the protocol's own (every id of the
    data its own), among whose items each epoch's negatives are drawn before
    ``rare`` maps them to the model's ids, as it mapped the validation and
    test samples.

    Args:
        train: the training samples (by the DIN protocol the positives).
        validation: the validation samples.
        test: the test samples.
        negatives: True by the DIN protocol (a negative drawn for each
            training positive every epoch); False for a labeled log.
        rare: the mapping to the model's ids of the DIN protocol with rare
            ids; None: the samples hold the model's ids.
    """

    train: Samples
    validation: Samples
    test: Samples
    negatives: bool = True
    rare: Optional[RareIds] = None

    @property
    def train_size(self) -> int:
        """Training samples per epoch."""
        return len(self.train) * (2 if self.negatives else 1)

    def training(self, data: "EncodedData", seed: int, epoch: int) -> Samples:
        """The training samples of ``epoch``.

    Args:
        data: the EncodedData the samples come from.
        seed: the run's seed.
        epoch: the epoch, from 1 (seeds its negatives).

    Returns:
        By the DIN protocol the positives and a fresh negative each
        (:func:`training_samples`, the negatives drawn among the protocol's
        own ids where ``rare`` maps them); of a labeled log, ``train`` itself.
    """
        if not self.negatives:
            return self.train
        if self.rare is None:
            return training_samples(data, self.train, seed, epoch)
        return self.rare.samples(training_samples(self.rare.data, self.train, seed, epoch))


def build_samples(data: EncodedData, seed: int = 0) -> SampleSplits:
    """The leave-one-out DIN protocol.

    For a user with behaviours i_1..i_n: the test sample has history
    i_1..i_{n-1} and target i_n (n >= 2), the validation sample history
    i_1..i_{n-2} and target i_{n-1} (n >= 3), and the training samples
    history i_1..i_k and target i_{k+1} for k = 1..n-3. Each validation and
    test positive gets one negative with the same history: an item drawn
    uniformly from those the user never touched. They draw from separate
    seeded streams, so they depend on the seed and the data only.

    Args:
        data: the EncodedData.
        seed: seeds the validation and test negatives.

    Returns:
        The SampleSplits (``negatives`` True).

    Raises:
        din_fast.ctr.errors.DataFormatError: a user who touched every item
            (no negative can be drawn).
    """
    lengths = np.diff(data.offsets)
    per_user_train = np.maximum(lengths - 3, 0)
    user = np.repeat(np.arange(len(lengths)), per_user_train)
    k = np.arange(len(user)) - np.repeat(np.cumsum(per_user_train) - per_user_train,
                                         per_user_train) + 1
    validation_users = np.flatnonzero(lengths >= 3)
    validation = with_negatives(data, _positives(data, validation_users,
                                                 lengths[validation_users] - 2),
                                np.random.default_rng([seed, VALIDATION_STREAM]))
    test_users = np.flatnonzero(lengths >= 2)
    test = with_negatives(data, _positives(data, test_users, lengths[test_users] - 1),
                          np.random.default_rng([seed, TEST_STREAM]))
    return SampleSplits(_positives(data, user, k), validation, test)


def training_behaviours(data: EncodedData) -> np.ndarray:
    """The behaviours of the training period by the DIN protocol, the only
    ones whose counts training may use.

    Args:
        data: EncodedData of behaviours (each user's, oldest first).

    Returns:
        [len(data.items)] bool: True where a behaviour precedes its user's
        validation and test targets (the last two).
    """
    lengths = np.diff(data.offsets)
    position = np.arange(len(data.items)) - np.repeat(data.offsets[:-1], lengths)
    return position < np.repeat(lengths - 2, lengths)


def training_samples(data: EncodedData, positives: Samples, seed: int, epoch: int) -> Samples:
    """One epoch's training samples: ``positives`` and a negative for each,
    drawn afresh every epoch (seeded by seed and epoch), as the original DIN
    code does.

    Args:
        data: the EncodedData.
        positives: the training positives (SampleSplits.train).
        seed: the run's seed.
        epoch: the epoch.

    Returns:
        Samples: the positives, then their negatives.
    """
    return with_negatives(data, positives, np.random.default_rng([seed, TRAIN_STREAM, epoch]))


def _positives(data: EncodedData, user, history_length) -> Samples:
    start = data.offsets[user]
    return Samples(user, start, history_length, data.items[start + history_length],
                   np.ones(len(user), np.float32))


def with_negatives(data: EncodedData, positives: Samples, rng) -> Samples:
    """``positives`` followed by one negative each: same user and history, a
    target drawn uniformly from the items that user never touched.

    Args:
        data: the EncodedData.
        positives: the positive Samples (their target categories and rows
            are not kept).
        rng: a numpy Generator the negatives are drawn from.

    Returns:
        Samples of 2 * len(positives), the negatives labelled 0.

    Raises:
        din_fast.ctr.errors.DataFormatError: a user who touched every item.
    """
    negatives = sample_negatives(data, positives.user, rng)
    both = lambda a, b: np.concatenate([a, b])
    return Samples(both(positives.user, positives.user),
                   both(positives.history_start, positives.history_start),
                   both(positives.history_length, positives.history_length),
                   both(positives.target, negatives),
                   both(positives.label, np.zeros(len(positives), np.float32)))


@dataclass
class KnownTestSamples:
    """The test samples of data encoded with someone else's id maps (a
    checkpoint's), and what unknown items cost: see :func:`known_test_samples`.

    Args:
        data: the data with its unknown history items dropped, which the
            samples index.
        samples: the test samples whose test item is known.
        excluded_samples: the samples left out (a positive and its negative
            per user whose test item is unknown).
        skipped_history_items: the unknown items dropped from the kept
            users' histories.
    """

    data: EncodedData
    samples: Samples
    excluded_samples: int
    skipped_history_items: int


def reserved_ids_read(data: EncodedData, samples: Samples, max_len: Optional[int]) -> dict:
    """How many ids ``samples`` read through the id maps' reserved rows (ids
    the maps hold no row of their own for: rare in training, or never seen);
    zeros for maps without reserved rows.

    Args:
        data: the EncodedData the samples were built from.
        samples: the samples, their ``row`` set where the data has side
            features.
        max_len: the most recent items of each history the model reads
            (None: all).

    Returns:
        ``{"items": i, "history_items": n, "feature_values": m}``: the
        samples whose target item, the items among the histories'
        ``max_len`` latest, and the side-feature values of the samples' rows
        that take a reserved id.
    """
    maps = data.id_maps
    counts = {"items": 0, "history_items": 0, "feature_values": 0}
    if not maps.unknown:
        return counts
    reserved_item = len(maps.item_ids) + 1
    counts["items"] = int((samples.target == reserved_item).sum())
    reserved = np.concatenate([[0], np.cumsum(data.items == reserved_item)])
    end = samples.history_start + samples.history_length
    read = samples.history_length if max_len is None else np.minimum(samples.history_length,
                                                                      max_len)
    counts["history_items"] = int((reserved[end] - reserved[end - read]).sum())
    if data.rows is not None and samples.row is not None:
        for name, values in data.rows.values.items():
            reserved = np.concatenate([[0], np.cumsum(values == len(maps.features[name]) + 1)])
            offsets = data.rows.offsets[name]
            counts["feature_values"] += int((reserved[offsets[samples.row + 1]]
                                             - reserved[offsets[samples.row]]).sum())
    return counts


def known_test_samples(data: EncodedData, seed: int = 0) -> KnownTestSamples:
    """The protocol's test samples where ``data`` may hold unknown items (0).

    A user whose test item is unknown is left out (its positive and negative
    sample counted in ``excluded_samples``); unknown items earlier in a history
    are skipped, so the history is the known items before the test one (it
    may be empty). With every item known this is exactly the test set of
    :func:`build_samples`: the same users, histories and negatives.

    Args:
        data: behaviours encoded with a checkpoint's id maps (unknown items
            0).
        seed: the run's seed (draws the negatives as training did).

    Returns:
        The KnownTestSamples.

    Raises:
        din_fast.ctr.errors.DataFormatError: a user who touched every item.
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
    test = with_negatives(compact, _positives(compact, test_users, kept_lengths[test_users] - 1),
                          np.random.default_rng([seed, TEST_STREAM]))
    known = np.tile(data.items[data.offsets[test_users + 1] - 1] != 0, 2)
    samples = test.subset(known)
    kept_users = test_users[known[:len(test_users)]]
    skipped = int((lengths[kept_users] - kept_lengths[kept_users]).sum())
    return KnownTestSamples(compact, samples, int((~known).sum()), skipped)


def sample_negatives(data: EncodedData, user: np.ndarray, rng) -> np.ndarray:
    """For each entry of ``user``, a uniform item that user never touched
    (unknown items, 0, do not count as touched).

    Args:
        data: the EncodedData.
        user: int user indices, repeats allowed.
        rng: a numpy Generator.

    Returns:
        [len(user)] int64 dense item ids in [1, num_items].

    Raises:
        din_fast.ctr.errors.DataFormatError: a user of ``user`` touched
            every item, so none can be drawn.
    """
    stride = data.num_items + 1
    user_of_item = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    known = data.items != 0
    touched = np.unique(user_of_item[known] * stride + data.items[known])
    touched_count = np.bincount(touched // stride, minlength=len(data.offsets) - 1)
    full = np.flatnonzero(touched_count[np.unique(user)] >= data.num_items)
    if len(full):
        raise DataFormatError(f"{data.source}: user "
                              f"{snippet(data.user_ids[int(np.unique(user)[full[0]])].as_py())} "
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
                    bucket_batches: int = 64, min_batch: int = 2) -> Iterator[tuple]:
    """Yield (sample indices, Batch). Histories keep the ``max_len`` most recent
    items and pad to the batch's longest one.

    Without ``shuffle`` samples go in order of history length (least padding).
    With it (training), samples are shuffled, then sorted by length within
    windows of ``bucket_batches`` batches, and the batches of all windows
    shuffled: each batch holds similar lengths, yet the order stays random;
    a leftover batch of fewer than ``min_batch`` samples joins the one before
    it (Dice's batch normalization needs two rows; sharded training one per
    process).

    Args:
        data: the EncodedData the samples' histories come from.
        samples: the Samples to batch.
        batch_size: samples per batch (the last may have fewer, or up to
            ``batch_size + min_batch - 1`` when shuffled).
        max_len: keep the most recent ``max_len`` items of each history;
            None keeps them all.
        shuffle: shuffle (training); else in order of history length.
        rng: the numpy Generator that shuffles; None: a fresh unseeded one.
        bucket_batches: batches per window sorted by length when shuffled.
        min_batch: the fewest samples of a shuffled last batch.

    Yields:
        (int64 indices into ``samples``, Batch on the CPU).

    Raises:
        ValueError: ``batch_size`` below 1, or ``max_len`` below 1.
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
        if len(batches) > 1 and len(batches[-1]) < min_batch:
            batches[-2:] = [np.concatenate(batches[-2:])]
        batches = [batches[i] for i in rng.permutation(len(batches))]
    else:
        order = np.argsort(length, kind="stable")
        batches = np.split(order, range(batch_size, len(order), batch_size))
    for indices in batches:
        yield indices, make_batch(data, samples, indices, length[indices])


def make_batch(data: EncodedData, samples: Samples, indices: np.ndarray,
               length: np.ndarray) -> Batch:
    """The padded batch of ``indices``, keeping the last ``length`` items of
    each history.

    Args:
        data: the EncodedData.
        samples: the Samples.
        indices: int indices of the batch's samples.
        length: [len(indices)] the history length to keep for each (at most
            its history's).

    Returns:
        The Batch, histories [B, max(length)] (at least 1 wide), on the CPU.
    """
    start = samples.history_start[indices] + samples.history_length[indices] - length
    history = padded(data.items, start, length)
    target = samples.target[indices]
    as_tensor = torch.from_numpy
    if data.id_maps.category_ids is None:
        history_categories = target_categories = None
    else:
        history_categories = as_tensor(data.item_category[history] if data.categories is None
                                       else padded(data.categories, start, length))
        target_categories = as_tensor(data.item_category[target]
                                      if samples.target_category is None
                                      else samples.target_category[indices])
    features = numeric = None
    if data.rows is not None:
        row = samples.row[indices]
        features = {name: as_tensor(padded(values, data.rows.offsets[name][row],
                                           np.diff(data.rows.offsets[name])[row]))
                    for name, values in data.rows.values.items()} or None
        numeric = None if data.rows.numeric is None else as_tensor(data.rows.numeric[row])
    return Batch(as_tensor(history), history_categories, as_tensor(length.astype(np.int64)),
                 as_tensor(target), target_categories, as_tensor(samples.label[indices]),
                 as_tensor(samples.user[indices]), features, numeric)


def padded(values: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Ragged slices of ``values`` as a 0-padded matrix.

    Args:
        values: the flat 1-D array the rows are slices of.
        start: [R] int, where each row starts in ``values``.
        length: [R] int, each row's length.

    Returns:
        [R, width] rows ``values[start[r]:start[r] + length[r]]`` padded
        with 0 after each row's length, width the longest (at least 2), in
        ``values``' dtype (int64 when ``values`` is empty).
    """
    # At least 2: torch.compile gives a size of 0 or 1 a graph of its own, so
    # a batch whose rows all hold one value (or none) would compile again.
    width = max(int(length.max(initial=0)), 2)
    position = np.arange(width)
    valid = position < length[:, None]
    if not len(values):
        return np.zeros(valid.shape, dtype=np.int64)
    return np.where(valid, values[np.where(valid, start[:, None] + position, 0)], 0)
