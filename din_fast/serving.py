"""From raw ids to scores: the inputs of an exported DIN, and its ONNX model run.

``din-fast export`` writes the model (an AOTInductor ``.pt2`` package or an
ONNX model) and, beside it, ``<name>.ids.json``: the raw ids in dense order
(``item_ids[i]`` is dense item ``i + 1``, 0 is the padding), and
``item_category``, the dense category of each dense item (``item_category[0]``
is 0, the padding row). :class:`Encoder` turns raw requests (a history of raw
item ids and the raw ids of the candidates to score) into the five tensors
both formats take; :class:`OnnxModel` runs an ONNX model with ONNX Runtime,
checking its inputs first.

    encoder = Encoder.from_json("din.ids.json")
    batch = encoder.encode(histories=[["i7", "i3"], []], candidates=[["i1", "i9"], ["i4"]])
    logits = OnnxModel("din.onnx")(*batch.inputs())             # [B, C]
    logits = din_fast.export.load("din.pt2")(*batch.rows()).view(batch.shape)

Ids are compared as strings (``din-fast train`` keeps them so), so the raw
id ``7`` and ``"7"`` are the same item. Nothing unknown is mapped to
anything: unknown history items are left out of the history (counted in
``unknown_history_items``), an unknown candidate is scored as the padding
item and marked ``known[b, c] = False`` (listed in ``unknown_candidates``):
its logit means nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .onnx_export import INPUT_NAMES, NUM_CATEGORIES_KEY, NUM_ITEMS_KEY, OUTPUT_NAME


@dataclass
class EncodedBatch:
    """A batch of B requests with up to C candidates each, as dense ids.

    ``history_items``, ``history_categories`` [B, T] int64 (0 after
    ``lengths[b]``; T the longest history, at least 1), ``lengths`` [B] int64,
    ``target_items``, ``target_categories`` [B, C] int64 (C the most
    candidates of a request; a request with fewer is padded with item 0),
    ``known`` [B, C] bool: True where a logit scores a real, known candidate.
    """

    history_items: torch.Tensor
    history_categories: torch.Tensor
    lengths: torch.Tensor
    target_items: torch.Tensor
    target_categories: torch.Tensor
    known: torch.Tensor
    unknown_history_items: int = 0
    unknown_candidates: list = field(default_factory=list)   # (request index, raw id)

    @property
    def shape(self) -> torch.Size:
        """(B, C): the shape of the logits."""
        return self.known.shape

    def inputs(self) -> tuple:
        """The five inputs with C candidates per row, [B, C] targets: what an
        ONNX model from ``din-fast export --format onnx`` (and din_fast.DIN's
        forward) takes; logits come back [B, C]."""
        return (self.history_items, self.history_categories, self.lengths, self.target_items,
                self.target_categories)

    def rows(self) -> tuple:
        """The five inputs with one candidate per row, [B * C] rows (row
        ``b * C + c`` is request b's history with its candidate c): what a
        ``.pt2`` package from ``din-fast export`` takes; ``logits.view(shape)``
        gives them back as [B, C]."""
        candidates = self.known.shape[1]
        history = [t.repeat_interleave(candidates, dim=0)
                   for t in (self.history_items, self.history_categories, self.lengths)]
        return (*history, self.target_items.reshape(-1), self.target_categories.reshape(-1))


class Encoder:
    """Raw ids to dense ids, with the id maps ``din-fast export`` writes.

    Args:
        item_ids: raw item ids in dense order (dense id = position + 1).
        category_ids: raw category ids in dense order.
        item_category: the dense category of each dense item, index 0 (the
            padding item) holding 0; len(item_ids) + 1 entries.
    """

    def __init__(self, item_ids: Sequence, category_ids: Sequence, item_category: Sequence[int]):
        if len(item_category) != len(item_ids) + 1 or (len(item_category) and item_category[0]):
            raise ValueError(f"Encoder: `item_category` must hold 0 (the padding item) and then "
                             f"one dense category per item, {len(item_ids) + 1} entries; got "
                             f"{len(item_category)} entries starting with "
                             f"{list(item_category[:1])}")
        self.item_dense = {str(raw): i + 1 for i, raw in enumerate(item_ids)}
        self.item_category = torch.as_tensor(list(item_category), dtype=torch.int64)
        self.num_items, self.num_categories = len(item_ids), len(category_ids)
        bad = (self.item_category < 0) | (self.item_category > self.num_categories)
        if bool(bad.any()):
            index = int(bad.nonzero()[0])
            raise ValueError(f"Encoder: `item_category` must hold dense categories in "
                             f"[0, {self.num_categories}]; got item_category[{index}] = "
                             f"{int(self.item_category[index])}")

    @classmethod
    def from_id_maps(cls, id_maps) -> "Encoder":
        """The encoder of a checkpoint's id maps (din_fast.data.IdMaps:
        ``load_checkpoint(path).id_maps``), to score with the eager model."""
        return cls(id_maps.item_ids.to_pylist(), id_maps.category_ids.to_pylist(),
                   id_maps.item_category.tolist())

    @classmethod
    def from_json(cls, path) -> "Encoder":
        """The encoder of the id maps ``path`` (``<name>.ids.json``, written
        beside the exported model)."""
        with open(path, encoding="utf-8") as handle:
            maps = json.load(handle)
        if not isinstance(maps, dict) or not {"item_ids", "category_ids",
                                              "item_category"} <= set(maps):
            raise ValueError(f"Encoder.from_json: {path} must hold a JSON object with "
                             "item_ids, category_ids and item_category (the <name>.ids.json "
                             "din-fast export writes)")
        return cls(maps["item_ids"], maps["category_ids"], maps["item_category"])

    def encode(self, histories: Sequence[Sequence], candidates: Sequence[Sequence],
               max_len: Optional[int] = None) -> EncodedBatch:
        """Dense inputs for B requests (see :class:`EncodedBatch`).

        Args:
            histories: B sequences of raw item ids, oldest first (may be empty).
            candidates: B sequences of raw item ids to score for each request
                (at least one each).
            max_len: keep the most recent ``max_len`` known items of each
                history (the model's training ``--max-len`` is a good choice);
                None keeps all.

        Raises:
            ValueError: histories and candidates of different lengths, a
                request without candidates, a bad max_len.
        """
        if len(histories) != len(candidates):
            raise ValueError(f"Encoder.encode: `histories` and `candidates` must have one entry "
                             f"per request; got {len(histories)} and {len(candidates)}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"Encoder.encode: `max_len` must be None or a positive integer; "
                             f"got {max_len!r}")
        for b, row in enumerate(candidates):
            if isinstance(row, (str, bytes)) or len(row) == 0:
                raise ValueError(f"Encoder.encode: `candidates[{b}]` must be a non-empty sequence "
                                 f"of raw item ids; got {row!r}")
        unknown_history = 0
        dense_histories = []
        for row in histories:
            dense = [self.item_dense.get(str(raw), 0) for raw in row]
            known = [i for i in dense if i]
            unknown_history += len(dense) - len(known)
            dense_histories.append(known[-max_len:] if max_len else known)
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
                target_items[b, c] = self.item_dense.get(str(raw), 0)
                known[b, c] = bool(target_items[b, c])
                if not known[b, c]:
                    unknown_candidates.append((b, raw))
        lengths = torch.tensor([len(row) for row in dense_histories], dtype=torch.int64)
        return EncodedBatch(history_items, self.item_category[history_items], lengths,
                            target_items, self.item_category[target_items], known,
                            unknown_history, unknown_candidates)


class OnnxModel:
    """An ONNX model from ``din-fast export --format onnx`` on ONNX Runtime.

    ``OnnxModel(path)(history_items, history_categories, lengths,
    target_items, target_categories)`` returns the logits [B, C] as a float32
    tensor; inputs are tensors or numpy arrays of an integer dtype, shaped as
    :class:`EncodedBatch.inputs` gives them. Each is checked before the run
    (the graph itself cannot): TypeError for a non-integer input, ValueError
    naming the input for a wrong shape, a length outside [0, T] or an id
    outside the model's tables.

    Args:
        path: the .onnx file.
        providers: ONNX Runtime's execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph
            optimizations), or None for ONNX Runtime's defaults.
    """

    def __init__(self, path, providers: Optional[Sequence[str]] = None, session_options=None):
        import onnxruntime   # the onnx extra: pip install onnxruntime

        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=session_options,
            providers=list(providers or ["CPUExecutionProvider"]))
        metadata = self.session.get_modelmeta().custom_metadata_map
        if NUM_ITEMS_KEY not in metadata or NUM_CATEGORIES_KEY not in metadata:
            raise ValueError(f"OnnxModel: {path} is not a model din-fast export --format onnx "
                             f"wrote (no {NUM_ITEMS_KEY} in its metadata)")
        self.num_items = int(metadata[NUM_ITEMS_KEY])
        self.num_categories = int(metadata[NUM_CATEGORIES_KEY])

    def __call__(self, history_items, history_categories, lengths, target_items,
                 target_categories) -> torch.Tensor:
        """Logits [B, C] (float32 tensor) of the five inputs.

        Raises:
            TypeError: an input that does not hold integers.
            ValueError: a wrong shape, a length outside [0, T], an id
                outside the model's tables.
        """
        arrays = check_inputs(dict(zip(INPUT_NAMES, (history_items, history_categories, lengths,
                                                     target_items, target_categories))),
                              self.num_items, self.num_categories)
        (logits,) = self.session.run([OUTPUT_NAME], arrays)
        return torch.from_numpy(logits)


def check_inputs(inputs: dict, num_items: int, num_categories: int) -> dict:
    """The ONNX model's inputs (``{name: tensor or array}``, names as
    din_fast.onnx_export.INPUT_NAMES) as C-contiguous int64 numpy arrays,
    each checked: an integer dtype (TypeError), history [B, T] with T >= 1,
    lengths [B] in [0, T], targets [B, C] with C >= 1, item ids in
    [0, num_items] and category ids in [0, num_categories] (ValueError)."""
    arrays = {}
    for name, value in inputs.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else \
            np.asarray(value)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"OnnxModel: `{name}` must hold integer ids; got dtype {array.dtype}")
        arrays[name] = np.ascontiguousarray(array, dtype=np.int64)
    history, lengths, targets = (arrays["history_items"], arrays["lengths"],
                                 arrays["target_items"])
    if history.ndim != 2 or history.shape[1] < 1 \
            or arrays["history_categories"].shape != history.shape:
        raise ValueError(f"OnnxModel: `history_items` and `history_categories` must both be "
                         f"[B, T] with T >= 1; got {history.shape} and "
                         f"{arrays['history_categories'].shape}")
    if lengths.shape != history.shape[:1]:
        raise ValueError(f"OnnxModel: `lengths` must be [B] with B = {history.shape[0]}, the "
                         f"rows of `history_items`; got {lengths.shape}")
    if targets.ndim != 2 or targets.shape[0] != history.shape[0] or targets.shape[1] < 1 \
            or arrays["target_categories"].shape != targets.shape:
        raise ValueError(f"OnnxModel: `target_items` and `target_categories` must both be "
                         f"[B, C] with B = {history.shape[0]} and C >= 1; got {targets.shape} "
                         f"and {arrays['target_categories'].shape}")
    bounds = {"lengths": (history.shape[1], "[0, T], T the width of `history_items`")}
    for name in INPUT_NAMES:
        if name != "lengths":
            high = num_items if name.endswith("items") else num_categories
            bounds[name] = (high, f"[0, {high}], the ids of the model's table")
    for name, (high, needs) in bounds.items():
        outside = np.argwhere((arrays[name] < 0) | (arrays[name] > high))
        if len(outside):
            index = tuple(int(i) for i in outside[0])
            raise ValueError(f"OnnxModel: `{name}` must lie in {needs}; got {name}"
                             f"[{', '.join(map(str, index))}] = {int(arrays[name][index])}")
    return arrays
