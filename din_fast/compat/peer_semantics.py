"""What the peer adapters share: their argument names in errors, which of a
peer's hidden activations din_attention can run, and the peer's own
computation for the configurations it cannot (the general path)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..problem import DINProblem, split_first_layer, validate

# Hidden activation modules din_attention runs itself, by exact type (a
# subclass may change forward). nn.PReLU is din_attention's prelu whether it has one
# slope or one per unit; each adapter adds its own Dice class.
FUSED_ACTIVATIONS = {nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.PReLU: "prelu"}


@contextlib.contextmanager
def peer_argument_names(layer: str, names: dict):
    """Re-raise din_fast's ValueError/TypeError in the peer's words.

    din_fast's messages name arguments in backticks (`keys`); inside an
    adapter they read with the peer's names (`history_sequence`) and the
    adapter's class in front.
    """
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error).replace("din_attention:", f"{layer}:", 1)
        for ours, theirs in names.items():
            message = message.replace(f"`{ours}`", f"`{theirs}`")
        raise type(error)(message) from error


def fused_activation(module, dice_type) -> str | None:
    """din_attention's name for a peer hidden activation module, or None where
    din_attention has no such activation."""
    if type(module) is dice_type:
        return "dice"
    return FUSED_ACTIVATIONS.get(type(module))


def uses_batch_statistics(norm: nn.BatchNorm1d) -> bool:
    """Whether a BatchNorm normalizes with the statistics of its input (and
    so cannot fold into din_attention): its own mode decides, not the
    adapter's, as a model may put its BatchNorms in training mode under an
    eval-mode layer or the reverse (frozen statistics)."""
    return norm.training or norm.running_mean is None


def module_of_class(cls, layer: str, argument: str):
    """An instance of ``cls`` built as the peers build an activation class:
    called without arguments. None when ``cls`` is not an nn.Module class."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        return None
    try:
        return cls()
    except TypeError as error:
        raise ValueError(f"{layer}: `{argument}` {cls.__name__} must be constructible without "
                         f"arguments (the peer builds it so); {error}") from error


def validate_inputs(query, keys, lengths, mask) -> DINProblem:
    """din_attention's checks of the inputs alone (shapes, dtypes, devices,
    lengths in range), for the general path, which runs the peer's own layers.

    The unit is a stand-in of one hidden unit: the general path runs
    whatever layers the peer has (none hidden, BatchNorm, any activation),
    which din_attention's checks of a unit would refuse.
    """
    width = 4 * keys.shape[-1] if isinstance(keys, torch.Tensor) and keys.dim() > 0 else 4
    dtype = keys.dtype if isinstance(keys, torch.Tensor) and keys.is_floating_point() \
        else torch.float32
    device = keys.device if isinstance(keys, torch.Tensor) else None
    stand_in = torch.zeros(1, width, dtype=dtype, device=device)
    return validate(query, keys, lengths, mask=mask, weights=[stand_in, stand_in[:, :1]],
                    biases=[stand_in[0, :1], stand_in[0, :1]], activation="relu",
                    activation_params=None, normalization=None, scale=1.0, values=None,
                    dice_eps=1.0)


def first_layer_everywhere(linear: nn.Linear, query: torch.Tensor,
                           keys: torch.Tensor) -> torch.Tensor:
    """The peer's first Linear on [q, k, q-k, q*k] at every history position,
    padding included: [B, T, H] from query [B, D] and keys [B, T, D].

    Folded as the torch backend folds it (no [B, T, 4D] concat): the peer's
    concat times W is (W_q + W_d) q + (W_k - W_d) k + W_p (q*k), equal up to
    rounding. The layers after it are the peer's own modules, run by the
    adapter in the peer's layout.
    """
    w_q, w_k, w_d, w_p = split_first_layer(linear.weight)
    per_row = query @ (w_q + w_d).t()
    if linear.bias is not None:
        per_row = per_row + linear.bias
    return per_row[:, None, :] + keys @ (w_k - w_d).t() + (query[:, None, :] * keys) @ w_p.t()
