"""Validation of din_attention's arguments into one canonical problem.

Every backend receives a :class:`DINProblem`: the query always 3-D, activation
parameters expanded to one vector per hidden unit, and every bad input already
rejected with an error that names the argument, what it got and what it needs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
NORMALIZATIONS = (None, "softmax")
BACKENDS = ("auto", "triton", "torch", "reference")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_DICE_EPS = 1e-8


@dataclass
class DINProblem:
    """One din_attention call, validated and in canonical form.

    query is [B, C, D] (``squeeze_candidates`` remembers a 2-D query); keys
    [B, T, D]; values [B, T, Dv] or None (the keys serve as values); at most one
    of lengths [B] int64 and mask [B, T] bool. ``act_params`` has one entry per
    hidden layer: () for sigmoid/relu, (a,) for prelu, (a, mu, var) for dice,
    each a vector of that layer's width.
    """

    query: torch.Tensor
    keys: torch.Tensor
    values: Optional[torch.Tensor]
    lengths: Optional[torch.Tensor]
    mask: Optional[torch.Tensor]
    weights: list
    biases: list
    activation: str
    act_params: list
    normalization: Optional[str]
    scale: float
    dice_eps: float
    squeeze_candidates: bool

    @property
    def value_tensor(self) -> torch.Tensor:
        return self.keys if self.values is None else self.values

    @property
    def hidden_units(self) -> tuple:
        return tuple(w.shape[0] for w in self.weights[:-1])

    def float_tensors(self) -> list:
        """The tensors that may take gradients, in a fixed order: query, keys,
        values (if given), weights, biases, activation parameters."""
        tensors = [self.query, self.keys] + ([] if self.values is None else [self.values])
        tensors += self.weights + self.biases
        for params in self.act_params:
            tensors += list(params)
        return tensors

    def with_float_tensors(self, tensors) -> "DINProblem":
        """A copy holding ``tensors`` (in float_tensors' order) in their places."""
        rest = iter(tensors)
        take = lambda n: [next(rest) for _ in range(n)]  # noqa: E731
        query, keys = take(2)
        values = None if self.values is None else next(rest)
        weights, biases = take(len(self.weights)), take(len(self.biases))
        act_params = [tuple(take(len(params))) for params in self.act_params]
        return dataclasses.replace(self, query=query, keys=keys, values=values,
                                   weights=weights, biases=biases, act_params=act_params)

    def valid_mask(self) -> torch.Tensor:
        """[B, T] bool, True where a history position takes part."""
        batch, length = self.keys.shape[0], self.keys.shape[1]
        if self.mask is not None:
            return self.mask
        if self.lengths is not None:
            positions = torch.arange(length, device=self.keys.device)
            return positions[None, :] < self.lengths[:, None]
        return torch.ones(batch, length, dtype=torch.bool, device=self.keys.device)

    def compute_dtype(self) -> torch.dtype:
        """float64 stays float64; everything else accumulates in float32."""
        return torch.float64 if self.keys.dtype == torch.float64 else torch.float32

    def shape_output(self, pooled: torch.Tensor, scores: Optional[torch.Tensor]):
        """Cast to the keys' dtype and drop the candidate axis of a 2-D query."""
        pooled = pooled.to(self.keys.dtype)
        if scores is not None:
            scores = scores.to(self.keys.dtype)
        if self.squeeze_candidates:
            pooled = pooled.squeeze(1)
            scores = None if scores is None else scores.squeeze(1)
        return pooled, scores


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}"


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"din_attention: `{name}` must be a torch.Tensor; got {_describe(value)}")
    return value


def _require_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(
            f"din_attention: `{name}` is on {tensor.device} but `keys` is on {device}; "
            "all tensors must be on one device"
        )


