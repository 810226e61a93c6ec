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
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .onnx_export import OUTPUT_NAME
from .package_inputs import METADATA_KEY, InputContract


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
    target_items, target_categories)`` (by position or by name) returns the
    logits [B, C] as a float32 tensor; inputs are CPU tensors or numpy arrays,
    shaped as :meth:`EncodedBatch.inputs` gives them. Every call is checked
    first against what the export recorded in the model, as
    ``din_fast.export.load`` checks a .pt2 package's calls (the ONNX graph
    checks nothing): narrower integer inputs (int32) are converted to int64,
    which is exact; a history of width T = 0 is padded to one position.

    Args:
        path: the .onnx file.
        providers: ONNX Runtime's execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions`` (threads, graph
            optimizations), or None for ONNX Runtime's defaults.

    Raises:
        ValueError: a model that din-fast export did not write (no record of
            its inputs).
    """

    def __init__(self, path, providers: Optional[Sequence[str]] = None, session_options=None):
        import onnxruntime   # the onnx extra: pip install onnxruntime

        self.name = Path(path).name
        self.session = onnxruntime.InferenceSession(
            str(path), sess_options=session_options,
            providers=list(providers or ["CPUExecutionProvider"]))
        self.contract = InputContract.from_metadata(
            self.session.get_modelmeta().custom_metadata_map)
        if self.contract is None:
            raise ValueError(f"OnnxModel: {path} holds no record of its inputs "
                             f"({METADATA_KEY}); expected a model din-fast export --format "
                             "onnx wrote")

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        """Logits [B, C] (float32 tensor) of the five inputs.

        Raises:
            TypeError: a missing, repeated or unknown input, or one that is
                not an integer tensor or array (int64, or narrower).
            ValueError: a wrong rank or shape, sizes that disagree between
                inputs, a length outside [0, T], an id outside the model's
                tables: each named by its input.
        """
        args = tuple(_as_tensor(value) for value in args)
        kwargs = {name: _as_tensor(value) for name, value in kwargs.items()}
        tensors = self.contract.prepare(self.name, args, kwargs)
        feed = {spec.name: tensor.numpy() for spec, tensor in zip(self.contract.inputs, tensors)}
        (logits,) = self.session.run([OUTPUT_NAME], feed)
        return torch.from_numpy(logits)


def _as_tensor(value):
    """A numpy array as a tensor (sharing its memory); anything else as it is."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value
