"""FuxiCTR's DIN_Attention, on din_fast.

Replace ``from fuxictr.pytorch.layers import DIN_Attention`` with
``from din_fast.compat.fuxictr import DIN_Attention``: same constructor, same
forward, same output, same state_dict names (the ``attention_layer.mlp``
Sequential indices included, so a FuxiCTR checkpoint loads with
``strict=True``), same initialization order.

FuxiCTR's semantics, kept where they differ from SPEC section 1:
- ``mask`` may be bool or numeric with 0 = padding; a numeric mask must hold
  only 0 and 1 (checked; FuxiCTR would weight the scores by other values).
- ``use_softmax`` adds -1e9 to the padded scores before a softmax over all T
  positions: a row with no valid position gets 1/T everywhere, so its output
  is the mean of its (padding) history. Other rows are SPEC's softmax and
  run fused; the mean is added to the empty rows.
- Its Dice is a BatchNorm1d without affine parameters (eps 1e-9, momentum
  0.01) over every position, padding included, and a slope ``alpha`` [H]. In
  eval mode it is SPEC's Dice with dice_eps=1e-9 and runs fused; in training
  mode the adapter scores every position on the torch backend with the
  peer's BatchNorm, as the peer does.
- Its PReLU has one slope per unit (torch.nn.PReLU(H, init=0.1)).
- ``output_activation`` (applied to the score before the mask) has no SPEC
  counterpart: with one, the scores of every position come from the torch
  backend and the activation, mask and softmax follow as in the peer.

Not supported (ValueError): ``batch_norm=True``; ``dropout_rate > 0`` in
training mode (in eval mode dropout is the identity, so such a checkpoint
serves); hidden activations other than relu, sigmoid, prelu, dice, or
different ones per layer.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..functional import din_attention
from ..problem import check_all, check_layer_sizes, validate
from .peer_semantics import all_position_scores, batchnorm_gate, peer_argument_names

ACTIVATIONS = ("relu", "sigmoid", "prelu", "dice")
DICE_EPS = 1e-9          # the peer's Dice BatchNorm eps
DICE_MOMENTUM = 0.01     # and momentum
PRELU_INIT = 0.1         # the peer's PReLU slope
SOFTMAX_PADDING = -1e9   # the peer's additive mask before its softmax
LAYER = "DIN_Attention"
ARGUMENT_NAMES = {"query": "target_item", "keys": "history_sequence"}


class _Dice(nn.Module):
    """The parameters of the peer's Dice: ``bn`` (no affine) and ``alpha`` [H]."""

    def __init__(self, units: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(units, affine=False, eps=DICE_EPS, momentum=DICE_MOMENTUM)
        self.alpha = nn.Parameter(torch.zeros(units))


def _activation_name(hidden_activations, layers: int) -> str:
    names = hidden_activations if isinstance(hidden_activations, list) \
        else [hidden_activations] * layers
    lowered = {name.lower() if isinstance(name, str) else None for name in names}
    if len(names) != layers or len(lowered) != 1 or not lowered <= set(ACTIVATIONS):
        raise ValueError(f"{LAYER}: `hidden_activations` must be one of {ACTIVATIONS} (any case) "
                         f"or a list of {layers} equal ones; got {hidden_activations!r}")
    return lowered.pop()


def _hidden_activation(activation: str, units: int) -> nn.Module:
    if activation == "dice":
        return _Dice(units)
    if activation == "prelu":
        return nn.PReLU(units, init=PRELU_INIT)
    return nn.Sigmoid() if activation == "sigmoid" else nn.ReLU()


def _output_activation(name) -> nn.Module:
    """The peer's get_activation for a score activation given by name."""
    special = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
               "softmax": lambda: nn.Softmax(dim=-1)}
    if isinstance(name, str) and name.lower() in special:
        return special[name.lower()]()
    if isinstance(name, str) and isinstance(getattr(nn, name, None), type) \
            and issubclass(getattr(nn, name), nn.Module) and name.lower() not in ("prelu", "dice"):
        return getattr(nn, name)()
    raise ValueError(f"{LAYER}: `output_activation` must be None or the name of a torch.nn "
                     f"activation; got {name!r}")


class _MLPBlock(nn.Module):
    """The peer's MLP_Block parameters: ``mlp``, a Sequential laid out as the
    peer lays it out (Linear, activation, [Dropout] per hidden layer, the
    score Linear, [output activation]), which fixes the state_dict indices."""

    def __init__(self, input_dim: int, hidden_units, activation: str, dropout_rates,
                 output_activation):
        super().__init__()
        widths = [input_dim] + list(hidden_units)
        layers = []
        for fan_in, units, rate in zip(widths[:-1], widths[1:], dropout_rates):
            layers.append(nn.Linear(fan_in, units))
            layers.append(_hidden_activation(activation, units))
            if rate > 0:
                layers.append(nn.Dropout(p=rate))
        layers.append(nn.Linear(widths[-1], 1))
        if output_activation is not None:
            layers.append(_output_activation(output_activation))
        self.mlp = nn.Sequential(*layers)


