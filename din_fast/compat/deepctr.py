"""DeepCTR-Torch's AttentionSequencePoolingLayer, on din_fast.

Replace ``from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer``
with ``from din_fast.compat.deepctr import AttentionSequencePoolingLayer``: same
constructor, same forward, same output, same state_dict names (a DeepCTR-Torch
checkpoint loads with ``strict=True``), same initialization for the same seed.
Everything deepctr-torch 0.3.0's layer runs, this layer runs, with the peer's
results:

- ``keys_length`` is read as the peer reads it (``arange(T) < keys_length``):
  any integer or floating dtype, [B, 1], [B] or one length for every row; a
  length above T counts as T, a negative one as 0, a fractional one rounds
  up, NaN counts as 0.
- ``weight_normalization=True`` fills the padding with -(2**32) + 1 before a
  softmax over all T positions: a row of length 0 gets the weight 1/T at every
  position, so its output is the mean of its (padding) keys. Rows with a valid
  position are din_fast's softmax exactly (exp of the fill underflows to 0) and
  run fused; the mean is added to the empty rows. (In float16 the peer's fill
  overflows to -inf and its empty rows are NaN; this layer gives them the mean.)
- ``att_activation`` "sigmoid", "relu", "prelu" (one slope per layer, as
  torch.nn.PReLU()) and the classes nn.Sigmoid, nn.ReLU, nn.PReLU run fused.
  "dice" is a BatchNorm1d (eps 1e-8, momentum 0.1, affine) over every
  position, padding included, and a slope ``alpha``: where every Dice
  BatchNorm is in eval mode (its own mode, whatever the layer's) with positive
  weights it folds into din_fast's Dice and runs fused; a BatchNorm in
  training mode, a weight <= 0, or one so small that the folded variance
  leaves the dtype's range runs on the general path.
- ``att_activation="linear"`` and any other nn.Module class (nn.Tanh,
  nn.LeakyReLU, ...) run on the general path: the peer's own layers on every
  position, padding included, in PyTorch (the first layer folded, no concat),
  whatever ``backend``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..functional import din_attention
from ..layer_hooks import run_weight_hooks
from ..problem import check_layer_sizes
from .peer_semantics import (first_layer_everywhere, fused_activation, module_of_class,
                             peer_argument_names, uses_batch_statistics, validate_inputs)

ACTIVATION_NAMES = ("sigmoid", "relu", "prelu", "dice", "linear")
DICE_EPS = 1e-8               # the peer's Dice BatchNorm eps
FOLDED_DICE_EPS = 1e-30       # din_attention's eps for the folded Dice (_folded_dice)
SOFTMAX_PADDING = -2**32 + 1  # the peer's fill for masked scores before its softmax
INIT_STD = 1e-4               # the peer's DNN initializes its Linear weights N(0, 1e-4)
LAYER = "AttentionSequencePoolingLayer"
ARGUMENT_NAMES = {"lengths": "keys_length"}


class _Dice(nn.Module):
    """The peer's Dice(dim=3): BatchNorm1d ``bn`` over the units of [B, T, H]
    (every position a sample) and a slope ``alpha`` [H, 1]."""

    def __init__(self, units: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(units, eps=DICE_EPS)
        self.alpha = nn.Parameter(torch.zeros(units, 1))

    def forward(self, x):
        x = x.transpose(1, 2)                                  # [B, H, T]: BatchNorm1d's layout
        p = torch.sigmoid(self.bn(x))
        return (self.alpha * (1 - p) * x + p * x).transpose(1, 2)


def _activation_layer(activation, units: int) -> nn.Module:
    """The peer's activation_layer: a name (any case) or an nn.Module class."""
    if isinstance(activation, str) and activation.lower() in ACTIVATION_NAMES:
        name = activation.lower()
        if name == "dice":
            return _Dice(units)
        return {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "prelu": nn.PReLU,
                "linear": nn.Identity}[name]()
    module = module_of_class(activation, LAYER, "att_activation")
    if module is not None:
        return module
    raise ValueError(f"{LAYER}: `att_activation` must be one of {ACTIVATION_NAMES} (any case) or "
                     f"an nn.Module class; got {activation!r}")


class _DNN(nn.Module):
    """The peer's DNN parameters: ``linears`` and ``activation_layers``."""

    def __init__(self, inputs_dim: int, hidden_units, activation):
        super().__init__()
        widths = [inputs_dim] + list(hidden_units)
        self.linears = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.activation_layers = nn.ModuleList(_activation_layer(activation, units)
                                               for units in hidden_units)
        for linear in self.linears:
            nn.init.normal_(linear.weight, mean=0, std=INIT_STD)


