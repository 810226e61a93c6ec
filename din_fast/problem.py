"""Validation of din_attention's arguments into one canonical problem.

Every backend receives a :class:`DINProblem`: the query always 3-D, activation
parameters expanded to one vector per hidden unit, and every bad input already
rejected with an error that names the argument, what it got and what it needs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.autograd import forward_ad
from torch.fx.experimental.symbolic_shapes import guard_scalar

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
NORMALIZATIONS = (None, "softmax")
BACKENDS = ("auto", "triton", "torch", "reference")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_DICE_EPS = 1e-8


@dataclass
class UnitAndOptions:
    """What every problem form holds besides its inputs: the activation unit's
    layers and the call's options. ``act_params`` has one entry per hidden
    layer: () for sigmoid/relu, (a,) for prelu, (a, mu, var) for dice, each a
    vector of that layer's width; ``squeeze_candidates`` remembers a 2-D query.

    A subclass holds ``query``, ``values`` and its history tensor, named by
    HISTORY (the keys in its own layout).
    """

    HISTORY: ClassVar[str]

    weights: list
    biases: list
    activation: str
    act_params: list
    normalization: Optional[str]
    scale: float
    dice_eps: float
    squeeze_candidates: bool

    @property
    def hidden_units(self) -> tuple:
        return tuple(w.shape[0] for w in self.weights[:-1])

    def float_tensors(self) -> list:
        """The tensors that may take gradients, in a fixed order: query, keys,
        values (if given), weights, biases, activation parameters."""
        tensors = [self.query, getattr(self, self.HISTORY)]
        tensors += [] if self.values is None else [self.values]
        tensors += self.weights + self.biases
        for params in self.act_params:
            tensors += list(params)
        return tensors

    def differentiated_forward(self) -> bool:
        """True when an input is wrapped by a torch.func transform (grad, vmap,
        jvp, jacfwd, ...) or carries a forward-mode tangent: what needs more
        than a reverse-mode backward of the result."""
        if torch.compiler.is_compiling():
            # Dynamo traces torch.func itself, and cannot trace the check of
            # each tensor below: whether a transform is active at all (an
            # isinstance, which dynamo answers right where "is None" is not).
            return isinstance(torch._C._functorch.peek_interpreter_stack(),
                              torch._C._functorch.CInterpreter)
        tensors = [t for t in self.float_tensors() if t is not None]
        if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
            return True
        if forward_ad._current_level < 0:
            return False
        return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)

    def with_float_tensors(self, tensors):
        """A copy holding ``tensors`` (in float_tensors' order) in their places."""
        rest = iter(tensors)

        def take(n):
            return [next(rest) for _ in range(n)]

        query, keys = take(2)
        values = None if self.values is None else next(rest)
        weights, biases = take(len(self.weights)), take(len(self.biases))
        act_params = [tuple(take(len(params))) for params in self.act_params]
        return dataclasses.replace(self, query=query, **{self.HISTORY: keys}, values=values,
                                   weights=weights, biases=biases, act_params=act_params)


@dataclass
class DINProblem(UnitAndOptions):
    """One din_attention call, validated and in canonical form.

    query is [B, C, D]; keys [B, T, D]; values [B, T, Dv] or None (the keys
    serve as values); at most one of lengths [B] int64 and mask [B, T] bool.
    """

    HISTORY: ClassVar[str] = "keys"

    query: torch.Tensor
    keys: torch.Tensor
    values: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]

    @property
    def value_tensor(self) -> torch.Tensor:
        return self.keys if self.values is None else self.values

    def valid_mask(self) -> torch.Tensor:
        """[B, T] bool, True where a history position takes part."""
        batch, length = self.keys.shape[0], self.keys.shape[1]
        if self.mask is not None:
            return self.mask
        if self.lengths is not None:
            positions = torch.arange(length, device=self.keys.device)
            return positions[None, :] < self.lengths[:, None]
        return torch.ones(batch, length, dtype=torch.bool, device=self.keys.device)

    def without_padding(self, history: torch.Tensor) -> torch.Tensor:
        """``history`` [B, T, ...] with zeros at the invalid positions.

        Whatever the padding holds (NaN, Inf, the garbage of torch.empty) must
        not reach a result: 0 * NaN is NaN, in a weighted sum and in a
        gradient alike. A select, so the gradient there is exactly 0.
        """
        if self.lengths is None and self.mask is None:
            return history
        valid = self.valid_mask().reshape(*history.shape[:2], *(1,) * (history.dim() - 2))
        return torch.where(valid, history, torch.zeros((), dtype=history.dtype,
                                                       device=history.device))

    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.keys.dtype)

    def shape_output(self, pooled: torch.Tensor, scores: Optional[torch.Tensor]):
        return shape_output(pooled, scores, self.keys.dtype, self.squeeze_candidates)