class DIN_Attention(nn.Module):  # noqa: N801 - the peer's class name
    """DIN target attention with FuxiCTR's interface (see the module doc).

    forward(target_item [B, E], history_sequence [B, T, E], mask [B, T] = None)
    returns [B, E]. ``backend`` is din_fast's (SPEC section 2).
    """

    def __init__(self, embedding_dim=64, attention_units=[32], hidden_activations="ReLU",
                 output_activation=None, dropout_rate=0, batch_norm=False, use_softmax=False,
                 backend="auto"):
        super().__init__()
        units = list(check_layer_sizes(LAYER, "embedding_dim", embedding_dim, "attention_units",
                                       attention_units))
        if batch_norm:
            raise ValueError(f"{LAYER}: `batch_norm` must be False (din_fast has no BatchNorm "
                             f"between the attention unit's layers); got {batch_norm!r}")
        rates = dropout_rate if isinstance(dropout_rate, list) else [dropout_rate] * len(units)
        if len(rates) != len(units) or not all(isinstance(r, numbers.Real) and 0 <= r < 1
                                               for r in rates):
            raise ValueError(f"{LAYER}: `dropout_rate` must be a rate in [0, 1) or a list of "
                             f"{len(units)}; got {dropout_rate!r}")
        self.embedding_dim = embedding_dim
        self.use_softmax = use_softmax
        self.activation = _activation_name(hidden_activations, len(units))
        self.has_dropout = any(r > 0 for r in rates)
        self.has_output_activation = output_activation is not None
        self.backend = backend
        self.attention_layer = _MLPBlock(4 * embedding_dim, units, self.activation, rates,
                                         output_activation)

    def _linears(self):
        return [m for m in self.attention_layer.mlp if isinstance(m, nn.Linear)]

    def _activation_modules(self):
        return [m for m in self.attention_layer.mlp if isinstance(m, (nn.PReLU, _Dice))]

    def _activation_params(self):
        if self.activation == "prelu":
            return [m.weight for m in self._activation_modules()]
        if self.activation == "dice":
            return [(m.alpha, m.bn.running_mean, m.bn.running_var)
                    for m in self._activation_modules()]
        return None

    def forward(self, target_item, history_sequence, mask=None):
        if self.training and self.has_dropout:
            raise ValueError(f"{LAYER}: `dropout_rate` > 0 is supported in eval mode only "
                             "(din_fast has no dropout inside the attention unit)")
        if isinstance(target_item, torch.Tensor) and target_item.dim() != 2:
            raise ValueError(f"{LAYER}: `target_item` must have shape [B, E]; "
                             f"got {tuple(target_item.shape)}")
        valid = self._valid_mask(mask)
        linears = self._linears()
        kwargs = dict(weights=[m.weight for m in linears], biases=[m.bias for m in linears],
                      activation=self.activation, activation_params=self._activation_params(),
                      mask=valid, scale=1.0, values=None, dice_eps=DICE_EPS)
        normalization = "softmax" if self.use_softmax else None
        with peer_argument_names(LAYER, ARGUMENT_NAMES):
            if self.has_output_activation or (self.activation == "dice" and self.training):
                problem = validate(target_item, history_sequence, None,
                                   normalization=normalization, **kwargs)
                return self._forward_over_padding(problem)
            pooled = din_attention(target_item, history_sequence, normalization=normalization,
                                   backend=self.backend, **kwargs)
        if self.use_softmax and valid is not None and history_sequence.shape[1] > 0:
            # The peer's softmax gives a row with no valid position 1/T everywhere.
            empty = (~valid.any(dim=1)).to(pooled.dtype)[:, None]
            pooled = pooled + empty * history_sequence.mean(dim=1).to(pooled.dtype)
        return pooled

    def _valid_mask(self, mask):
        """The peer's mask (0 = padding, any dtype) as SPEC's bool mask."""
        if not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool:
            return mask  # None, or checked by din_attention
        if mask.is_complex():
            raise TypeError(f"{LAYER}: `mask` must be bool or real (0 = padding); "
                            f"got {mask.dtype}")
        check_all((mask == 0) | (mask == 1),
                  f"{LAYER}: `mask` must hold only 0 (padding) and 1 (valid)")
        return mask != 0

    def _forward_over_padding(self, problem):
        """The peer's own order: every position scored (Dice batch statistics
        over the padding too), then the output activation, the mask, the softmax."""
        gate = None
        if self.activation == "dice":
            gate = batchnorm_gate([m.bn for m in self._activation_modules()])
        scores = all_position_scores(problem, gate)                          # [B, T]
        if self.has_output_activation:
            scores = self.attention_layer.mlp[-1](scores.reshape(-1, 1)).view_as(scores)
        if problem.mask is not None:
            valid = problem.mask.to(scores.dtype)
            scores = scores * valid
            if self.use_softmax:
                scores = scores + SOFTMAX_PADDING * (1 - valid)
        if self.use_softmax:
            scores = scores.softmax(dim=-1)
        return (scores.unsqueeze(-1) * problem.keys).sum(dim=1)
