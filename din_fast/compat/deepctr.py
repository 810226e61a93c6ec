"""DeepCTR-Torch's AttentionSequencePoolingLayer, on din_fast.

Replace ``from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer``
with ``from din_fast.compat.deepctr import AttentionSequencePoolingLayer``: same
constructor, same forward, same output, same state_dict names (a DeepCTR-Torch
checkpoint loads with ``strict=True``), same initialization for the same seed.

DeepCTR-Torch's semantics, kept where they differ from SPEC section 1:
- ``weight_normalization=True`` fills the padding with -(2**32) + 1 before a
  softmax over all T positions: a row of length 0 gets the weight 1/T at every
  position, so its output is the mean of its (padding) keys. Rows with a valid
  position are SPEC's softmax exactly (exp of the fill underflows to 0) and
  run fused; the mean is added to the empty rows.
- Its Dice is a BatchNorm1d (eps 1e-8, momentum 0.1, with an affine weight
  and bias) over every position, padding included, and a slope ``alpha``. In
  training mode, and in eval mode when a BatchNorm weight is not positive,
  the adapter scores every position on the torch backend with the peer's
  BatchNorm, as the peer does. In eval mode with positive BatchNorm weights
  the BatchNorm folds into SPEC's Dice (mu, var) and runs fused.
- Its PReLU has one slope per layer (torch.nn.PReLU(), slope 0.25).

Not reproduced: ``keys_length`` outside [0, T] raises ValueError (the peer
treats a length above T as T and a negative one as 0); ``att_activation``
must be sigmoid, relu, prelu or dice (the peer also takes "linear" and
module classes).
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import din_attention
from ..problem import check_layer_sizes, validate
from .peer_semantics import all_position_scores, batchnorm_gate, peer_argument_names

ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
DICE_EPS = 1e-8               # the peer's Dice BatchNorm eps
SOFTMAX_PADDING = -2**32 + 1  # the peer's fill for masked scores before its softmax
INIT_STD = 1e-4               # the peer's DNN initializes its Linear weights N(0, 1e-4)
LAYER = "AttentionSequencePoolingLayer"
ARGUMENT_NAMES = {"lengths": "keys_length"}


class _Dice(nn.Module):
    """The parameters of the peer's Dice(dim=3): ``bn`` and ``alpha`` [H, 1]."""

    def __init__(self, units: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(units, eps=DICE_EPS)
        self.alpha = nn.Parameter(torch.zeros(units, 1))


def _activation_layer(activation: str, units: int) -> nn.Module:
    if activation == "dice":
        return _Dice(units)
    if activation == "prelu":
        return nn.PReLU()
    return nn.Sigmoid() if activation == "sigmoid" else nn.ReLU()


class _DNN(nn.Module):
    """The peer's DNN parameters: ``linears`` and ``activation_layers``."""

    def __init__(self, inputs_dim: int, hidden_units, activation: str):
        super().__init__()
        widths = [inputs_dim] + list(hidden_units)
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.activation_layers = nn.ModuleList(_activation_layer(activation, units)
                                               for units in hidden_units)
        for linear in self.linears:
            nn.init.normal_(linear.weight, mean=0, std=INIT_STD)


class _LocalActivationUnit(nn.Module):
    """The peer's LocalActivationUnit parameters: ``dnn`` and ``dense``."""

    def __init__(self, hidden_units, embedding_dim: int, activation: str):
        super().__init__()
        self.dnn = _DNN(4 * embedding_dim, hidden_units, activation)
        self.dense = nn.Linear(hidden_units[-1], 1)


class AttentionSequencePoolingLayer(nn.Module):
    """DIN attention pooling with DeepCTR-Torch's interface (see the module doc).

    forward(query [B, 1, E], keys [B, T, E], keys_length [B, 1] int, mask=None)
    returns [B, 1, E], or with ``return_score`` the weights [B, 1, T]. With
    ``supports_masking`` the bool ``mask`` [B, T] (True = valid) replaces
    ``keys_length``. ``backend`` is din_fast's (SPEC section 2).
    """

    def __init__(self, att_hidden_units=(80, 40), att_activation="sigmoid",
                 weight_normalization=False, return_score=False, supports_masking=False,
                 embedding_dim=4, backend="auto", **kwargs):
        super().__init__()
        activation = att_activation.lower() if isinstance(att_activation, str) else None
        if activation not in ACTIVATIONS:
            raise ValueError(f"{LAYER}: `att_activation` must be one of {ACTIVATIONS} "
                             f"(any case); got {att_activation!r}")
        hidden_units = check_layer_sizes(LAYER, "embedding_dim", embedding_dim,
                                         "att_hidden_units", att_hidden_units)
        self.activation = activation
        self.return_score = return_score
        self.weight_normalization = weight_normalization
        self.supports_masking = supports_masking
        self.backend = backend
        self.local_att = _LocalActivationUnit(hidden_units, embedding_dim, activation)

    def _layers(self):
        unit = self.local_att
        weights = [linear.weight for linear in unit.dnn.linears] + [unit.dense.weight]
        biases = [linear.bias for linear in unit.dnn.linears] + [unit.dense.bias]
        return weights, biases

    def _activation_params(self):
        """SPEC activation_params for the fused path, or None where it cannot serve."""
        layers = self.local_att.dnn.activation_layers
        if self.activation == "prelu":
            return [layer.weight for layer in layers]
        if self.activation != "dice":
            return None
        # sigmoid(g (x - m) / sqrt(v + eps) + b) = sigmoid((x - m') / sqrt(v' + eps))
        # with m' = m - b sqrt(v + eps) / g and v' = (v + eps) / g^2 - eps, for g > 0.
        params = []
        for layer in layers:
            bn = layer.bn
            std = torch.sqrt(bn.running_var + bn.eps)
            params.append((layer.alpha.view(-1), bn.running_mean - bn.bias * std / bn.weight,
                           (std / bn.weight).square() - bn.eps))
        return params

    def _runs_fused(self) -> bool:
        if self.activation != "dice":
            return True
        if self.training:
            return False
        return all(bool((layer.bn.weight > 0).all())
                   for layer in self.local_att.dnn.activation_layers)

    def forward(self, query, keys, keys_length, mask=None):
        if self.supports_masking:
            if mask is None:
                raise ValueError(f"{LAYER}: `mask` is required when supports_masking=True")
            lengths = None
        else:
            if keys_length is None:
                raise ValueError(f"{LAYER}: `keys_length` [B, 1] is required when "
                                 "supports_masking=False")
            mask = None
            lengths = keys_length
            if isinstance(lengths, torch.Tensor) and lengths.dim() == 2 and lengths.shape[1] == 1:
                lengths = lengths.squeeze(1)
        if isinstance(query, torch.Tensor) and (query.dim() != 3 or query.shape[1] != 1):
            raise ValueError(f"{LAYER}: `query` must have shape [B, 1, E]; "
                             f"got {tuple(query.shape)}")
        normalization = "softmax" if self.weight_normalization else None
        weights, biases = self._layers()
        with peer_argument_names(LAYER, ARGUMENT_NAMES):
            if self._runs_fused():
                result = din_attention(
                    query, keys, lengths, mask=mask, weights=weights, biases=biases,
                    activation=self.activation, activation_params=self._activation_params(),
                    normalization=normalization, return_scores=self.return_score,
                    backend=self.backend, dice_eps=DICE_EPS)
                result = result[1] if self.return_score else result
                if self.weight_normalization:
                    result = self._average_empty_rows(result, keys, lengths, mask)
                return result
            return self._forward_over_padding(query, keys, lengths, mask, weights, biases,
                                              normalization)

    def _average_empty_rows(self, result, keys, lengths, mask):
        """The peer's softmax gives a row with no valid position the weight 1/T
        everywhere (SPEC gives it 0): add that to the scores or the output."""
        length = keys.shape[1]
        if length == 0:
            return result
        empty = (lengths == 0) if mask is None else ~mask.any(dim=1)
        empty = empty.to(result.dtype)[:, None, None]
        if self.return_score:
            return result + empty / length
        return result + empty * keys.mean(dim=1, keepdim=True).to(result.dtype)

    def _forward_over_padding(self, query, keys, lengths, mask, weights, biases, normalization):
        """The peer's own order: BatchNorm-Dice over every position, then mask."""
        layers = self.local_att.dnn.activation_layers
        problem = validate(query, keys, lengths, weights=weights, biases=biases,
                           activation="dice", mask=mask, normalization=normalization,
                           scale=1.0, values=None, dice_eps=DICE_EPS,
                           activation_params=[(layer.alpha.view(-1), layer.bn.running_mean,
                                               layer.bn.running_var) for layer in layers])
        scores = all_position_scores(problem, batchnorm_gate([layer.bn for layer in layers]))
        valid = problem.valid_mask()[:, None, :]
        fill = SOFTMAX_PADDING if self.weight_normalization else 0.0
        scores = torch.where(valid, scores, torch.full_like(scores, fill))
        if self.weight_normalization:
            scores = torch.softmax(scores, dim=-1)
        return scores if self.return_score else scores @ problem.keys
