"""From raw ids to scores: the inputs of an exported DIN, and its ONNX model run.

``din-fast export`` writes the model (an AOTInductor ``.pt2`` package or an
ONNX model) and, beside it, ``<name>.ids.json``: the raw ids in dense order
(``item_ids[i]`` is dense item ``i + 1``, 0 is the padding), and
``item_category``, the dense category of each dense item (``item_category[0]``
is 0, the padding row), and the rare items (``rare_items``: seen too seldom
in training for a row of their own, they share the reserved one) with their
categories (``rare_item_category``), and ``max_len``, the model's training
``--max-len``: the most recent history items :meth:`Encoder.encode` keeps
by default, as ``din-fast predict`` does. :class:`Encoder` turns raw requests (a history of raw
item ids and the raw ids of the candidates to score) into the five tensors
both formats take; :class:`OnnxModel` runs an ONNX model with ONNX Runtime,
checking its inputs first.

    model = OnnxModel("din.onnx")                      # or din_fast.ctr.export.load("din.pt2")
    encoder = Encoder.from_json("din.ids.json", model=model)    # ValueError: not its id maps
    batch = encoder.encode(histories=[["i7", "i3"], []], candidates=[["i1", "i9"], ["i4"]])
    logits = model(*batch.inputs())                             # [B, C]

Each export records the fingerprint of its id maps in the model
(``ids_fingerprint``); given the loaded model, :meth:`Encoder.from_json`
refuses id maps of another fingerprint (a JSON another checkpoint's export
wrote), whose dense ids would score other items than the request names.

Ids are compared as strings (``din-fast train`` keeps them so), so the raw
id ``7`` and ``"7"`` are the same item, and trimmed as train and predict
trim them (``" 7"`` too). With maps of the DIN protocol nothing
unknown is mapped to anything: unknown history items are left out of the
history (counted in ``unknown_history_items``), an unknown candidate is
scored as the padding item and marked ``known[b, c] = False`` (listed in
``unknown_candidates``): its logit means nothing. The maps of a labeled log
(``unknown``) have a reserved id for what their training rows never held:
unknown history items, candidates and side-feature values take it (and are
counted and listed the same way), and such a candidate's logit is the
model's score of an unseen item. A rare item takes the reserved id too, with
its own category, as ``din-fast predict`` gives it.

A model with side features takes them after the ids, in both formats, one
``[B, C, V]`` input per categorical feature and ``[B, C, N]`` numeric ones
(:meth:`Encoder.encode`'s ``features``; the ``inputs`` of ``<name>.ids.json``
list them in order).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .export import IDS_FINGERPRINT_KEY
from .labeled_loader import SEPARATOR
from .labeled_samples import standardized
from .onnx_export import OUTPUT_NAME
from .package_inputs import METADATA_KEY, InputContract


@dataclass
class EncodedBatch:
    """A batch of B requests with up to C candidates each, as dense ids: what
    :meth:`Encoder.encode` returns and both exported formats take
    (:meth:`inputs`).

    Args:
        history_items: [B, T] int64 dense item ids, oldest first, 0 after
            ``lengths[b]`` (T the longest history, at least 1).
        history_categories: [B, T] int64, the dense category of each (0 at
            the padding); None for maps without categories.
        lengths: [B] int64, each history's length, in [0, T].
        target_items: [B, C] int64, the candidates' dense item ids (C the most
            candidates of a request; a request with fewer is padded with
            item 0).
        target_categories: [B, C] int64, their dense categories; None for
            maps without categories.
        known: [B, C] bool, True where a logit scores a real, known candidate.
        unknown_history_items: how many history items the maps do not hold
            (left out, or given the reserved id with ``unknown`` maps).
        unknown_candidates: (request index, raw id) of each unknown candidate.
        features: {side feature: [B, C, V] int64 dense ids, 0 after a
            candidate's values}, in the maps' order; None without side
            features.
        numeric: [B, C, N] float32, the numeric side features standardized as
            in training; None without numeric features.
        unknown_feature_values: how many side-feature values the maps do not
            hold.
    """

    history_items: torch.Tensor
    history_categories: Optional[torch.Tensor]
    lengths: torch.Tensor
    target_items: torch.Tensor
    target_categories: Optional[torch.Tensor]
    known: torch.Tensor
    unknown_history_items: int = 0
    unknown_candidates: list = field(default_factory=list)   # (request index, raw id)
    features: Optional[dict] = None
    numeric: Optional[torch.Tensor] = None
    unknown_feature_values: int = 0

    @property
    def shape(self) -> torch.Size:
        """(B, C): the shape of the logits."""
        return self.known.shape

    def inputs(self) -> tuple:
        """The inputs with C candidates per row, [B, C] targets: what both
        formats of ``din-fast export`` (the .pt2 package and the ONNX model)
        take, in their order (the five ids, the categories left out without
        categories, then the side features [B, C, V] and the numeric ones
        [B, C, N]); logits come back [B, C]. din_fast.DIN's forward takes
        the same tensors, its side features as ``features`` ({feature:
        [B, C, V]}) and ``numeric``."""
        side = [*(self.features or {}).values(), self.numeric]
        return tuple(t for t in (self.history_items, self.history_categories, self.lengths,
                                 self.target_items, self.target_categories, *side)
                     if t is not None)


class Encoder:
    """Raw ids to dense ids, with the id maps ``din-fast export`` writes.

    Args:
        item_ids: raw item ids in dense order (dense id = position + 1).
        category_ids: raw category ids in dense order; None without categories.
        item_category: the dense category of each dense item, index 0 (the
            padding item) holding 0; len(item_ids) + 1 entries (None without
            categories).
        unknown: whether every table has the reserved id ``len(ids) + 1``
            for ids not listed (the maps of a labeled log).
        features: {side feature: its raw values in dense order}.
        numeric: {numeric feature: (mean, standard deviation)}, which
            standardize it as in training.
        rare_items: the raw items that share the reserved row (seen too
            seldom in training for one of their own); None: none.
        rare_item_category: the dense category of each of ``rare_items``
            (None without categories).
        fingerprint: the id maps' fingerprint (din_fast.ctr.data.IdMaps'),
            which an exported model records; None: unknown.
        max_len: the most recent history items the model was trained on
            (its ``--max-len``), which :meth:`encode` keeps by default, as
            din-fast predict does; None: all.

    Raises:
        ValueError: an ``item_category`` of another length than
            ``len(item_ids) + 1``, not starting with 0, or holding a category
            outside the maps'; rare items without ``unknown`` maps, or a
            ``rare_item_category`` that does not give each of them a category
            in the maps'.
    """

    def __init__(self, item_ids: Sequence, category_ids: Optional[Sequence],
                 item_category: Optional[Sequence[int]], unknown: bool = False,
                 features: Optional[dict] = None, numeric: Optional[dict] = None,
                 rare_items: Optional[Sequence] = None,
                 rare_item_category: Optional[Sequence[int]] = None,
                 fingerprint: Optional[str] = None, max_len: Optional[int] = None):
        self.fingerprint = fingerprint
        self.max_len = _checked_max_len("Encoder", max_len)
        self.item_dense = {str(raw): i + 1 for i, raw in enumerate(item_ids)}
        self.num_items = len(item_ids)
        self.unknown = bool(unknown)
        if rare_items and not self.unknown:
            raise ValueError("Encoder: `rare_items` share the reserved row, which only maps "
                             "with `unknown` True have; got unknown=False")
        self.rare_category = {}     # {raw rare item: its dense category}
        self.features = {name: {str(raw): i + 1 for i, raw in enumerate(values)}
                         for name, values in (features or {}).items()}
        self.numeric = {name: (float(mean), float(std))
                        for name, (mean, std) in (numeric or {}).items()}
        if category_ids is None:
            self.item_category, self.num_categories = None, 0
            return
        if len(item_category) != len(item_ids) + 1 or (len(item_category) and item_category[0]):
            raise ValueError(f"Encoder: `item_category` must hold 0 (the padding item) and then "
                             f"one dense category per item, {len(item_ids) + 1} entries; got "
                             f"{len(item_category)} entries starting with "
                             f"{list(item_category[:1])}")
        self.num_categories = len(category_ids) + self.unknown
        self.item_category = torch.as_tensor(list(item_category), dtype=torch.int64)
        bad = (self.item_category < 0) | (self.item_category > self.num_categories)
        if bool(bad.any()):
            index = int(bad.nonzero()[0])
            raise ValueError(f"Encoder: `item_category` must hold dense categories in "
                             f"[0, {self.num_categories}]; got item_category[{index}] = "
                             f"{int(self.item_category[index])}")
        if self.unknown:    # the reserved item's category: the reserved one
            self.item_category = torch.cat([self.item_category,
                                            torch.tensor([self.num_categories])])
        rare_items = list(rare_items or [])
        rare_item_category = list(rare_item_category or [])
        if len(rare_item_category) != len(rare_items) or not all(
                isinstance(c, int) and 1 <= c <= self.num_categories
                for c in rare_item_category):
            raise ValueError(f"Encoder: `rare_item_category` must hold one dense category in "
                             f"[1, {self.num_categories}] for each of the {len(rare_items)} "
                             f"rare items; got {len(rare_item_category)} entries")
        self.rare_category = {str(raw): c for raw, c in zip(rare_items, rare_item_category)}

    @classmethod
    def from_id_maps(cls, id_maps, max_len: Optional[int] = None) -> "Encoder":
        """The encoder of a checkpoint's id maps, to score with the eager model.

        Args:
            id_maps: din_fast.ctr.data.IdMaps, ``load_checkpoint(path).id_maps``.
            max_len: :meth:`encode`'s default, the checkpoint's
                ``config.max_len``; None: all.
        """
        categories = id_maps.category_ids is not None
        rare = id_maps.rare_items is not None and categories
        return cls(id_maps.item_ids.to_pylist(),
                   id_maps.category_ids.to_pylist() if categories else None,
                   id_maps.item_category.tolist() if categories else None, id_maps.unknown,
                   {name: values.to_pylist() for name, values in id_maps.features.items()},
                   id_maps.numeric, id_maps.rare_items.to_pylist() if rare else None,
                   id_maps.rare_item_category.tolist() if rare else None,
                   id_maps.fingerprint(), max_len)

    @classmethod
    def from_json(cls, path, model=None) -> "Encoder":
        """The encoder of the id maps ``path`` (``<name>.ids.json``, written
        beside the exported model), checked against the model it encodes for.

        Args:
            path: the JSON file (str or path-like).
            model: the exported model the requests go to, loaded
                (din_fast.ctr.export.load's package or an :class:`OnnxModel`):
                the JSON's ``fingerprint`` must be the one the model recorded
                (a model exported before din-fast recorded it, or a JSON
                without one, is not checked); None: not checked.

        The JSON's ``max_len`` (the model's training ``--max-len``, which
        din-fast export records) becomes :meth:`encode`'s default; a JSON
        without one (an older export) keeps whole histories.

        Raises:
            ValueError: a file that does not hold a JSON object with
                ``item_ids``, ``category_ids`` and ``item_category``, or whose
                ``item_category`` does not fit its ids (as :class:`Encoder`),
                or a ``max_len`` that is not null or a positive integer;
                id maps that are not ``model``'s.
            TypeError: a ``model`` that is not a loaded exported model.
            OSError: the file cannot be read.
        """
        with open(path, encoding="utf-8") as handle:
            maps = json.load(handle)
        if not isinstance(maps, dict) or not {"item_ids", "category_ids",
                                              "item_category"} <= set(maps):
            raise ValueError(f"Encoder.from_json: {path} must hold a JSON object with "
                             "item_ids, category_ids and item_category (the <name>.ids.json "
                             "din-fast export writes)")
        numeric = {name: (stats["mean"], stats["std"])
                   for name, stats in maps.get("numeric", {}).items()}
        if model is not None:
            _check_pair(path, maps.get("fingerprint"), model)
        return cls(maps["item_ids"], maps["category_ids"], maps["item_category"],
                   maps.get("unknown", False), maps.get("features", {}), numeric,
                   maps.get("rare_items"), maps.get("rare_item_category"),
                   maps.get("fingerprint"), maps.get("max_len"))

    def dense_item(self, raw) -> int:
        """A raw item's dense id: its own, else the reserved one (maps with
        ``unknown``), else 0.

        Args:
            raw: the raw item id (compared as a string, trimmed as din-fast
                train and predict trim it).
        """
        return self.item_dense.get(_item_id(raw), self.num_items + 1 if self.unknown else 0)

    def encode(self, histories: Sequence[Sequence], candidates: Sequence[Sequence],
               max_len: Optional[int] = None,
               features: Optional[Sequence[dict]] = None) -> EncodedBatch:
        """Dense inputs for B requests (see :class:`EncodedBatch`).

        Args:
            histories: B sequences of raw item ids, oldest first (may be empty).
            candidates: B sequences of raw item ids to score for each request
                (at least one each).
            max_len: keep the most recent ``max_len`` known items of each
                history; None: the encoder's ``max_len`` (from
                :meth:`from_json`, the model's training ``--max-len``, which
                din-fast predict keeps too), all where it has none.
            features: for maps with side features, B dicts {feature: value},
                every side and numeric feature of the maps: one value for all
                of the request's candidates or a list of one per candidate; a
                categorical value holds its ids separated by ``|``. For maps
                without any: None, or B empty dicts.

        Raises:
            ValueError: histories and candidates of different lengths, a
                request without candidates, a bad max_len, a missing or
                malformed feature value.
        """
        if len(histories) != len(candidates):
            raise ValueError(f"Encoder.encode: `histories` and `candidates` must have one entry "
                             f"per request; got {len(histories)} and {len(candidates)}")
        max_len = _checked_max_len("Encoder.encode", max_len) or self.max_len
        for b, row in enumerate(candidates):
            if isinstance(row, (str, bytes)) or len(row) == 0:
                raise ValueError(f"Encoder.encode: `candidates[{b}]` must be a non-empty sequence "
                                 f"of raw item ids; got {row!r}")
        side = self.features or self.numeric
        if side and (features is None or len(features) != len(candidates)):
            raise ValueError(f"Encoder.encode: `features` must hold one dict per request for "
                             f"the model's side features {list(self.features)}"
                             f"{list(self.numeric)}")
        unknown_history = 0
        dense_histories, rare_history = [], []
        for b, row in enumerate(histories):
            dense = [self.dense_item(raw) for raw in row]
            known = [i for i in dense if 0 < i <= self.num_items]
            unknown_history += len(dense) - len(known)
            kept = dense if self.unknown else known
            kept = kept[-max_len:] if max_len else kept
            if self.rare_category:  # every item kept (the reserved id): row's last len(kept)
                rare_history += [(b, t, raw) for t, raw in
                                 enumerate(list(row)[len(row) - len(kept):])]
            dense_histories.append(kept)
        length = max([1] + [len(row) for row in dense_histories])
        count = max(len(row) for row in candidates) if len(candidates) else 1
        history_items = torch.zeros(len(histories), length, dtype=torch.int64)
        target_items = torch.zeros(len(candidates), count, dtype=torch.int64)
        known = torch.zeros(len(candidates), count, dtype=torch.bool)
        unknown_candidates = []
        for b, row in enumerate(dense_histories):
            history_items[b, :len(row)] = torch.tensor(row, dtype=torch.int64)
        for b, row in enumerate(candidates):
            for c, raw in enumerate(row):
                target_items[b, c] = self.dense_item(raw)
                known[b, c] = 0 < int(target_items[b, c]) <= self.num_items
                if not known[b, c]:
                    unknown_candidates.append((b, raw))
        lengths = torch.tensor([len(row) for row in dense_histories], dtype=torch.int64)
        history_categories = target_categories = None
        if self.item_category is not None:
            history_categories = self.item_category[history_items]
            target_categories = self.item_category[target_items]
            if self.rare_category:
                self._rare_categories(history_categories, rare_history)
                self._rare_categories(target_categories, [
                    (b, c, raw) for b, row in enumerate(candidates)
                    for c, raw in enumerate(row)])
        batch = EncodedBatch(history_items, history_categories, lengths, target_items,
                             target_categories, known, unknown_history, unknown_candidates)
        if side:
            self._add_features(batch, features, [len(row) for row in candidates], count)
        elif features is not None:      # checked all the same: none may be given
            self._features_of_requests(features, [len(row) for row in candidates])
        return batch

    def _rare_categories(self, categories: torch.Tensor, positions: list) -> None:
        """Give each rare item among ``positions`` ((row, column, raw id) of
        ``categories``) its own category in place of the reserved one."""
        for b, t, raw in positions:
            category = self.rare_category.get(_item_id(raw))
            if category is not None:
                categories[b, t] = category

    def _features_of_requests(self, features: Sequence[dict], counts: list) -> list:
        """:meth:`encode_features` of each request's (``counts[b]``
        candidates), a ValueError naming the request."""
        encoded = []
        for b, (given, candidates) in enumerate(zip(features, counts)):
            try:
                encoded.append(self.encode_features(given, candidates))
            except ValueError as error:
                raise ValueError(f"Encoder.encode: features[{b}]: {error}") from None
        return encoded

    def _add_features(self, batch: EncodedBatch, features: Sequence[dict], counts: list,
                      count: int) -> None:
        encoded = self._features_of_requests(features, counts)
        widest = {name: max([1] + [len(ids) for ids_of, _, _ in encoded
                                   for ids in ids_of[name]]) for name in self.features}
        batch.features = {name: torch.zeros(len(counts), count, widest[name], dtype=torch.int64)
                          for name in self.features}
        if self.numeric:
            batch.numeric = torch.zeros(len(counts), count, len(self.numeric))
        for b, (ids_of, numeric, unknown) in enumerate(encoded):
            for name, per_candidate in ids_of.items():
                for c, ids in enumerate(per_candidate):
                    batch.features[name][b, c, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            if numeric is not None:
                batch.numeric[b, :len(numeric)] = torch.tensor(numeric)
            batch.unknown_feature_values += unknown

    def encode_features(self, given: dict, count: int) -> tuple:
        """One request's side features for ``count`` candidates.

        Args:
            given: {feature: value}, every side and numeric feature of the maps:
                one value for all candidates or a list of one per candidate; a
                categorical value holds its ids separated by ``|``.
            count: the request's number of candidates.

        Returns:
            ({feature: a list of dense ids per candidate}, the numeric features
            standardized (``count`` lists of N) or None, the number of values the
            maps do not hold).

        Raises:
            ValueError: a missing, extra or malformed value, a number beyond
                float32's range once standardized, or a list of another
                length than ``count``, naming the feature.
        """
        wanted = list(self.features) + list(self.numeric)
        if not isinstance(given, dict):
            raise ValueError(f"must be a dict {{feature: value}} of {wanted}")
        missing = [name for name in wanted if name not in given]
        extra = sorted(set(given) - set(wanted))
        if missing or extra:
            problem = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, not one of them"
            raise ValueError(f"{problem}; the model takes "
                             f"{', '.join(wanted) if wanted else 'no side features'}")

        def per_candidate(name):
            value = given[name]
            if isinstance(value, (list, tuple)):
                if len(value) != count:
                    raise ValueError(f"{name!r} has {len(value)} values for {count} candidates; "
                                     "give one value, or one per candidate (several values of "
                                     f"one go in one string, separated by {SEPARATOR!r})")
                return value
            return [value] * count
        ids_of, unknown = {}, 0
        for name, dense_of in self.features.items():
            reserved = len(dense_of) + 1 if self.unknown else 0
            ids_of[name] = []
            for value in per_candidate(name):
                if not isinstance(value, (str, int)) or isinstance(value, bool) \
                        or "\0" in str(value):
                    raise ValueError(f"{name!r} holds {value!r}; expected ids (several "
                                     f"separated by {SEPARATOR!r})")
                tokens = [t.strip() for t in str(value).split(SEPARATOR) if t.strip()]
                ids = [dense_of.get(t, reserved) for t in tokens]
                unknown += sum(i == 0 or i == reserved for i in ids)
                ids_of[name].append([i for i in ids if i])
        numeric = None
        if self.numeric:
            columns = []
            for name, (mean, std) in self.numeric.items():
                column = []
                for value in per_candidate(name):
                    try:
                        number = float(value)
                    except (TypeError, ValueError):
                        number = math.nan
                    if not math.isfinite(number) or isinstance(value, bool):
                        raise ValueError(f"{name!r} holds {value!r}; expected a finite number")
                    column.append(number)
                try:
                    columns.append(standardized(column, mean, std).tolist())
                except ValueError as error:
                    raise ValueError(f"{name!r}: {error}") from None
            numeric = [list(row) for row in zip(*columns)]
        return ids_of, numeric, unknown


class OnnxModel:
    """An ONNX model from ``din-fast export --format onnx`` on ONNX Runtime.

    ``OnnxModel(path)(history_items, history_categories, lengths,
    target_items, target_categories[, features_<name>..., numeric])`` (by
    position or by name, in the order of the id maps' ``inputs``) returns the
    logits [B, C] as a float32 tensor; inputs are CPU tensors or numpy arrays,
    shaped as :meth:`EncodedBatch.inputs` gives them. Every call is checked
    first against what the export recorded in the model, as
    ``din_fast.ctr.export.load`` checks a .pt2 package's calls (the ONNX graph
    checks nothing): narrower integer inputs (int32) are converted to int64,
    which is exact; a history of width T = 0 is padded to one position.

    Args:
        path: the .onnx file.
        providers: ONNX Runtime's execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph
            optimizations), or None for ONNX Runtime's defaults.

    ``ids_fingerprint`` is the fingerprint of the id maps it was exported
    with (None for a model without one), which :meth:`Encoder.from_json`
    checks its JSON against.

    Raises:
        ValueError: a model that din-fast export did not write (no record of
            its inputs).
        ImportError: onnxruntime missing (din_fast's ``onnx`` extra).
    """

    def __init__(self, path, providers: Optional[Sequence[str]] = None, session_options=None):
        import onnxruntime   # the onnx extra: pip install onnxruntime

        self.name = Path(path).name
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=session_options,
            providers=list(providers or ["CPUExecutionProvider"]))
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.contract = InputContract.from_metadata(metadata)
        self.ids_fingerprint = metadata.get(IDS_FINGERPRINT_KEY)
        if self.contract is None:
            raise ValueError(f"OnnxModel: {path} holds no record of its inputs "
                             f"({METADATA_KEY}); expected a model din-fast export --format "
                             "onnx wrote")

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """Logits [B, C] (float32 tensor) of the model's inputs (the five ids,
        then any side features), by position or by name.

        Raises:
            TypeError: a missing, repeated or unknown input, or one of a dtype
                that does not convert exactly (ids: int64 or a narrower integer;
                numeric: float32 or narrower).
            ValueError: a wrong rank or shape, sizes that disagree between
                inputs (one B, T, C and V per feature), a length outside [0, T],
                an id outside the model's tables: each named by its input.
        """
        args = tuple(_as_tensor(value) for value in args)
        kwargs = {name: _as_tensor(value) for name, value in kwargs.items()}
        tensors = self.contract.prepare(self.name, args, kwargs)
        feed = {spec.name: tensor.numpy() for spec, tensor in zip(self.contract.inputs, tensors)}
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        return torch.from_numpy(logits)


def _check_pair(path, fingerprint, model) -> None:
    """ValueError unless the id maps ``path`` (their ``fingerprint``) are
    the ones ``model`` was exported with; unchecked where either lacks a
    fingerprint."""
    if not hasattr(model, "ids_fingerprint"):
        raise TypeError(f"Encoder.from_json: `model` must be a loaded exported model "
                        f"(din_fast.ctr.export.load or OnnxModel); got {type(model).__name__}")
    recorded = model.ids_fingerprint
    if fingerprint is None or recorded is None or fingerprint == recorded:
        return
    raise ValueError(f"Encoder.from_json: {path} holds id maps of fingerprint "
                     f"{str(fingerprint)[:12]}, but {model.name} was exported with id maps of "
                     f"fingerprint {recorded[:12]} (another checkpoint's); its requests would be "
                     "encoded with the wrong ids. Use the <name>.ids.json that din-fast export "
                     "wrote with this model, or export its checkpoint again")


def _checked_max_len(owner: str, max_len):
    """``max_len``, ValueError unless it is None or a positive integer."""
    if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool)
                                or max_len < 1):
        raise ValueError(f"{owner}: `max_len` must be None or a positive integer; "
                         f"got {max_len!r}")
    return max_len


def _item_id(raw) -> str:
    """A raw item id as the id maps hold it: a string, surrounding
    whitespace trimmed (the loaders and din-fast predict trim it: " i7" is
    the item "i7")."""
    return str(raw).strip()


def _as_tensor(value):
    """A numpy array as a tensor (sharing its memory); anything else as it is."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value