class _LocalActivationUnit(nn.Module):
    """The peer's LocalActivationUnit parameters: ``dnn`` and ``dense``."""

    def __init__(self, hidden_units, embedding_dim: int, activation):
        super().__init__()
        self.dnn = _DNN(4 * embedding_dim, hidden_units, activation)
        self.dense = nn.Linear(hidden_units[-1], 1)

    def scores_everywhere(self, query, keys):
        """The peer's scores of every position, [B, T], on the general path."""
        h = first_layer_everywhere(self.dnn.linears[0], query, keys)     # [B, T, H_1]
        for i, activation in enumerate(self.dnn.activation_layers):
            h = activation(h)
            if i + 1 < len(self.dnn.linears):
                h = self.dnn.linears[i + 1](h)
        return self.dense(h).squeeze(-1)


class AttentionSequencePoolingLayer(nn.Module):
    """DIN attention pooling with DeepCTR-Torch's interface (see the module doc).

    Args:
        att_hidden_units: the attention MLP's hidden widths, at least one.
        att_activation: of every hidden layer: "sigmoid", "relu", "prelu",
            "dice" or "linear" (any case), or an nn.Module class built
            without arguments (nn.Tanh, ...).
        weight_normalization: softmax over the T positions, padding filled
            with -(2**32) + 1 as the peer does; False: raw masked scores.
        return_score: forward returns the weights [B, 1, T] instead of the
            pooled keys.
        supports_masking: forward reads the bool ``mask`` instead of
            ``keys_length``.
        embedding_dim: E, the size of the query and of every key.
        backend: "auto", "triton", "torch" or "reference", as
            din_fast.din_attention's (the general path always runs PyTorch).
        **kwargs: accepted and ignored, as the peer's constructor does.

    Raises:
        ValueError: ``embedding_dim`` or a width that is not a positive int,
            no hidden layer, or an unknown ``att_activation``.
    """

    def __init__(self, att_hidden_units=(80, 40), att_activation="sigmoid",
                 weight_normalization=False, return_score=False, supports_masking=False,
                 embedding_dim=4, backend="auto", **kwargs):
        super().__init__()
        hidden_units = check_layer_sizes(LAYER, "embedding_dim", embedding_dim,
                                         "att_hidden_units", att_hidden_units)
        self.return_score = return_score
        self.weight_normalization = weight_normalization
        self.supports_masking = supports_masking
        self.backend = backend
        self.local_att = _LocalActivationUnit(hidden_units, embedding_dim, att_activation)
        self.activation = fused_activation(self.local_att.dnn.activation_layers[0], _Dice)

    def _layers(self):
        unit = self.local_att
        weights = [linear.weight for linear in unit.dnn.linears] + [unit.dense.weight]
        biases = [linear.bias for linear in unit.dnn.linears] + [unit.dense.bias]
        return weights, biases

    def _activation_params(self):
        """din_attention's activation_params for the fused path."""
        layers = self.local_att.dnn.activation_layers
        if self.activation == "prelu":
            return [layer.weight for layer in layers]
        if self.activation != "dice":
            return None
        return self._folded_dice()

    def _folded_dice(self):
        """Each Dice layer as din_attention's (a, mu, var) with FOLDED_DICE_EPS.

        sigmoid(g (x - m) / sqrt(v + eps) + b) = sigmoid((x - m') / s) with
        s = sqrt(v + eps) / g, m' = m - b s, for g > 0; din_attention takes
        var = s^2 - FOLDED_DICE_EPS. The peer's own eps there instead would
        cancel against s^2 when s^2 is not far above it (g >> 1, v ~ 0).
        """
        params = []
        for layer in self.local_att.dnn.activation_layers:
            bn = layer.bn
            spread = torch.sqrt(bn.running_var + bn.eps) / bn.weight
            params.append((layer.alpha.view(-1), bn.running_mean - bn.bias * spread,
                           spread.square() - FOLDED_DICE_EPS))
        return params

    def _runs_fused(self) -> bool:
        if self.activation != "dice":
            return self.activation is not None
        layers = self.local_att.dnn.activation_layers
        if any(uses_batch_statistics(layer.bn) for layer in layers):
            return False
        # g > 0, and s^2 within the dtype's range (not for g tiny or huge):
        # else the peer's own layers. One read of the device (a host sync).
        foldable = [(layer.bn.weight > 0).all() for layer in layers]
        foldable += [(mean.isfinite() & var.isfinite() & (var + FOLDED_DICE_EPS > 0)).all()
                     for _, mean, var in self._folded_dice()]
        return bool(torch.stack(foldable).all())

    def forward(self, query, keys, keys_length, mask=None):
        """Pool each row's history for its one candidate.

        Args:
            query: the candidate, [B, 1, E] float (float32, float16,
                bfloat16; float64 off the triton backend).
            keys: the history, [B, T, E], in the query's dtype.
            keys_length: valid lengths read as the peer reads them, any
                integer or floating dtype, [B, 1], [B] or one for all rows;
                ignored with ``supports_masking``.
            mask: with ``supports_masking``, [B, T] bool, True = valid
                (required then); else ignored.

        Returns:
            The pooled keys, [B, 1, E] in the keys' dtype; with
            ``return_score`` the weights [B, 1, T] instead.

        Raises:
            TypeError: a ``keys_length`` that is not an integer or floating
                tensor, or inputs of the wrong type or dtype (as
                din_fast.din_attention, in the peer's argument names).
            ValueError: a missing ``mask`` or ``keys_length``, a query that is
                not [B, 1, E], a ``keys_length`` of neither B nor one length,
                or inputs whose shapes or devices do not fit.
        """
        if self.supports_masking:
            if mask is None:
                raise ValueError(f"{LAYER}: `mask` is required when supports_masking=True")
            lengths = None
        else:
            mask = None
            lengths = _peer_lengths(keys_length, keys)
        if isinstance(query, torch.Tensor) and (query.dim() != 3 or query.shape[1] != 1):
            raise ValueError(f"{LAYER}: `query` must have shape [B, 1, E]; "
                             f"got {tuple(query.shape)}")
        with peer_argument_names(LAYER, ARGUMENT_NAMES):
            fused = self._runs_fused()
            self._run_layer_hooks(fused)
            if fused:
                return self._forward_fused(query, keys, lengths, mask)
            return self._forward_general(validate_inputs(query, keys, lengths, mask))

    def _run_layer_hooks(self, fused: bool) -> None:
        """The hooks of the modules this forward reads without calling them
        (din_fast.layer_hooks), which the peer calls: on the fused path all of
        the unit's; on the general path, which calls the others, the unit, its
        DNN and the first Linear (folded)."""
        unit = self.local_att
        if fused:
            layers = unit.named_modules(prefix="local_att")
        else:
            layers = [("local_att", unit), ("local_att.dnn", unit.dnn),
                      ("local_att.dnn.linears.0", unit.dnn.linears[0])]
        run_weight_hooks(LAYER, layers)

    def _forward_fused(self, query, keys, lengths, mask):
        weights, biases = self._layers()
        result = din_attention(
            query, keys, lengths, mask=mask, weights=weights, biases=biases,
            activation=self.activation, activation_params=self._activation_params(),
            normalization="softmax" if self.weight_normalization else None,
            return_scores=self.return_score, backend=self.backend,
            dice_eps=FOLDED_DICE_EPS)
        result = result[1] if self.return_score else result
        if self.weight_normalization:
            result = self._average_empty_rows(result, keys, lengths, mask)
        return result

    def _average_empty_rows(self, result, keys, lengths, mask):
        """The peer's softmax gives a row with no valid position the weight 1/T
        everywhere (din_attention gives it 0): add that to the scores or the output."""
        length = keys.shape[1]
        if length == 0:
            return result
        empty = (lengths == 0) if mask is None else ~mask.any(dim=1)
        empty = empty.to(result.dtype)[:, None, None]
        if self.return_score:
            return result + empty / length
        return result + empty * keys.mean(dim=1, keepdim=True).to(result.dtype)

    def _forward_general(self, problem):
        """The peer's own order: its layers on every position, then the mask
        and the softmax (see the module doc)."""
        scores = self.local_att.scores_everywhere(problem.query[:, 0], problem.keys)[:, None, :]
        fill = 0.0
        if self.weight_normalization:
            # float16 cannot hold the peer's fill (its own overflows to -inf
            # and makes an empty row NaN): its lowest value pads as well.
            fill = max(SOFTMAX_PADDING, torch.finfo(scores.dtype).min)
        scores = torch.where(problem.valid_mask()[:, None, :], scores,
                             torch.full_like(scores, fill))
        if self.weight_normalization:
            scores = torch.softmax(scores, dim=-1)
        return scores if self.return_score else scores @ problem.keys


