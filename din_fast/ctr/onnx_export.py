"""Serving on ONNX Runtime (or TensorRT): din_fast.DIN and BaseModel as an ONNX model.

The eager model does not export to ONNX as it is: on CUDA its attention runs
din_fast's custom ops (Triton kernels), and the torch backend packs the valid
history positions, a size that depends on the data. So the export traces
:class:`OnnxDIN`, which computes the same numbers over stock operators:
every history position is scored and the padding masked out, the first layer
folded into plain matrix products (``(W_q + W_d) q + (W_k - W_d) k +
W_p (q * k)``, no ``[B, C, T, 4D]`` concat), Dice and the scoring MLP in
their inference form (running statistics). The graph is then translated by
``torch.onnx.export`` (the torch.export-based exporter, which needs onnxscript).

The ONNX model (opset :data:`OPSET`) takes what the .pt2 package takes
(din_fast.ctr.export.input_layout), every axis but the rank dynamic: five
int64 inputs (without a category table, no category inputs), then, for a
model with side features, one input per categorical feature and the numeric
ones:

| input | shape | meaning |
|---|---|---|
| ``history_items`` | [B, T] | each history's dense item ids, oldest first, then 0 (the padding) |
| ``history_categories`` | [B, T] | the dense category of each history item |
| ``lengths`` | [B] | each row's history length, 0..T |
| ``target_items`` | [B, C] | dense ids of the C candidates of each row |
| ``target_categories`` | [B, C] | their dense categories |
| ``features_<name>`` | [B, C, V] | each candidate's dense ids of a side feature, 0 after them |
| ``numeric`` | [B, C, N] | float32, the numeric features standardized |

and returns ``logits`` [B, C] float32 (the click probability is their
sigmoid). Dense ids are what ``din-fast train`` encodes: item ``i`` of the id
maps is ``i + 1``, 0 is the padding (see :mod:`din_fast.ctr.serving`, which builds
these inputs from raw ids). The graph itself checks nothing (ONNX has no
assert): ONNX Runtime refuses an item id past the table, but reads a negative
one from the table's end and counts a length above T as T. So the export
records what the model takes in the model's metadata (``din_fast.inputs``,
din_fast.ctr.package_inputs' record, as a .pt2 package keeps it: each input's
dtype, named dims and value range), and :class:`din_fast.ctr.serving.OnnxModel`
checks every call against it.

    din_fast.ctr.onnx_export.export_onnx(model, "din.onnx")    # a DIN or BaseModel
    din_fast.ctr.onnx_export.export_checkpoint_onnx("din.pt", "din.onnx")   # + din.ids.json

``din-fast export --format onnx`` does the latter.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

from din_fast.activations import activate
from din_fast.modules import DINAttention
from din_fast.problem import split_first_layer
from din_fast.reference import masked_normalize
from .errors import InputError
from .export import (din_dynamic_shapes, din_example_inputs, din_padding_dims,
                     checkpoint_layout, din_value_ranges, ids_metadata, ids_path_of,
                     writing_id_maps)
from .files import check_outputs, replacing
from .models import BaseModel, score
from .package_inputs import InputContract

# ONNX Runtime has run opset 18 since 1.14, TensorRT since 8.6.
OPSET = 18
INPUT_NAMES = ("history_items", "history_categories", "lengths", "target_items",
               "target_categories")
OUTPUT_NAME = "logits"
# A single-file ONNX model is one protobuf message, which holds at most 2 GiB.
MAX_BYTES = 2 ** 31
QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration",
                 "onnxscript.optimizer._constant_folding")


def masked_attention(layer: DINAttention, query: torch.Tensor, keys: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """``layer(query, keys, lengths)`` in eval mode, over stock operators
    only: the pooled history.

    Every position is scored (nothing of a data-dependent size), then the
    padding is masked out of the weights, and the padding keys are zeroed
    before the weighted sum, so whatever ids the padding holds never reach
    the result (the eager layer's guarantee).

    Args:
        layer: the model's DINAttention (exact: no ``top_k``), in eval mode.
        query: [B, C, D] float32, the candidates' embeddings.
        keys: [B, T, D] float32, the history's embeddings (also the values).
        lengths: [B] int64, each row's history length, in [0, T].

    Returns:
        The pooled history [B, C, D], float32.

    Raises:
        ValueError: a layer with Dice in training mode (its batch statistics
            do not export).
    """
    if layer.training and layer.activation == "dice":
        raise ValueError("masked_attention: Dice's batch statistics exist in training mode "
                         "only; put the layer in eval mode (model.eval()) to export it")
    valid = torch.arange(keys.shape[1], device=keys.device)[None, :] < lengths[:, None]
    keys = torch.where(valid[:, :, None], keys, torch.zeros((), dtype=keys.dtype))
    w_q, w_k, w_d, w_p = split_first_layer(layer.hidden[0].weight)
    per_query = query @ (w_q + w_d).t() + layer.hidden[0].bias                  # [B, C, H1]
    per_key = keys @ (w_k - w_d).t()                                            # [B, T, H1]
    h = (per_query[:, :, None, :] + per_key[:, None, :, :]
         + (query[:, :, None, :] * keys[:, None, :, :]) @ w_p.t())             # [B, C, T, H1]
    # activate()'s per-layer params: () / (a,) / (a, mu, var).
    params = layer.activation_params() or [()] * len(layer.hidden)
    for i, linear in enumerate(layer.hidden):
        if i:
            h = linear(h)
        layer_params = params[i] if isinstance(params[i], tuple) else (params[i],)
        h = activate(h, layer.activation, layer_params, layer.dice_eps)
    scores = layer.output(h).squeeze(-1)                                        # [B, C, T]
    weights = masked_normalize(scores, valid, layer.normalization, layer.scale)
    return weights @ keys


class OnnxDIN(nn.Module):
    """A trained DIN or BaseModel (in eval mode) with C candidates per row,
    over stock operators: the module :func:`export_onnx` traces. It computes
    what ``model(...)`` computes for the same inputs, to float rounding.

    Args:
        model: the din_fast.DIN or BaseModel to export (exact attention).

    Raises:
        TypeError: another kind of model.
        ValueError: a two-stage (``top_k``) attention.
    """

    def __init__(self, model: BaseModel):
        super().__init__()
        if not isinstance(model, BaseModel):
            raise TypeError(f"OnnxDIN: `model` must be a din_fast.DIN or BaseModel; got "
                            f"{type(model).__name__}")
        if getattr(getattr(model, "attention", None), "top_k", None) is not None:
            raise ValueError("OnnxDIN: the model's attention is two-stage (top_k); the ONNX "
                             "export computes exact DIN only")
        self.model = model

    def forward(self, history_items, history_categories, lengths, target_items,
                target_categories, features=None, numeric=None):
        """The logits of C candidates per row.

        Args:
            history_items: [B, T] int64 dense item ids, oldest first, 0 after
                ``lengths[b]``.
            history_categories: [B, T] int64, the dense category of each (None
                for a model without categories).
            lengths: [B] int64, each row's history length, in [0, T].
            target_items: [B, C] int64, the candidates' dense item ids.
            target_categories: [B, C] int64, their dense categories (None
                without categories).
            features: {side feature: [B, C, V] int64 dense ids, 0 after a
                candidate's values}, every side feature of the model; None
                without.
            numeric: [B, C, N] float32, the numeric side features standardized;
                None without.

        Returns:
            The logits [B, C] float32; the click probability is their sigmoid.
        """
        model = self.model
        candidate = model.embed(target_items, target_categories)               # [B, C, 2E]
        history = model.embed(history_items, history_categories)               # [B, T, 2E]
        if isinstance(getattr(model, "attention", None), DINAttention):
            interest = masked_attention(model.attention, candidate, history, lengths)
        else:
            interest = model.pool(candidate, history, lengths)
        logits = score(model.mlp, model.mlp_input, interest, candidate,
                       model.side_features(candidate, features, numeric))
        return model.add_shallow_terms(logits, history_items, history_categories, lengths,
                                       target_items, target_categories, features, numeric)


def export_onnx(model: BaseModel, path, metadata: Optional[dict] = None) -> str:
    """Write ``model`` as the ONNX model ``path`` (see the module's docstring
    for its inputs and output).

    The model is exported on the CPU in eval mode, then put back on its
    device and in its mode. The file is written whole or not at all (a
    temporary file beside it, then a rename). It records what it takes in
    its metadata (``din_fast.inputs``), which
    din_fast.ctr.serving.OnnxModel checks every call against.

    Args:
        model: a din_fast.DIN or BaseModel (exact attention).
        path: the file to write (``.onnx`` by convention).
        metadata: more {key: string} entries recorded in the model's
            metadata (``din-fast export``: din_fast.ctr.export.ids_metadata).

    Returns:
        ``path``, as a string.

    Raises:
        TypeError: another kind of model.
        ValueError: parameters over ONNX's 2 GiB, a two-stage (top-K)
            attention, or side features that would share an input
            (din_fast.ctr.export.feature_inputs).
        ImportError: onnx or onnxscript missing (din_fast's ``onnx`` extra).
        din_fast.ctr.errors.OutputError: the file cannot be written.
    """
    _require_exporter()
    scorer = OnnxDIN(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size >= MAX_BYTES:
        raise ValueError(f"export_onnx: the model's parameters take {size / 2 ** 30:.1f} GiB; "
                         "a single-file ONNX model holds less than 2 GiB (serve it as an "
                         "AOTInductor package: din_fast.ctr.export.export_din)")
    was_training, device = model.training, next(model.parameters()).device
    scorer.cpu().eval()
    shapes = din_dynamic_shapes(model)
    try:
        # On the CPU now: the example inputs follow the parameters there.
        program = torch.export.export(scorer, din_example_inputs(model), dynamic_shapes=shapes)
        # What the model takes, recorded as the .pt2 package records it, for
        # din_fast.ctr.serving.OnnxModel to check every call against.
        contract = InputContract.of_program(program, shapes, din_value_ranges(model),
                                            padding_dims=din_padding_dims(model))
        with _exporter_notes_quiet():
            onnx_program = torch.onnx.export(program, dynamo=True, opset_version=OPSET,
                                             input_names=[s.name for s in contract.inputs],
                                             output_names=[OUTPUT_NAME], verbose=False)
    finally:
        model.to(device).train(was_training)
    onnx_program.model.metadata_props.update({**(metadata or {}), **contract.to_metadata()})
    with replacing(path, "--out") as temporary:
        onnx_program.save(temporary, external_data=False)
    return str(path)


def export_checkpoint_onnx(checkpoint_path, path) -> tuple[str, str]:
    """The ONNX model of a ``din-fast train`` checkpoint (:func:`export_onnx`)
    and its id maps beside it, ``<path stem>.ids.json`` (as the .pt2 export
    writes them, din_fast.ctr.export.writing_id_maps): both whole, or neither.
    The model records the id maps' fingerprint
    (din_fast.ctr.export.ids_metadata).

    Args:
        checkpoint_path: a ``din-fast train --checkpoint`` file.
        path: the ONNX model to write, ending in ``.onnx``.

    Returns:
        (model, id maps) paths.

    Raises:
        din_fast.ctr.errors.InputError: a path that does not end in .onnx, a
            bad checkpoint, a missing exporter, or a model the export refuses
            (one line, naming the option).
        din_fast.ctr.errors.OutputError: an output that is an input (the
            checkpoint), a directory, or cannot be written; id maps of
            another checkpoint's .pt2 package of the same stem
            (din_fast.ctr.export.check_shared_id_maps).
    """
    # Imported here: the training stack is needed by this entry point only.
    from .checkpoint import restored_model
    from .training import checkpoint_for_run

    if not str(path).endswith(".onnx"):
        raise InputError(f"--out {path}: an ONNX model's name must end in .onnx")
    try:
        _require_exporter()
    except ImportError as error:
        raise InputError(f"--format onnx: {error}") from None
    check_outputs({"--out": path, "--out's id maps": ids_path_of(path)},
                  {"--checkpoint": checkpoint_path})
    checkpoint, config = checkpoint_for_run(checkpoint_path, "torch", "cpu")
    model = restored_model(checkpoint, config)
    with writing_id_maps(checkpoint.id_maps, path, checkpoint_layout(model, checkpoint_path),
                         config.max_len) as ids_path:
        try:
            written = export_onnx(model, path, ids_metadata(checkpoint.id_maps))
        except ValueError as error:
            raise InputError(f"--checkpoint {checkpoint_path}: {error}") from None
    return written, ids_path


@contextmanager
def _exporter_notes_quiet():
    """The exporter's notes that a user can do nothing about, silenced: how it
    names the dynamic axes (each shared by several inputs), torchvision's ops
    it does not register, a Split it does not constant-fold."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _require_exporter() -> None:
    """ImportError naming the extra unless torch.onnx's exporter can run."""
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"the ONNX export needs {' and '.join(missing)} (din_fast's onnx "
                          "extra: pip install onnx onnxscript onnxruntime)")