def compute_dtype(input_dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def shape_output(pooled: torch.Tensor, scores: Optional[torch.Tensor], dtype: torch.dtype,
                 squeeze_candidates: bool):
    """Cast to the input dtype and drop the candidate axis of a 2-D query.

    The candidate axis is dim 1 of pooled [B, C, Dv] and of the scores, both
    padded [B, C, T] and jagged [L, C].
    """
    pooled = pooled.to(dtype)
    if scores is not None:
        scores = scores.to(dtype)
    if squeeze_candidates:
        pooled = pooled.squeeze(1)
        scores = None if scores is None else scores.squeeze(1)
    return pooled, scores


def check_layer_sizes(owner: str, embed_name: str, embed_dim, units_name: str,
                      hidden_units) -> tuple:
    """A module's embedding size and hidden widths checked; the widths as a tuple."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"{owner}: `{embed_name}` must be a positive int; got {embed_dim!r}")
    try:
        units = () if isinstance(hidden_units, str) else tuple(hidden_units)
    except TypeError:  # not iterable
        units = ()
    if not units or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                            for h in units):
        raise ValueError(f"{owner}: `{units_name}` must be a non-empty sequence of positive "
                         f"ints; got {hidden_units!r}")
    return units


# The first word of every message: the public function validated. Another
# caller (din_attention_jagged, DINAttention) renames it with ``validating``.
OWNER = "din_attention"


@contextlib.contextmanager
def validating(function: str):
    """Messages raised inside name ``function`` (din_attention_jagged,
    DINAttention) as the call the user made. An exception handler rather
    than state: torch.compile traces it (a context variable it cannot)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = str(error)
        if not message.startswith(OWNER + ":"):
            raise
        raise type(error)(function + message[len(OWNER):]) from None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{OWNER}: `{name}` must be a torch.Tensor; got {_describe(value)}")
    return value


def _require_device(name: str, tensor: torch.Tensor, device: torch.device,
                    anchor: str = "keys") -> None:
    if tensor.device != device:
        raise ValueError(
            f"{OWNER}: `{name}` is on {tensor.device} but `{anchor}` is on {device}; "
            "all tensors must be on one device"
        )


def _require_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(
            f"{OWNER}: `{name}` must be a floating-point tensor; got dtype {tensor.dtype}"
        )


def _validate_layers(weights, biases, embed_dim, device, anchor):
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError(
            f"{OWNER}: `weights` and `biases` must be lists of tensors "
            f"[W_1, ..., W_L, W_out]; got {type(weights).__name__} and {type(biases).__name__}"
        )
    if len(weights) < 2:
        raise ValueError(
            f"{OWNER}: `weights` must hold at least one hidden layer and the output "
            f"layer [W_1, ..., W_L, W_out]; got {len(weights)} tensor(s)"
        )
    if len(biases) != len(weights):
        raise ValueError(
            f"{OWNER}: `biases` must have one tensor per entry of `weights` "
            f"({len(weights)}); got {len(biases)}"
        )
    fan_in = 4 * embed_dim
    for i, (w, b) in enumerate(zip(weights, biases)):
        last = i == len(weights) - 1
        _require_tensor(f"weights[{i}]", w)
        _require_tensor(f"biases[{i}]", b)
        for name, t in ((f"weights[{i}]", w), (f"biases[{i}]", b)):
            _require_float(name, t)
            _require_device(name, t, device, anchor)
        if w.dim() != 2 or w.shape[1] != fan_in or (last and w.shape[0] != 1) or w.shape[0] < 1:
            rows = "1" if last else "H"
            needs = f"[{rows}, {fan_in}]"
            if i == 0:
                needs += " (its columns are the blocks [q | k | q-k | q*k] of 4*D = 4*" \
                         f"{embed_dim})"
            raise ValueError(f"{OWNER}: `weights[{i}]` must have shape {needs}; "
                             f"got {tuple(w.shape)}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"{OWNER}: `biases[{i}]` must have shape ({w.shape[0]},) to "
                             f"match `weights[{i}]` {tuple(w.shape)}; got {tuple(b.shape)}")
        fan_in = w.shape[0]
    return list(weights), list(biases)


def _unit_vector(name: str, tensor, width: int, device, anchor) -> torch.Tensor:
    """A per-unit parameter given as [H] or [1], expanded to [H]."""
    _require_tensor(name, tensor)
    _require_float(name, tensor)
    _require_device(name, tensor, device, anchor)
    if tensor.shape not in ((width,), (1,)):
        raise ValueError(
            f"{OWNER}: `{name}` must have shape ({width},) or (1,); got {tuple(tensor.shape)}"
        )
    return tensor.expand(width)


def _validate_act_params(activation, activation_params, hidden_units, device, anchor,
                         dice_eps):
    layers = len(hidden_units)
    if activation in ("sigmoid", "relu"):
        if activation_params not in (None, [], ()):
            raise ValueError(
                f"{OWNER}: `activation_params` must be None for activation={activation!r}; "
                f"got {type(activation_params).__name__}"
            )
        return [() for _ in hidden_units]
    if activation_params is None or not isinstance(activation_params, (list, tuple)) \
            or len(activation_params) != layers:
        form = "[a_1, ..., a_L]" if activation == "prelu" else "[(a_1, mu_1, var_1), ...]"
        got = "None" if activation_params is None else (
            f"{len(activation_params)} entries" if isinstance(activation_params, (list, tuple))
            else type(activation_params).__name__)
        raise ValueError(
            f"{OWNER}: `activation_params` for activation={activation!r} must be a list "
            f"{form} with one entry per hidden layer ({layers}); got {got}"
        )
    params = []
    for i, (entry, width) in enumerate(zip(activation_params, hidden_units)):
        if activation == "prelu":
            params.append((_unit_vector(f"activation_params[{i}]", entry, width, device,
                                        anchor),))
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(
                f"{OWNER}: `activation_params[{i}]` for dice must be a tuple (a, mu, var); "
                f"got {_describe(entry)}"
            )
        params.append(tuple(
            _unit_vector(f"activation_params[{i}][{j}] ({part})", t, width, device, anchor)
            for j, (part, t) in enumerate(zip(("a", "mu", "var"), entry))
        ))
        # Dice divides by sqrt(var + eps): a variance at or below -eps (a
        # corrupted running_var) would make every score NaN.
        var = plain_values(params[-1][2])
        check_all(var + dice_eps > 0,
                  f"{OWNER}: `activation_params[{i}][2] (var)` must be greater than "
                  f"-dice_eps = {-dice_eps:g} (Dice divides by sqrt(var + dice_eps))",
                  lambda: f"; got {float(var.min()):g}")
    return params


def plain_values(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s values outside any torch.func transform (all of a vmap's
    batch), for a check that reads them; the tensor itself while tracing."""
    tensor = tensor.detach()
    if torch.compiler.is_compiling():
        return tensor
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def check_all(ok: torch.Tensor, message: str, details=None) -> None:
    """Raise ValueError(message) unless every element of ``ok`` holds.

    Eager on CPU (``details()`` adds what was found). On an accelerator, and
    while tracing (torch.compile, torch.export, which cannot record a
    data-dependent Python branch), the check runs as ``torch._assert_async``
    instead, with no host sync; the kernels also clamp, so nothing reads
    outside the tensors. Fake tensors (a FakeTensorMode run for the shapes,
    as memory estimators make it) and meta tensors have no values to check.
    """
    if torch.compiler.is_compiling() or ok.device.type != "cpu":
        if ok.device.type != "meta":
            torch._assert_async(ok.all(), message)
    elif not is_fake(ok) and not bool(ok.all()):
        raise ValueError(message + ("" if details is None else details()))


def check_range(name: str, values: torch.Tensor, low: int, high: int, needs: str,
                bound: str = "") -> None:
    """Check low <= values <= high (see check_all for when and how).

    A size that is a symbol while tracing (T, L, max_len) appears in
    ``needs`` by its name only, never its value (a compiled graph would hold
    "T=s35", and specialize on it); ``bound`` names the size ``high`` is,
    whose value the eager message adds."""
    values = plain_values(values)   # under vmap: every sample's, as one check
    check_all((values >= low) & (values <= high), f"{OWNER}: `{name}` must lie in {needs}",
              lambda: f"; got values in [{int(values.min())}, {int(values.max())}]"
                      + (f" with {bound} = {high}" if bound else ""))


def _validate_query(query, batch: int, embed_dim: int, keys: torch.Tensor, keys_name: str):
    """The query as [B, C, D] and whether it was 2-D; `keys` gives dtype and device."""
    _require_tensor("query", query)
    if query.dim() not in (2, 3):
        raise ValueError(f"{OWNER}: `query` must be [B, D] or [B, C, D]; "
                         f"got shape {tuple(query.shape)}")
    _require_device("query", query, keys.device, keys_name)
    if query.dtype != keys.dtype:
        raise TypeError(f"{OWNER}: `query` has dtype {query.dtype} but `{keys_name}` has "
                        f"{keys.dtype}; they must match")
    squeeze = query.dim() == 2
    query3 = query.unsqueeze(1) if squeeze else query
    if query3.shape[0] != batch or query3.shape[2] != embed_dim:
        raise ValueError(
            f"{OWNER}: `query` must have batch {batch} and embedding size {embed_dim} "
            f"to match `{keys_name}` {tuple(keys.shape)}; got shape {tuple(query.shape)}"
        )
    return query3, squeeze


def _validate_keys(name: str, keys, rank: int, layout: str) -> None:
    _require_tensor(name, keys)
    if keys.dim() != rank:
        raise ValueError(f"{OWNER}: `{name}` must be a {rank}-D tensor {layout}; "
                         f"got shape {tuple(keys.shape)}")
    if keys.dtype not in INPUT_DTYPES:
        raise TypeError(f"{OWNER}: `{name}` must be float16, bfloat16, float32 or float64; "
                        f"got {keys.dtype}")


def _validate_values(values, keys: torch.Tensor, keys_name: str, layout: str) -> None:
    """values: the keys' leading dims, any last dim, the keys' dtype and device.
    ``layout`` names the dims ("[B, T, Dv]"); the sizes are filled in only in
    the message (formatting a size while tracing would specialize on it)."""
    _require_tensor("values", values)
    _require_device("values", values, keys.device, keys_name)
    if values.dim() != keys.dim() or values.shape[:-1] != keys.shape[:-1]:
        sizes = ", ".join(map(str, keys.shape[:-1]))
        raise ValueError(f"{OWNER}: `values` must be {layout} = [{sizes}, Dv] to match "
                         f"`{keys_name}` {tuple(keys.shape)}; got shape {tuple(values.shape)}")
    if values.dtype != keys.dtype:
        raise TypeError(f"{OWNER}: `values` has dtype {values.dtype} but `{keys_name}` has "
                        f"{keys.dtype}; they must match")


def concrete_number(value):
    """``value``, or its value where torch.compile(dynamic=True) traces a
    number argument as a symbol (which it presents as a Python float or int):
    math.isfinite and an op's float argument take no symbol, so the graph is
    specialized to it (a guard; a model's scale and epsilon do not change
    between calls). Anything else is returned as it is, for validate_options."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return guard_scalar(value)


def validate_options(activation, normalization, scale, dice_eps, return_scores=False) -> None:
    """The activation, normalization, scale, dice_eps and return_scores options checked."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OWNER}: `activation` must be one of {ACTIVATIONS}; "
                         f"got {activation!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{OWNER}: `normalization` must be None or 'softmax'; "
                         f"got {normalization!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{OWNER}: `scale` must be a finite real number; "
                        f"got {_describe(scale)}")
    try:
        finite = math.isfinite(scale)
    except OverflowError:     # an int beyond float64's range (10**400)
        raise ValueError(f"{OWNER}: `scale` must be a finite real number; got an int of "
                         f"{len(str(abs(scale)))} digits, beyond float64's range") from None
    if not finite:
        raise ValueError(f"{OWNER}: `scale` must be a finite real number; got {scale!r}")
    if isinstance(dice_eps, bool) or not isinstance(dice_eps, numbers.Real) or not dice_eps > 0:
        raise ValueError(f"{OWNER}: `dice_eps` must be a positive number; "
                         f"got {_describe(dice_eps)}")
    # A yes/no the ops take as a bool: True, False or what equals one (1, 0,
    # NumPy's bools); a string would reach an op's schema as an internal error.
    if return_scores not in (True, False):
        raise TypeError(f"{OWNER}: `return_scores` must be True or False; "
                        f"got {_describe(return_scores)}")


FLOAT32_MAX = torch.finfo(torch.float32).max


def _validate_scale_range(scale, keys: torch.Tensor, keys_name: str) -> None:
    """Inputs below float64 are scored in float32, where a scale beyond its
    range is infinite: every score and weight would be Inf or NaN."""
    if compute_dtype(keys.dtype) == torch.float32 and not -FLOAT32_MAX <= scale <= FLOAT32_MAX:
        raise ValueError(f"{OWNER}: `scale` must lie in [-{FLOAT32_MAX:.4e}, {FLOAT32_MAX:.4e}] "
                         f"for {keys.dtype} `{keys_name}` (scored in float32, where a larger "
                         f"scale is infinite); got {float(scale):.4e}. float64 inputs take any "
                         "finite scale")


def _validate_parameters(weights, biases, activation, activation_params, dice_eps,
                         keys: torch.Tensor, keys_name: str):
    """(weights, biases, act_params) of the activation unit, checked against
    the keys' embedding size and device, and expanded."""
    embed_dim, device = keys.shape[-1], keys.device
    weights, biases = _validate_layers(weights, biases, embed_dim, device, keys_name)
    hidden_units = tuple(w.shape[0] for w in weights[:-1])
    act_params = _validate_act_params(activation, activation_params, hidden_units, device,
                                      keys_name, dice_eps)
    return weights, biases, act_params


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast gives matmuls on this device, or None when it is off."""
    if not torch.amp.is_autocast_available(device.type):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast_inputs(*tensors):
    """Under torch.autocast, the float inputs in the autocast dtype, as a matmul
    would take them: a query made by an autocast Linear (bfloat16) then meets
    keys from an embedding table (float32) in one dtype. float64 stays, as
    autocast leaves it; the parameters stay as they are (float32)."""
    anchor = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = None if anchor is None else autocast_dtype(anchor.device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor)
                 and t.dtype in (torch.float16, torch.bfloat16, torch.float32) else t
                 for t in tensors)


def validate(query, keys, lengths, *, weights, biases, activation, activation_params, mask,
             normalization, scale, values, dice_eps, return_scores=False) -> DINProblem:
    """Check every argument of din_attention and return the canonical problem."""
    query, keys, values = _autocast_inputs(query, keys, values)
    scale, dice_eps = concrete_number(scale), concrete_number(dice_eps)
    _validate_keys("keys", keys, 3, "[B, T, D]")
    batch, length, embed_dim = keys.shape
    device = keys.device
    query3, squeeze = _validate_query(query, batch, embed_dim, keys, "keys")
    if values is not None:
        _validate_values(values, keys, "keys", "[B, T, Dv]")
    if lengths is not None and mask is not None:
        raise ValueError(f"{OWNER}: give `lengths` or `mask`, not both")
    if lengths is not None:
        _require_tensor("lengths", lengths)
        _require_device("lengths", lengths, device)
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OWNER}: `lengths` must be int32 or int64; got {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"{OWNER}: `lengths` must have shape ({batch},) to match "
                             f"`keys` {tuple(keys.shape)}; got {tuple(lengths.shape)}")
        # Contiguous int64: a strided view (DeepCTR's [B, 1] slice, an expand)
        # reaches the kernels as the plain array they index.
        lengths = lengths.long().contiguous()
        check_range("lengths", lengths, 0, length, "[0, T], T the length of `keys` (dim 1)",
                    "T")
    if mask is not None:
        _require_tensor("mask", mask)
        _require_device("mask", mask, device)
        if mask.dtype != torch.bool:
            raise TypeError(f"{OWNER}: `mask` must be a bool tensor (True = valid); "
                            f"got {mask.dtype}")
        if mask.shape != (batch, length):
            raise ValueError(f"{OWNER}: `mask` must have shape ({batch}, {length}) to "
                             f"match `keys` {tuple(keys.shape)}; got {tuple(mask.shape)}")
        mask = mask.contiguous()
    validate_options(activation, normalization, scale, dice_eps, return_scores)
    _validate_scale_range(scale, keys, "keys")
    weights, biases, act_params = _validate_parameters(weights, biases, activation,
                                                       activation_params, dice_eps, keys,
                                                       "keys")
    return DINProblem(
        query=query3, keys=keys, values=values, lengths=lengths, mask=mask,
        weights=weights, biases=biases, activation=activation, act_params=act_params,
        normalization=normalization, scale=float(scale), dice_eps=float(dice_eps),
        squeeze_candidates=squeeze,
    )


@dataclass
class JaggedDINProblem(UnitAndOptions):
    """One din_attention_jagged call, validated: the history as jagged values.

    query is [B, C, D]; keys_values [L, D] holds the histories of all rows
    back to back, row b's at ``offsets[b]:offsets[b + 1]`` (TorchRec's /
    FBGEMM's jagged layout); values [L, Dv] or None likewise.
    """

    HISTORY: ClassVar[str] = "keys_values"

    query: torch.Tensor
    keys_values: torch.Tensor
    values: Optional[torch.Tensor]
    offsets: torch.Tensor
    max_len: int

    @property
    def value_tensor(self) -> torch.Tensor:
        return self.keys_values if self.values is None else self.values

    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.keys_values.dtype)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def row_ids(self) -> torch.Tensor:
        """[L] int64: the row (segment) of every jagged position."""
        batch = self.offsets.shape[0] - 1
        rows = torch.arange(batch, device=self.offsets.device)
        return rows.repeat_interleave(self.lengths(), output_size=self.keys_values.shape[0])

    def padded_positions(self) -> tuple:
        """(row, column) [L] of every jagged position in the padded [B, T] layout."""
        rows = self.row_ids()
        return rows, torch.arange(rows.shape[0], device=rows.device) - self.offsets[rows]

    def padded(self, jagged: torch.Tensor, length: int) -> torch.Tensor:
        """A jagged [L, ...] tensor as [B, length, ...], zeros past each row's
        end (length at least the longest row); differentiable."""
        shape = (self.offsets.shape[0] - 1, length, *jagged.shape[1:])
        return jagged.new_zeros(shape).index_put(self.padded_positions(), jagged)

    def shape_output(self, pooled: torch.Tensor, scores: Optional[torch.Tensor]):
        return shape_output(pooled, scores, self.keys_values.dtype, self.squeeze_candidates)


def validate_jagged(query, keys_values, offsets, max_len, **arguments) -> JaggedDINProblem:
    """Check every argument of din_attention_jagged and return the canonical problem."""
    with validating("din_attention_jagged"):
        return _validate_jagged(query, keys_values, offsets, max_len, **arguments)


def _validate_jagged(query, keys_values, offsets, max_len, *, weights, biases, activation,
                     activation_params, normalization, scale, values, dice_eps,
                     return_scores=False) -> JaggedDINProblem:
    query, keys_values, values = _autocast_inputs(query, keys_values, values)
    scale, dice_eps = concrete_number(scale), concrete_number(dice_eps)
    _validate_keys("keys_values", keys_values, 2, "[L, D]")
    total, embed_dim = keys_values.shape
    device = keys_values.device
    _require_tensor("offsets", offsets)
    _require_device("offsets", offsets, device, "keys_values")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OWNER}: `offsets` must be int32 or int64; got {offsets.dtype}")
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"{OWNER}: `offsets` must be a 1-D tensor [B + 1]; "
                         f"got shape {tuple(offsets.shape)}")
    # Contiguous int64, as lengths (the kernels index it as a plain array).
    offsets = offsets.long().contiguous()
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral):
        raise TypeError(f"{OWNER}: `max_len` must be a non-negative int; "
                        f"got {_describe(max_len)}")
    if max_len < 0:
        raise ValueError(f"{OWNER}: `max_len` must be a non-negative int; got {max_len}")
    # A Python int from here on (a NumPy integer is not one the ops take);
    # while torch.compile traces calls whose max_len varies, it stays a symbol
    # (dynamo's int() adds no guard), which no message below formats.
    max_len = int(max_len)
    batch = offsets.shape[0] - 1
    query3, squeeze = _validate_query(query, batch, embed_dim, keys_values, "keys_values")
    if values is not None:
        _validate_values(values, keys_values, "keys_values", "[L, Dv]")
    check_range("offsets[0]", offsets[:1], 0, 0, "{0}")
    check_range("offsets[-1]", offsets[-1:], total, total, "{L}, L the rows of `keys_values`",
                "L")
    check_range("offsets[b + 1] - offsets[b]", offsets[1:] - offsets[:-1], 0, max_len,
                "[0, max_len] (offsets non-decreasing, no segment over max_len)", "max_len")
    validate_options(activation, normalization, scale, dice_eps, return_scores)
    _validate_scale_range(scale, keys_values, "keys_values")
    weights, biases, act_params = _validate_parameters(weights, biases, activation,
                                                       activation_params, dice_eps,
                                                       keys_values, "keys_values")
    return JaggedDINProblem(
        query=query3, keys_values=keys_values, values=values, offsets=offsets,
        max_len=max_len, weights=weights, biases=biases, activation=activation,
        act_params=act_params, normalization=normalization, scale=float(scale),
        dice_eps=float(dice_eps), squeeze_candidates=squeeze,
    )


def split_first_layer(w1: torch.Tensor) -> Sequence[torch.Tensor]:
    """The four [H_1, D] column blocks of W_1: (W_q, W_k, W_d, W_p)."""
    return w1.chunk(4, dim=1)