def _peer_lengths(keys_length, keys):
    """``keys_length`` as the peer reads it, as din_attention's lengths [B] int64.

    The peer's mask is ``arange(T, dtype=keys_length.dtype) < keys_length.view(-1, 1)``:
    the first clamp(ceil(length), 0, T) positions of each row (none for NaN),
    one length per row or one for all.
    """
    if keys_length is None:
        raise ValueError(f"{LAYER}: `keys_length` [B, 1] is required when supports_masking=False")
    if not isinstance(keys_length, torch.Tensor) or keys_length.dtype == torch.bool \
            or keys_length.is_complex():
        got = keys_length.dtype if isinstance(keys_length, torch.Tensor) \
            else type(keys_length).__name__
        raise TypeError(f"{LAYER}: `keys_length` must be an integer or floating tensor "
                        f"[B, 1]; got {got}")
    if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
        return keys_length  # din_attention names what is wrong with the keys
    batch, length = keys.shape[:2]
    flat = keys_length.reshape(-1)
    if flat.numel() not in (1, batch):
        raise ValueError(f"{LAYER}: `keys_length` must hold one length per row of `keys` "
                         f"{tuple(keys.shape)} ([{batch}, 1]) or one for all; "
                         f"got shape {tuple(keys_length.shape)}")
    if flat.is_floating_point():
        flat = torch.nan_to_num(flat.ceil(), nan=0.0).clamp(0, length)
    return flat.expand(batch).long().clamp(0, length)
