"""Deploying without Python: a model that uses DINAttention as an AOTInductor package.

``torch.export`` traces the model into a graph of aten operations (the
attention unit's torch backend runs its folded arithmetic on every position
with the padding zeroed, which traces; on CUDA the fused Triton kernels are
traced in themselves), and ``torch._inductor.aoti_compile_and_package`` compiles that
graph into one ``.pt2`` file: a shared library and the weights, which
``torch._inductor.aoti_load_package`` in Python, or
``torch::inductor::AOTIModelPackageLoader`` in C++, loads and runs.

    package = din_fast.ctr.export.export_din(model, "din.pt2")
    logits = din_fast.ctr.export.load(package)(history_items, history_categories, lengths,
                                               target_items, target_categories)   # [B, C]

``din-fast export`` does the same for a checkpoint (:func:`export_checkpoint`)
and writes the id maps beside the package, ``<stem>.ids.json``, which the
.pt2 and the ONNX export of one stem share: :func:`writing_id_maps` refuses to
replace the id maps of the other format's model with another checkpoint's.
Each export records the fingerprint of its id maps in the model's metadata
(:data:`IDS_FINGERPRINT_KEY`), which din_fast.ctr.serving.Encoder.from_json
checks against the JSON's when given the loaded model.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from .checkpoint import restored_model
from .data import IdMaps
from .errors import InputError, OutputError
from .files import check_outputs, replacing
from .package_inputs import InputContract
from .training import checkpoint_for_run

# The largest batch, history length and number of candidates per row an
# exported DIN takes (dynamic shapes need bounds; these are far above what a
# serving batch holds).
MAX_BATCH = 1 << 20
MAX_HISTORY = 1 << 16
MAX_CANDIDATES = 1 << 16
# The exported formats, each writing its id maps to the same <stem>.ids.json.
EXPORT_SUFFIXES = (".pt2", ".onnx")
# The model's metadata entry holding the fingerprint of the id maps it was
# exported with (the ``fingerprint`` of its <stem>.ids.json).
IDS_FINGERPRINT_KEY = "din_fast.ids_fingerprint"


def export_package(model: torch.nn.Module, example_inputs: Sequence[torch.Tensor], path: str,
                   dynamic_shapes=None, value_ranges=None, padding_dims=(),
                   metadata: Optional[dict] = None) -> str:
    """Export ``model`` (in eval mode) on ``example_inputs`` and compile it into
    the AOTInductor package ``path``.

    The package records what it takes (din_fast.ctr.package_inputs), which
    :func:`load` checks at every call: each input's dtype and shape and,
    with ``value_ranges``, its values. The package is written atomically
    (din_fast.ctr.files.replacing: whole or not at all).

    Args:
        model: any module torch.export can trace (models using DINAttention
            can); put back in its own mode afterwards.
        example_inputs: the forward's positional arguments: tensors on the
            device the package will run on, a dict of such tensors (each key
            its own input, ``<argument>_<key>``) or None (no input).
        path: the package to write, ending in ``.pt2``.
        dynamic_shapes: as torch.export.export takes it (for example the
            batch and history axes, ``{0: Dim("B"), 1: Dim("T")}`` per
            input); without it the package takes the example's shapes only.
        value_ranges: {input name: (low, high)}, high an int or a
            ``torch.export.Dim`` (or its name): the values an input may hold.
        padding_dims: Dim names of the dims a call may give as 0,
            zero-padded to their minimum.
        metadata: more {key: string} entries recorded in the package's
            metadata (``din-fast export``: :func:`ids_metadata`).

    Returns:
        ``path``, as a string.

    Raises:
        din_fast.ctr.errors.OutputError: the package cannot be written.
        Exception: what torch.export and Inductor raise, for a model that
            does not trace or a missing C++ compiler (CPU) or CUDA toolkit (GPU).
    """
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(model, tuple(example_inputs),
                                      dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)
    contract = InputContract.of_program(program, dynamic_shapes, value_ranges, padding_dims)
    recorded = {**(metadata or {}), **({} if contract is None else contract.to_metadata())}
    configs = {"aot_inductor.metadata": recorded} if recorded else {}
    # The temporary file keeps the .pt2 suffix, which AOTInductor requires.
    with replacing(path, "--out") as temporary:
        torch._inductor.aoti_compile_and_package(program, package_path=temporary,
                                                 inductor_configs=configs)
    return str(path)


def din_example_inputs(model: torch.nn.Module, batch: int = 4, history: int = 8,
                       candidates: int = 3, device: Optional[torch.device] = None) -> tuple:
    """Example inputs of din_fast.DIN or BaseModel's forward with C
    candidates per row, in the layout both exports take (:func:`input_layout`).

    Ids lie inside the model's tables (never 0, the padding, so that no size
    is traced as a constant) and the row lengths run over 0..T.

    Args:
        model: a din_fast.DIN or BaseModel (its tables give the id ranges,
            its side features the extra inputs).
        batch: B, the rows.
        history: T, the history length.
        candidates: C, the candidates per row.
        device: where the inputs are made; None for the model's parameters'
            device.

    Returns:
        (history_items, history_categories [B, T], lengths [B], target_items,
        target_categories [B, C]), int64, the categories None for a model
        without a category table; then, for a model with side features,
        ``features`` ({feature: [B, C, 2] int64 ids}) and ``numeric``
        ([B, C, N] float32; None without numeric features).
    """
    device = device or next(model.parameters()).device
    num_items = model.item_embedding.num_embeddings - 1
    gen = torch.Generator().manual_seed(0)
    rows = (batch, candidates)

    def ids(high, *shape):
        return torch.randint(1, max(high, 1) + 1, shape, generator=gen).to(device)
    lengths = torch.arange(batch) % (history + 1)
    items, targets = ids(num_items, batch, history), ids(num_items, *rows)
    if model.category_embedding is None:
        categories = target_categories = None
    else:
        num_categories = model.category_embedding.num_embeddings - 1
        categories, target_categories = (ids(num_categories, batch, history),
                                          ids(num_categories, *rows))
    inputs = (items, categories, lengths.to(device), targets, target_categories)
    if not model.feature_names and not model.numeric_features:
        return inputs
    # Two values a candidate: a width of 1 would be traced as a constant.
    features = {name: ids(table.num_embeddings - 1, *rows, 2)
                for name, table in zip(model.feature_names, model.feature_embeddings)}
    numeric = torch.randn(*rows, model.numeric_features, generator=gen).to(device) \
        if model.numeric_features else None
    return inputs + (features, numeric)


def din_dynamic_shapes(model: Optional[torch.nn.Module] = None) -> tuple:
    """``dynamic_shapes`` for :func:`din_example_inputs` (as torch.export.export
    takes it), shared by the .pt2 and the ONNX export: any batch B (up to
    MAX_BATCH), history length T (up to MAX_HISTORY), number of candidates
    per row C (up to MAX_CANDIDATES) and number of values ``V_<feature>``
    of each side feature (up to MAX_HISTORY).

    Args:
        model: the din_fast.DIN or BaseModel exported, for its category
            table and side features; None for a model with categories and
            no side features.

    Returns:
        One entry per input of :func:`din_example_inputs`, in its order:
        {axis: torch.export.Dim}, None for an input that is None, and for
        ``features`` a dict {feature: {axis: Dim}}.

    Raises:
        ValueError: side features that would share an input
            (:func:`feature_inputs`).
    """
    batch = torch.export.Dim("B", min=1, max=MAX_BATCH)
    history = torch.export.Dim("T", min=1, max=MAX_HISTORY)
    rows = {0: batch, 1: torch.export.Dim("C", min=1, max=MAX_CANDIDATES)}
    categories = model is None or model.category_embedding is not None
    shapes = ({0: batch, 1: history}, {0: batch, 1: history} if categories else None,
              {0: batch}, dict(rows), dict(rows) if categories else None)
    if model is None or not model.feature_names and not model.numeric_features:
        return shapes
    features = {name: {**rows, len(rows): torch.export.Dim(value_dim(name), min=1,
                                                           max=MAX_HISTORY)}
                for name in feature_inputs(model)}
    return shapes + (features, dict(rows) if model.numeric_features else None)


def feature_inputs(model: torch.nn.Module) -> dict:
    """The exported input of each side feature of din_fast.DIN or BaseModel,
    in the model's order.

    Args:
        model: the model exported.

    Returns:
        {side feature: its input's name, :func:`exported_name` of it}.

    Raises:
        ValueError: two side features that would be one input (their names
            alike but for case and the characters exported_name replaces:
            torch.export would call the second ``<name>_1``, and its size
            ``V_<name>`` would be tied to the first's).
    """
    inputs = {}
    for name in model.feature_names:
        exported = exported_name("features", name)
        other = next((f for f, e in inputs.items() if e == exported), None)
        if other is not None:
            raise ValueError(f"side features {other!r} and {name!r} would both be the exported "
                             f"input {exported} (lower case, every character but letters and "
                             "digits '_'); train with column names that differ there to export "
                             "the model")
        inputs[name] = exported
    return inputs


def value_dim(feature: str) -> str:
    """The name of a side feature's dim of values in both exports' records:
    ``V_`` and the feature's name as torch.export writes it (``genres`` ->
    ``V_genres``, see :func:`exported_name`).

    Args:
        feature: the side feature's name (one of the model's ``feature_names``).
    """
    return "V_" + exported_name("", feature)


def exported_name(argument: str, key: str) -> str:
    """torch.export's name for ``key`` of the dict input ``argument``
    (``features``, ``genres`` -> ``features_genres``): lower case, every
    character but letters and digits made ``_``.

    Args:
        argument: the forward's argument that takes a dict (``features``);
            "" for the key alone.
        key: the dict's key, a side feature's name.
    """
    return "_".join(part for part in (argument, re.sub(r"[^a-z0-9]", "_", key.lower()))
                    if part)


def din_padding_dims(model: torch.nn.Module) -> tuple:
    """The dims a call may give as 0 (padded with zeros to 1, which changes
    nothing): the history's T, and each side feature's values ``V_<feature>``.

    Args:
        model: the din_fast.DIN or BaseModel exported.
    """
    return ("T",) + tuple(value_dim(name) for name in model.feature_names)


def din_value_ranges(model: torch.nn.Module) -> dict:
    """What each input of :func:`din_example_inputs` may hold, as
    :func:`export_package`'s ``value_ranges`` takes it: ids inside their
    tables (0 the padding), lengths in [0, T].

    Args:
        model: the din_fast.DIN or BaseModel exported (its tables give the
            highest id of each input).

    Returns:
        {input name: (0, highest id)}, and ``lengths``: (0, "T").
    """
    items = model.item_embedding.num_embeddings - 1
    ranges = {"history_items": (0, items), "lengths": (0, "T"), "target_items": (0, items)}
    if model.category_embedding is not None:
        categories = model.category_embedding.num_embeddings - 1
        ranges.update(history_categories=(0, categories), target_categories=(0, categories))
    for name, table in zip(model.feature_names, model.feature_embeddings):
        ranges[exported_name("features", name)] = (0, table.num_embeddings - 1)
    return ranges


def export_din(model: torch.nn.Module, path: str, metadata: Optional[dict] = None) -> str:
    """Package din_fast.DIN or BaseModel for serving, any batch (up to
    MAX_BATCH), history length (up to MAX_HISTORY) and number of candidates
    per row (up to MAX_CANDIDATES), on the device its parameters are on.

    The package takes the inputs :func:`input_layout` lists, as the eager
    model and the ONNX export do: ``history_items``, ``history_categories``
    [B, T], ``lengths`` [B], ``target_items``, ``target_categories`` [B, C]
    (int64 dense ids, 0 the padding), and returns the logits [B, C]: each
    history is scored once for all of its row's candidates (one candidate
    per row is C = 1). A history of length T = 0 is padded to one position
    (id 0, length 0). A model without a category table takes no category
    inputs; a model with side features takes, after them, one
    ``features_<name>`` [B, C, V] int64 input per side feature (0 pads a
    candidate's values; V = 0 is padded as T is) and ``numeric`` [B, C, N]
    float32.

    Args:
        model: a din_fast.DIN or BaseModel; exported in eval mode, then put
            back in its own mode.
        path: the package to write, ending in ``.pt2``.
        metadata: more {key: string} entries recorded in the package
            (:func:`export_package`).

    Returns:
        ``path``, as a string.

    Raises:
        din_fast.ctr.errors.OutputError: the package cannot be written.
        ValueError: side features that would share an input
            (:func:`feature_inputs`).
        Exception: what torch.export and Inductor raise (see
            :func:`export_package`).
    """
    return export_package(model, din_example_inputs(model), path, din_dynamic_shapes(model),
                          din_value_ranges(model), padding_dims=din_padding_dims(model),
                          metadata=metadata)


def export_checkpoint(checkpoint_path: str, path: str, *, device: str = "cpu",
                      backend: str = "auto") -> tuple[str, str]:
    """Package a ``din-fast train`` checkpoint's model (:func:`export_din`)
    and write its id maps as JSON beside it, ``<path stem>.ids.json``
    (:func:`writing_id_maps`): both whole, or neither. The package records
    the id maps' fingerprint (:func:`ids_metadata`).

    Args:
        checkpoint_path: a ``din-fast train --checkpoint`` file.
        path: the package to write, ending in ``.pt2``.
        device: "cpu" or "cuda", where the package runs.
        backend: the attention backend traced ("auto": triton on CUDA).

    Returns:
        (package, id maps) paths.

    Raises:
        din_fast.ctr.errors.InputError: a path not ending in .pt2, a bad
            checkpoint, a device or backend this machine lacks, or an export
            or compile that failed (one line, naming the option).
        din_fast.ctr.errors.OutputError: an output that is an input (the
            checkpoint), a directory, or cannot be written; id maps of
            another checkpoint's ONNX model of the same stem
            (:func:`check_shared_id_maps`).
    """
    if not str(path).endswith(".pt2"):
        raise InputError(f"--out {path}: the package's name must end in .pt2 (AOTInductor's "
                         "package format)")
    check_outputs({"--out": path, "--out's id maps": ids_path_of(path)},
                  {"--checkpoint": checkpoint_path})
    checkpoint, config = checkpoint_for_run(checkpoint_path, backend, device)
    model = restored_model(checkpoint, config)
    with writing_id_maps(checkpoint.id_maps, path, checkpoint_layout(model, checkpoint_path),
                         config.max_len) as ids_path:
        try:
            export_din(model, path, ids_metadata(checkpoint.id_maps))
        except InputError:
            raise
        except Exception as error:  # noqa: BLE001 - torch.export / Inductor raise many kinds
            first_line = (str(error).strip().splitlines() or [""])[0][:200]
            raise InputError(f"--out {path}: the model could not be exported and compiled "
                             f"({type(error).__name__}: {first_line}); AOTInductor needs a C++ "
                             "compiler on CPU (and the CUDA toolkit on a GPU)") from error
    return str(path), ids_path


@contextmanager
def writing_id_maps(maps: IdMaps, path, inputs: list,
                    max_len: Optional[int] = None) -> Iterator[str]:
    """The id maps, as JSON beside the exported model ``path``
    (:func:`ids_path_of`), for the block that writes the model: written
    first, renamed into place when the block ends without an error, so that
    a failure to write either file leaves both as they were.

    The JSON holds ``item_ids`` and ``category_ids``, the raw ids in dense
    order (dense id = position + 1, 0 the padding; ``category_ids`` null
    without categories), ``item_category``, the dense category of each dense
    item (index 0, the padding item, holds 0), ``unknown``: whether ids not
    listed take the reserved id ``len(ids) + 1`` of their table (a labeled
    log's model) or have none, ``features`` (each side feature's values in
    dense order, as the items), ``numeric`` (each numeric feature's ``mean``
    and ``std``: the model takes ``(value - mean) / std``), ``rare_items``
    and ``rare_item_category`` (the items that share the reserved id, seen
    too seldom in training, and the dense category each keeps, as ``din-fast
    predict`` gives it; both null where the maps list none, the categories
    without categories), ``fingerprint`` (the checkpoint's id maps'),
    ``inputs``, the model's inputs in call order (:func:`input_layout`), and
    ``max_len``, the most recent history items the model was trained on
    (``--max-len``; null: all), which din-fast predict keeps of a history
    and din_fast.ctr.serving.Encoder keeps by default. The Encoder reads it.

    The .pt2 and the ONNX model of one stem share the JSON: before anything
    is written, :func:`check_shared_id_maps` refuses to replace the id maps
    of the other format's model there with different ones.

    Args:
        maps: the checkpoint's id maps (din_fast.ctr.data.IdMaps).
        path: the exported model's path (``.pt2`` or ``.onnx``).
        inputs: the model's inputs, :func:`input_layout`'s list.
        max_len: the checkpoint's ``max_len`` (its config's); None: all.

    Yields:
        The id maps' path.

    Raises:
        din_fast.ctr.errors.OutputError: the JSON cannot be written, or
            would replace the id maps of the other format's model with
            different ones.
    """
    check_shared_id_maps(maps, path)
    ids_path = ids_path_of(path)
    with replacing(ids_path, "--out's id maps") as temporary:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump({"item_ids": maps.item_ids.to_pylist(),
                       "category_ids": None if maps.category_ids is None
                       else maps.category_ids.to_pylist(),
                       "item_category": None if maps.item_category is None
                       else maps.item_category.tolist(),
                       "unknown": maps.unknown,
                       "features": {name: values.to_pylist()
                                    for name, values in maps.features.items()},
                       "numeric": {name: {"mean": mean, "std": std}
                                   for name, (mean, std) in maps.numeric.items()},
                       "rare_items": None if maps.rare_items is None
                       else maps.rare_items.to_pylist(),
                       "rare_item_category": None if maps.rare_item_category is None
                       else maps.rare_item_category.tolist(),
                       "fingerprint": maps.fingerprint(), "inputs": inputs,
                       "max_len": max_len}, handle)
        yield ids_path


def input_layout(model: torch.nn.Module) -> list:
    """The inputs of the exported ``model`` in call order, as both exports
    (the .pt2 package and the ONNX model) take them and ``<name>.ids.json``
    lists them (its ``inputs``).

    Args:
        model: the din_fast.DIN or BaseModel exported.

    Returns:
        One dict per input: ``name``, ``dtype`` ("int64" or "float32"),
        ``shape`` (named dims: B rows, T history, C candidates per row,
        ``V_<feature>`` a side feature's values; ints for static sizes) and
        ``values``, what the values are.

    Raises:
        ValueError: side features that would share an input
            (:func:`feature_inputs`).
    """
    rows = ["B", "C"]
    layout = [("history_items", "int64", ["B", "T"], "dense item ids, oldest first, 0 after "
               "lengths[b]"),
              ("history_categories", "int64", ["B", "T"], "the dense category of each"),
              ("lengths", "int64", ["B"], "each history's length, in [0, T]"),
              ("target_items", "int64", rows, "the candidates' dense item ids"),
              ("target_categories", "int64", rows, "their dense categories")]
    if model.category_embedding is None:
        layout = [entry for entry in layout if "categor" not in entry[0]]
    for name, exported in feature_inputs(model).items():
        layout.append((exported, "int64", rows + [value_dim(name)],
                       f"dense ids of feature {name!r} (features[{name!r}] in dense order), "
                       "0 after a candidate's values"))
    if model.numeric_features:
        layout.append(("numeric", "float32", rows + [model.numeric_features],
                       "the numeric features in the order of `numeric`, standardized"))
    return [dict(name=name, dtype=dtype, shape=shape, values=values)
            for name, dtype, shape, values in layout]


def checkpoint_layout(model: torch.nn.Module, checkpoint_path) -> list:
    """:func:`input_layout` of a checkpoint's model, before either export
    traces it.

    Args:
        model: the checkpoint's din_fast.DIN or BaseModel.
        checkpoint_path: the checkpoint, named in the error.

    Raises:
        din_fast.ctr.errors.InputError: side features the export cannot
            tell apart (:func:`feature_inputs`), naming --checkpoint.
    """
    try:
        return input_layout(model)
    except ValueError as error:
        raise InputError(f"--checkpoint {checkpoint_path}: {error}") from None


def ids_path_of(path: str) -> str:
    """Where the id maps of the exported model ``path`` go: ``din.pt2`` or
    ``din.onnx`` -> ``din.ids.json`` (one file for both formats).

    Args:
        path: the exported model's path.
    """
    return str(Path(path).with_suffix(".ids.json"))


def ids_metadata(maps: IdMaps) -> dict:
    """The metadata entry an export records of its id maps:
    {:data:`IDS_FINGERPRINT_KEY`: their fingerprint}, the ``fingerprint`` of
    the ``<stem>.ids.json`` written with it.

    Args:
        maps: the checkpoint's id maps.
    """
    return {IDS_FINGERPRINT_KEY: maps.fingerprint()}


def check_shared_id_maps(maps: IdMaps, path) -> None:
    """OutputError when writing ``maps`` as the id maps of the exported model
    ``path`` would leave the other format's model of the same stem with
    another checkpoint's id maps.

    ``din.pt2`` and ``din.onnx`` share ``din.ids.json``: exporting one
    checkpoint as ``din.pt2`` and another as ``din.onnx`` would replace the
    first one's id maps, and requests for ``din.pt2`` would then be encoded
    with the second's ids: scores silently wrong. So where the other format's
    model exists and the JSON there holds different id maps (another
    fingerprint, or none that can be read), the export is refused. The same
    id maps (one checkpoint exported to both formats) are written again, and
    without the other format's model the JSON is replaced (re-exporting
    ``din.pt2`` replaces its id maps with the new model's).

    Args:
        maps: the id maps to write.
        path: the exported model's path (``.pt2`` or ``.onnx``).

    Raises:
        din_fast.ctr.errors.OutputError: the JSON belongs to the other
            format's model and holds different id maps; naming --out, that
            model and the remedy.
    """
    path, ids_path = Path(path), Path(ids_path_of(path))
    others = [path.with_suffix(suffix) for suffix in EXPORT_SUFFIXES if suffix != path.suffix]
    other = next((p for p in others if p.exists()), None)
    if other is None or not ids_path.exists():
        return
    recorded = _recorded_fingerprint(ids_path)
    given = maps.fingerprint()
    if recorded == given:
        return
    holds = "id maps without a readable fingerprint" if recorded is None \
        else f"other id maps (fingerprint {recorded[:12]}, this checkpoint's {given[:12]})"
    renamed = path.with_name(f"{path.stem}-2{path.suffix}")
    raise OutputError(f"--out {path}: {ids_path}, the id maps {other} is served with, holds "
                      f"{holds}; writing this checkpoint's there would pair {other} with the "
                      f"wrong ids (silently wrong scores); give --out another name ({renamed} "
                      f"writes {ids_path_of(renamed)}), or remove {other} first if this "
                      "export replaces it")


def _recorded_fingerprint(ids_path: Path) -> Optional[str]:
    """The ``fingerprint`` of an id maps JSON (a SHA-256 in hex); None for a
    file without one that can be read (never quoted: it is the file's)."""
    try:
        with open(ids_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return None
    fingerprint = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    return fingerprint if isinstance(fingerprint, str) \
        and re.fullmatch("[0-9a-f]{64}", fingerprint) else None


class LoadedPackage:
    """A loaded package, called as the exported model: inputs by position or
    by name, checked and converted first (din_fast.ctr.package_inputs: int32
    ids and lengths become int64, every input contiguous; a history of width
    T = 0 is padded to one position). A package din_fast did not write runs
    its inputs unchecked. ``compiled`` is torch's loaded package itself;
    ``contract`` the record of its inputs (None for such a package);
    ``ids_fingerprint`` the fingerprint of the id maps it was exported with
    (``din-fast export``'s; None for a package without one), which
    din_fast.ctr.serving.Encoder.from_json checks its JSON against.

    Args:
        path: the ``.pt2`` package (``export_package`` or ``din-fast export``
            wrote it).

    Raises:
        RuntimeError: torch's, for a file that is not an AOTInductor package.
        TypeError: at a call: a missing, repeated or unknown input, or one
            that is not a tensor of the recorded dtype (or a narrower one of its
            kind, converted exactly), named by its input.
        ValueError: at a call: a wrong device, rank or size, sizes that
            disagree between inputs (one B, T, C across them) or a value
            outside its range, named by its input.
    """

    def __init__(self, path: str):
        self.name = Path(path).name
        self.compiled = torch._inductor.aoti_load_package(str(path))
        metadata = getattr(self.compiled, "get_metadata", dict)()
        self.contract = InputContract.from_metadata(metadata)
        self.ids_fingerprint = metadata.get(IDS_FINGERPRINT_KEY)

    def __call__(self, *args, **kwargs):
        if self.contract is None:
            return self.compiled(*args, **kwargs)
        return self.compiled(*self.contract.prepare(self.name, args, kwargs))


def load(path: str) -> LoadedPackage:
    """The packaged model as a callable: ``load(path)(*inputs)`` -> the model's
    outputs, its inputs checked first (:class:`LoadedPackage`). For a
    :func:`export_din` package: the inputs of :func:`input_layout`, the
    logits [B, C] float32 back.

    Args:
        path: the ``.pt2`` package.

    Raises:
        RuntimeError: torch's, for a file that is not an AOTInductor package
            (the calls raise as :class:`LoadedPackage`'s).
    """
    return LoadedPackage(path)
