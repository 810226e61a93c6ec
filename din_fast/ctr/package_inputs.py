"""What an exported package takes: recorded in it at export, checked at every call.

An AOTInductor package reads its inputs as raw memory in the dtype, layout and
device it was traced with, and checks none of them: an int32 tensor where
int64 was traced is read as int64 (other values, and past the tensor's end),
a transposed tensor as its contiguous twin, a batch that differs between
inputs as whatever lies past the shorter one, an id beyond a table as an
"index out of bounds" in a generated kernel. :class:`InputContract` is what
``din_fast.ctr.export`` records in the package's metadata (each input's name,
dtype and shape, the range of each dynamic size, the values an input may
hold) and what ``din_fast.ctr.export.load`` enforces before the graph runs:

- an input of a narrower dtype of the same kind (int32 ids or lengths for
  int64, float16 for float32) is converted, which is exact; any other dtype
  is a TypeError;
- every input is made contiguous (exact);
- a wrong device, rank or size, sizes that disagree between inputs, a value
  outside its range: ValueError naming the input, what it got and what it
  needs, in the names the user passes (``lengths[3] = 57 is outside [0, T]
  with T = 50, history_items.shape[1]``), never the graph's symbols.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

METADATA_KEY = "din_fast.inputs"


@dataclass
class InputSpec:
    """One input of a package, as recorded.

    Args:
        name: the input's name (the forward's argument, or
            ``<argument>_<key>`` for a key of a dict argument:
            ``features_genres``).
        dtype: the dtype the package reads (torch.int64 ids, torch.float32
            numeric features).
        shape: one entry per axis: an int for a static size, a dim name
            ("B", "T", "C", "V_genres") for a dynamic one.
        values: (low, high), high an int or a dim name (``lengths``: (0,
            "T")), the values the input may hold; None for any value.
    """

    name: str
    dtype: torch.dtype
    shape: tuple
    values: Optional[tuple] = None


@dataclass
class InputContract:
    """The inputs of a package, in call order, and the range of each dynamic
    size: what ``din_fast.ctr.export.load`` and
    ``din_fast.ctr.serving.OnnxModel`` check every call against.

    Args:
        inputs: the InputSpec of each input, in call order.
        dims: {dim name: (low, high)}, the sizes a dynamic dim may take (None
            for no bound).
        device_type: the device the package runs on ("cpu", "cuda").
        padding_dims: the dims a call may give as 0: the inputs are then
            padded with zeros up to the dim's minimum, which for them changes
            no result (an empty DIN history: id 0 and length 0 are padding).
    """

    inputs: list
    dims: dict
    device_type: str
    padding_dims: tuple = ()
    where: dict = field(init=False)

    def __post_init__(self):
        # Each dim is called by its first appearance: "history_items.shape[1]".
        self.where = {}
        for spec in self.inputs:
            for axis, size in enumerate(spec.shape):
                if isinstance(size, str):
                    self.where.setdefault(size, f"{spec.name}.shape[{axis}]")

    @classmethod
    def of_program(cls, program, dynamic_shapes=None, value_ranges=None,
                   padding_dims: Sequence[str] = ()) -> Optional["InputContract"]:
        """The contract of an exported program whose inputs are tensors, called
        positionally in their flattened order: a dict of tensors counts as its
        tensors, named as torch.export names them (``features_genres``), and a
        None input is no input.

        Args:
            program: the ``torch.export.ExportedProgram``.
            dynamic_shapes: what the program was exported with (its Dims name
                the dynamic sizes; a size without one keeps torch's symbol).
            value_ranges: {input name: (low, high)}, high an int or a
                ``torch.export.Dim`` (or its name); inputs not listed take any
                value.
            padding_dims: the dim names a call may give as 0 (padded).

        Returns:
            The contract, or None for a program taking anything but tensors (it
            records nothing).
        """
        given = list(program.graph_signature.user_inputs)
        specs = _flat_shapes(dynamic_shapes, len(given))
        kept = [i for i, name in enumerate(given) if name is not None]
        names = [given[i] for i in kept]
        placeholders = {node.name: node.meta.get("val") for node in program.graph.nodes
                        if node.op == "placeholder"}
        values = [placeholders.get(name) for name in names]
        if not values or not all(isinstance(v, torch.Tensor) for v in values):
            return None
        symbols = _dim_names(names, values,
                             dynamic_shapes if specs is None else [specs[i] for i in kept])
        dims = {}
        for symbol, bounds in program.range_constraints.items():
            if str(symbol) in symbols:
                dims[symbols[str(symbol)]] = (_bound(bounds.lower), _bound(bounds.upper))
        inputs = []
        for name, value in zip(names, values):
            shape = tuple(int(size) if isinstance(size, int) else symbols.get(str(size))
                          for size in value.shape)
            low_high = (value_ranges or {}).get(name)
            if low_high is not None:
                low, high = low_high
                low_high = (int(low), high if isinstance(high, int)
                            else getattr(high, "__name__", high))
            inputs.append(InputSpec(name, value.dtype, shape, low_high))
        device_type = values[0].device.type
        return cls(inputs, dims, device_type, tuple(padding_dims))

    def to_metadata(self) -> dict:
        """The contract as package metadata: {``din_fast.inputs``: its JSON},
        string values, as AOTInductor's ``aot_inductor.metadata`` and ONNX's
        ``metadata_props`` take them.
        """
        return {METADATA_KEY: json.dumps({
            "inputs": [{"name": s.name, "dtype": str(s.dtype).removeprefix("torch."),
                        "shape": list(s.shape), "values": s.values} for s in self.inputs],
            "dims": self.dims, "device_type": self.device_type,
            "padding_dims": list(self.padding_dims)})}

    @classmethod
    def from_metadata(cls, metadata: dict) -> Optional["InputContract"]:
        """The contract a package recorded, or None (a package din_fast did not write).

        Args:
            metadata: the package's metadata, {key: string} (AOTInductor's
                ``get_metadata()``, ONNX Runtime's ``custom_metadata_map``).
        """
        if METADATA_KEY not in metadata:
            return None
        data = json.loads(metadata[METADATA_KEY])
        inputs = [InputSpec(s["name"], getattr(torch, s["dtype"]), tuple(s["shape"]),
                            None if s["values"] is None else tuple(s["values"]))
                  for s in data["inputs"]]
        dims = {name: tuple(bounds) for name, bounds in data["dims"].items()}
        return cls(inputs, dims, data["device_type"], tuple(data["padding_dims"]))

    def prepare(self, owner: str, args: tuple, kwargs: dict) -> list:
        """The call's inputs as the package reads them: in call order, in the
        recorded dtypes (a narrower dtype of the same kind converted, which is
        exact), contiguous, a padding dim of size 0 padded to its minimum.

        Args:
            owner: what the messages start with (the package's file name).
            args: the call's positional inputs, tensors.
            kwargs: the call's inputs by name.

        Returns:
            The tensors to pass to the package, one per recorded input.

        Raises:
            TypeError: a missing, repeated or unknown input, a non-tensor, or a
                dtype that does not convert exactly, named by its input.
            ValueError: another device, a wrong rank or static size, sizes of one
                dim that disagree between inputs, a size or a value outside its
                range, named by the input (and the dim by where it was first given:
                ``T = 8, history_items.shape[1]``).
        """
        tensors = self._bind(owner, args, kwargs)
        device = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
        tensors = [self._converted(owner, spec, tensor, device)
                   for spec, tensor in zip(self.inputs, tensors)]
        sizes = self._sizes(owner, tensors)
        self._check_values(owner, tensors, sizes)
        return self._padded(tensors, sizes)

    def _bind(self, owner, args, kwargs) -> list:
        names = [spec.name for spec in self.inputs]
        signature = f"({', '.join(names)})"
        if len(args) > len(names):
            raise TypeError(f"{owner}: takes {len(names)} inputs {signature}; "
                            f"got {len(args)} positional")
        bound = dict(zip(names, args))
        for name, value in kwargs.items():
            if name not in names or name in bound:
                problem = "twice" if name in bound else "an unknown input"
                raise TypeError(f"{owner}: `{name}` given {problem}; the inputs are {signature}")
            bound[name] = value
        missing = [name for name in names if name not in bound]
        if missing:
            raise TypeError(f"{owner}: missing {', '.join(f'`{m}`' for m in missing)}; "
                            f"the inputs are {signature}")
        return [bound[name] for name in names]

    def _converted(self, owner, spec: InputSpec, tensor, device) -> torch.Tensor:
        """The input in the package's dtype, contiguous, if that is exact."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{owner}: `{spec.name}` must be a torch.Tensor of {spec.dtype}; "
                            f"got {type(tensor).__name__}")
        if tensor.device.type != self.device_type or tensor.device != device:
            raise ValueError(f"{owner}: `{spec.name}` is on {tensor.device}; the package runs "
                             f"on {self.device_type} and takes every input on one device "
                             f"(the first is on {device})")
        if tensor.dtype != spec.dtype:
            if not _converts_exactly(tensor.dtype, spec.dtype):
                raise TypeError(f"{owner}: `{spec.name}` must be {spec.dtype} (or a narrower "
                                f"{_kind(spec.dtype)} dtype, converted exactly); "
                                f"got {tensor.dtype}")
            tensor = tensor.to(spec.dtype)
        return tensor.contiguous()

    def _describe(self, dim: str, value: int) -> str:
        return f"{dim} = {value}, {self.where[dim]}"

    def _sizes(self, owner, tensors) -> dict:
        """Each dynamic size's value in this call, checked: ranks, static
        sizes, one value per dim across the inputs, within its range."""
        sizes = {}
        for spec, tensor in zip(self.inputs, tensors):
            layout = "[" + ", ".join(map(str, spec.shape)) + "]"
            if tensor.dim() != len(spec.shape):
                raise ValueError(f"{owner}: `{spec.name}` must be {len(spec.shape)}-D "
                                 f"{layout}; got shape {tuple(tensor.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, tensor.shape)):
                if isinstance(want, int) and got != want or isinstance(want, str) \
                        and sizes.setdefault(want, got) != got:
                    known = "" if isinstance(want, int) else \
                        f" with {self._describe(want, sizes[want])}"
                    raise ValueError(f"{owner}: `{spec.name}` must have shape {layout}{known}; "
                                     f"got {tuple(tensor.shape)}")
        for dim, value in sizes.items():
            low, high = self.dims.get(dim, (None, None))
            if dim in self.padding_dims and value == 0:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                raise ValueError(f"{owner}: {self._describe(dim, value)}, is outside "
                                 f"[{low}, {high}], the sizes of {dim} the package takes")
        return sizes

    def _check_values(self, owner, tensors, sizes) -> None:
        """Every value inside its input's range; one host sync for all."""
        checked = []
        for spec, tensor in zip(self.inputs, tensors):
            if spec.values is None:
                continue
            low, high = spec.values
            bound = sizes[high] if isinstance(high, str) else high
            checked.append((spec, tensor, (tensor < low) | (tensor > bound)))
        if not checked or not bool(torch.stack([bad.any() for *_, bad in checked]).any()):
            return
        spec, tensor, bad = next(item for item in checked if item[2].any())
        index = tuple(bad.nonzero()[0].tolist())
        low, high = spec.values
        bound = f" with {self._describe(high, sizes[high])}" if isinstance(high, str) else ""
        raise ValueError(f"{owner}: {spec.name}[{', '.join(map(str, index))}] = "
                         f"{tensor[index].item()} is outside [{low}, {high}]{bound}")

    def _padded(self, tensors, sizes) -> list:
        """Inputs with a padding dim of size 0 padded with zeros to its minimum."""
        for dim in self.padding_dims:
            if sizes.get(dim) != 0:
                continue
            minimum = self.dims[dim][0]
            tensors = [torch.nn.functional.pad(tensor, _pad_widths(spec.shape, dim, minimum))
                       if dim in spec.shape else tensor
                       for spec, tensor in zip(self.inputs, tensors)]
        return tensors


def _pad_widths(shape, dim: str, minimum: int) -> list:
    """torch.nn.functional.pad's widths (last axis first) growing ``dim`` to ``minimum``."""
    widths = []
    for size in reversed(shape):
        widths += [0, minimum if size == dim else 0]
    return widths


def _kind(dtype: torch.dtype) -> str:
    return "floating-point" if dtype.is_floating_point else "integer"


def _converts_exactly(got: torch.dtype, need: torch.dtype) -> bool:
    """Whether every value of ``got`` is a value of ``need`` of the same kind."""
    if torch.bool in (got, need) or got.is_complex or need.is_complex \
            or got.is_floating_point != need.is_floating_point:
        return False
    return torch.promote_types(got, need) == need


def _bound(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, OverflowError, ValueError):  # sympy's infinity
        return None


def _flat_shapes(dynamic_shapes, count: int) -> Optional[list]:
    """A tuple of dynamic_shapes as one spec per flattened input: a dict input's
    spec (a dict keyed by its keys, strings) gives one per key, in order; None
    where dynamic_shapes is not a tuple or list of ``count`` flattened specs."""
    if not isinstance(dynamic_shapes, (list, tuple)):
        return None
    flat = []
    for spec in dynamic_shapes:
        if isinstance(spec, dict) and spec and all(isinstance(k, str) for k in spec):
            flat.extend(spec.values())
        else:
            flat.append(spec)
    return flat if len(flat) == count else None


def _dim_names(names, values, dynamic_shapes) -> dict:
    """{symbol: name} for every dynamic size of the inputs: the name of its
    torch.export.Dim where ``dynamic_shapes`` gives one, else the symbol."""
    found = {}
    for index, (name, value) in enumerate(zip(names, values)):
        spec = None
        if isinstance(dynamic_shapes, dict):
            spec = dynamic_shapes.get(name)
        elif isinstance(dynamic_shapes, (list, tuple)) and index < len(dynamic_shapes):
            spec = dynamic_shapes[index]
        axes = spec.items() if isinstance(spec, dict) else \
            enumerate(spec) if isinstance(spec, (list, tuple)) else ()
        for axis, dim in axes:
            if isinstance(dim, torch.export.Dim) and axis < value.dim():
                found.setdefault(str(value.shape[axis]), dim.__name__)
    for value in values:
        for size in value.shape:
            if not isinstance(size, int):
                found.setdefault(str(size), str(size))
    return found
