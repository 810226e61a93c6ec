"""Deploying without Python: a model that uses DINAttention as an AOTInductor package.

``torch.export`` traces the model into a graph of aten operations (the
attention unit's torch backend runs on every position with the padding
zeroed, which traces; on CUDA the fused Triton kernels are traced in
themselves), and ``torch._inductor.aoti_compile_and_package`` compiles that
graph into one ``.pt2`` file: a shared library and the weights, which
``torch._inductor.aoti_load_package`` in Python, or
``torch::inductor::AOTIModelPackageLoader`` in C++, loads and runs.

    package = din_fast.export.export_din(model, "din.pt2")
    scores = din_fast.export.load(package)(history_items, history_categories, lengths,
                                            target_items, target_categories)

``din-fast export`` does the same for a checkpoint (:func:`export_checkpoint`)
and writes the id maps beside the package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from .checkpoint import restored_model
from .errors import InputError
from .training import checkpoint_for_run

# The largest batch and history length an exported DIN takes (dynamic shapes
# need bounds; these are far above what a serving batch holds).
MAX_BATCH = 1 << 20
MAX_HISTORY = 1 << 16


def export_package(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str,
                   dynamic_shapes=None) -> str:
    """Export ``model`` (in eval mode) on ``example_inputs`` and compile it into
    the AOTInductor package ``path``; returns the path written.

    ``dynamic_shapes`` as torch.export.export takes it (for example the batch
    and history axes); without it the package takes the example's shapes only.
    """
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, tuple(example_inputs),
                                      dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def din_example_inputs(model: torch.nn.Module, batch: int = 4, history: int = 8,
                       device: Optional[torch.device] = None) -> tuple:
    """Example inputs of din_fast.DIN or BaseModel's forward: (history_items,
    history_categories [B, T], lengths [B], target_items, target_categories [B])
    with ids inside the model's tables and every row length from 0 to T."""
    device = device or next(model.parameters()).device
    num_items = model.item_embedding.num_embeddings - 1
    num_categories = model.category_embedding.num_embeddings - 1
    gen = torch.Generator().manual_seed(0)

    def ids(high, *shape):
        return torch.randint(1, max(high, 1) + 1, shape, generator=gen).to(device)
    lengths = torch.arange(batch) % (history + 1)
    return (ids(num_items, batch, history), ids(num_categories, batch, history),
            lengths.to(device), ids(num_items, batch), ids(num_categories, batch))


def din_dynamic_shapes() -> tuple:
    """dynamic_shapes for din_example_inputs: any batch and history length."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    history = torch.export.Dim("history", min=1, max=MAX_HISTORY)
    return ({0: batch, 1: history}, {0: batch, 1: history}, {0: batch}, {0: batch},
            {0: batch})


def export_din(model: torch.nn.Module, path: str) -> str:
    """Package din_fast.DIN or BaseModel for serving, any batch and history
    length, on the device its parameters are on; returns the path written."""
    return export_package(model, din_example_inputs(model), path, din_dynamic_shapes())


def export_checkpoint(checkpoint_path: str, path: str, *, device: str = "cpu",
                      backend: str = "auto") -> tuple[str, str]:
    """Package a ``din-fast train`` checkpoint's model (:func:`export_din`)
    and write its id maps as JSON beside it (``<path stem>.ids.json``:
    ``item_ids`` and ``category_ids``, the raw ids in dense order, dense id =
    position + 1 with 0 the padding, and ``item_category``, the dense
    category of each dense item). Returns (package, id maps) paths."""
    if not str(path).endswith(".pt2"):
        raise InputError(f"--out {path}: the package's name must end in .pt2 (AOTInductor's "
                         "package format)")
    checkpoint, config = checkpoint_for_run(checkpoint_path, backend, device)
    model = restored_model(checkpoint, config)
    try:
        package = export_din(model, path)
    except Exception as error:  # noqa: BLE001 - torch.export / Inductor raise many kinds
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        raise InputError(f"--out {path}: the model could not be exported and compiled "
                         f"({type(error).__name__}: {first_line}); AOTInductor needs a C++ "
                         "compiler on CPU (and the CUDA toolkit on a GPU)") from error
    maps, ids_path = checkpoint.id_maps, ids_path_of(path)
    with open(ids_path, "w") as handle:
        json.dump({"item_ids": maps.item_ids.to_pylist(),
                   "category_ids": maps.category_ids.to_pylist(),
                   "item_category": maps.item_category.tolist()}, handle)
    return package, ids_path


def ids_path_of(path: str) -> str:
    """Where export_checkpoint writes the id maps of the package ``path``."""
    return str(Path(path).with_suffix(".ids.json"))


def load(path: str):
    """The packaged model as a callable: load(path)(*inputs) -> the model's outputs."""
    return torch._inductor.aoti_load_package(str(path))