def _require_float(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(
            f"din_attention: `{name}` must be a floating-point tensor; got dtype {tensor.dtype}"
        )


def _validate_layers(weights, biases, embed_dim, device):
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError(
            "din_attention: `weights` and `biases` must be lists of tensors "
            f"[W_1, ..., W_L, W_out]; got {type(weights).__name__} and {type(biases).__name__}"
        )
    if len(weights) < 2:
        raise ValueError(
            "din_attention: `weights` must hold at least one hidden layer and the output "
            f"layer [W_1, ..., W_L, W_out]; got {len(weights)} tensor(s)"
        )
    if len(biases) != len(weights):
        raise ValueError(
            f"din_attention: `biases` must have one tensor per weight ({len(weights)}); "
            f"got {len(biases)}"
        )
    fan_in = 4 * embed_dim
    for i, (w, b) in enumerate(zip(weights, biases)):
        last = i == len(weights) - 1
        _require_tensor(f"weights[{i}]", w)
        _require_tensor(f"biases[{i}]", b)
        for name, t in ((f"weights[{i}]", w), (f"biases[{i}]", b)):
            _require_float(name, t)
            _require_device(name, t, device)
        if w.dim() != 2 or w.shape[1] != fan_in or (last and w.shape[0] != 1) or w.shape[0] < 1:
            rows = "1" if last else "H"
            needs = f"[{rows}, {fan_in}]"
            if i == 0:
                needs += " (its columns are the blocks [q | k | q-k | q*k] of 4*D = 4*" \
                         f"{embed_dim})"
            raise ValueError(f"din_attention: `weights[{i}]` must have shape {needs}; "
                             f"got {tuple(w.shape)}")
        if b.shape != (w.shape[0],):
            raise ValueError(f"din_attention: `biases[{i}]` must have shape ({w.shape[0]},); "
                             f"got {tuple(b.shape)}")
        fan_in = w.shape[0]
    return list(weights), list(biases)


def _unit_vector(name: str, tensor, width: int, device) -> torch.Tensor:
    """A per-unit parameter given as [H] or [1], expanded to [H]."""
    _require_tensor(name, tensor)
    _require_float(name, tensor)
    _require_device(name, tensor, device)
    if tensor.shape not in ((width,), (1,)):
        raise ValueError(
            f"din_attention: `{name}` must have shape ({width},) or (1,); got {tuple(tensor.shape)}"
        )
    return tensor.expand(width)


def _validate_act_params(activation, activation_params, hidden_units, device):
    layers = len(hidden_units)
    if activation in ("sigmoid", "relu"):
        if activation_params not in (None, [], ()):
            raise ValueError(
                f"din_attention: `activation_params` must be None for activation={activation!r}; "
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
            f"din_attention: `activation_params` for activation={activation!r} must be a list "
            f"{form} with one entry per hidden layer ({layers}); got {got}"
        )
    params = []
    for i, (entry, width) in enumerate(zip(activation_params, hidden_units)):
        if activation == "prelu":
            params.append((_unit_vector(f"activation_params[{i}]", entry, width, device),))
            continue
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(
                f"din_attention: `activation_params[{i}]` for dice must be a tuple (a, mu, var); "
                f"got {_describe(entry)}"
            )
        params.append(tuple(
            _unit_vector(f"activation_params[{i}][{j}] ({part})", t, width, device)
            for j, (part, t) in enumerate(zip(("a", "mu", "var"), entry))
        ))
    return params


def validate(query, keys, lengths, *, weights, biases, activation, activation_params, mask,
             normalization, scale, values, dice_eps) -> DINProblem:
    """Check every argument of din_attention and return the canonical problem."""
    _require_tensor("keys", keys)
    _require_tensor("query", query)
    if keys.dim() != 3:
        raise ValueError(f"din_attention: `keys` must be a 3-D tensor [B, T, D]; "
                         f"got shape {tuple(keys.shape)}")
    if keys.dtype not in INPUT_DTYPES:
        raise TypeError(f"din_attention: `keys` must be float16, bfloat16, float32 or float64; "
                        f"got {keys.dtype}")
    batch, length, embed_dim = keys.shape
    device = keys.device
    if query.dim() not in (2, 3):
        raise ValueError(f"din_attention: `query` must be [B, D] or [B, C, D]; "
                         f"got shape {tuple(query.shape)}")
    _require_device("query", query, device)
    if query.dtype != keys.dtype:
        raise TypeError(f"din_attention: `query` has dtype {query.dtype} but `keys` has "
                        f"{keys.dtype}; they must match")
    squeeze = query.dim() == 2
    query3 = query.unsqueeze(1) if squeeze else query
    if query3.shape[0] != batch or query3.shape[2] != embed_dim:
        raise ValueError(
            f"din_attention: `query` must have batch {batch} and embedding size {embed_dim} "
            f"to match `keys` {tuple(keys.shape)}; got shape {tuple(query.shape)}"
        )
    if values is not None:
        _require_tensor("values", values)
        _require_device("values", values, device)
        if values.dim() != 3 or values.shape[:2] != keys.shape[:2]:
            raise ValueError(f"din_attention: `values` must be [B, T, Dv] = [{batch}, {length}, Dv]"
                             f" to match `keys`; got shape {tuple(values.shape)}")
        if values.dtype != keys.dtype:
            raise TypeError(f"din_attention: `values` has dtype {values.dtype} but `keys` has "
                            f"{keys.dtype}; they must match")
    if lengths is not None and mask is not None:
        raise ValueError("din_attention: give `lengths` or `mask`, not both")
    if lengths is not None:
        _require_tensor("lengths", lengths)
        _require_device("lengths", lengths, device)
        if lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"din_attention: `lengths` must be int32 or int64; got {lengths.dtype}")
        if lengths.shape != (batch,):
            raise ValueError(f"din_attention: `lengths` must have shape ({batch},); "
                             f"got {tuple(lengths.shape)}")
        lengths = lengths.long()
        if device.type == "cpu" and not torch.compiler.is_compiling():
            if batch and (int(lengths.min()) < 0 or int(lengths.max()) > length):
                raise ValueError(
                    f"din_attention: `lengths` must lie in [0, T={length}]; got values in "
                    f"[{int(lengths.min())}, {int(lengths.max())}]"
                )
        else:
            # No host sync on an accelerator (or in a compiled graph): the check
            # runs on the device and fails the stream; the kernels also clamp,
            # so nothing reads outside.
            torch._assert_async(((lengths >= 0) & (lengths <= length)).all(),
                                "din_attention: `lengths` must lie in [0, T]")
    if mask is not None:
        _require_tensor("mask", mask)
        _require_device("mask", mask, device)
        if mask.dtype != torch.bool:
            raise TypeError(f"din_attention: `mask` must be a bool tensor (True = valid); "
                            f"got {mask.dtype}")
        if mask.shape != (batch, length):
            raise ValueError(f"din_attention: `mask` must have shape ({batch}, {length}); "
                             f"got {tuple(mask.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"din_attention: `activation` must be one of {ACTIVATIONS}; "
                         f"got {activation!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"din_attention: `normalization` must be None or 'softmax'; "
                         f"got {normalization!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"din_attention: `scale` must be a finite real number; "
                        f"got {_describe(scale)}")
    if isinstance(dice_eps, bool) or not isinstance(dice_eps, numbers.Real) or not dice_eps > 0:
        raise ValueError(f"din_attention: `dice_eps` must be a positive number; "
                         f"got {_describe(dice_eps)}")
    weights, biases = _validate_layers(weights, biases, embed_dim, device)
    hidden_units = tuple(w.shape[0] for w in weights[:-1])
    act_params = _validate_act_params(activation, activation_params, hidden_units, device)
    return DINProblem(
        query=query3, keys=keys, values=values, lengths=lengths, mask=mask,
        weights=weights, biases=biases, activation=activation, act_params=act_params,
        normalization=normalization, scale=float(scale), dice_eps=float(dice_eps),
        squeeze_candidates=squeeze,
    )


def split_first_layer(w1: torch.Tensor) -> Sequence[torch.Tensor]:
    """The four [H_1, D] column blocks of W_1: (W_q, W_k, W_d, W_p)."""
    return w1.chunk(4, dim=1)
