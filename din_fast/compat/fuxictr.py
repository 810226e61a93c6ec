"""FuxiCTR's DIN_Attention, on din_fast.

Replace ``from fuxictr.pytorch.layers import DIN_Attention`` with
``from din_fast.compat.fuxictr import DIN_Attention``: same constructor, same
forward, same output, same state_dict names (the ``attention_layer.mlp``
Sequential laid out as FuxiCTR's MLP_Block lays it out, so a FuxiCTR
checkpoint loads with ``strict=True``), same initialization order. Everything
fuxictr 2.3.10's layer runs, this layer runs, with the peer's results.

The fused path (din_attention) runs when the peer's MLP is din_attention's unit:
- at least one hidden layer, each with one hidden activation of one kind:
  "relu", "sigmoid", "prelu" (one slope per unit, torch.nn.PReLU(H, init=0.1)),
  "dice" (in eval mode), or the modules nn.ReLU, nn.Sigmoid, nn.PReLU;
- ``batch_norm`` only in eval mode (each BatchNorm folds into its Linear);
- ``dropout_rate`` only in eval mode (dropout is then the identity);
- no ``output_activation``;
- a ``mask`` that is bool, or numeric holding only 0 and 1 and not requiring
  grad (finding that out reads the mask: a host sync on a GPU; a bool mask
  needs none).
``use_softmax`` adds -1e9 to the padded scores before a softmax over all T
positions: a row with no valid position gets 1/T everywhere, so its output is
the mean of its (padding) history; the fused path adds that mean to such rows.

Everything else runs on the general path: the peer's own modules, in the
peer's layout ([B*T, H]), on every position, padding included, in PyTorch (the
first layer folded, no concat), whatever ``backend``: other hidden
activations (any torch.nn name, module instances, mixed per-layer lists,
none), ``attention_units=[]``, BatchNorm and dropout in training mode, Dice
in training mode (its BatchNorm, eps 1e-9 and momentum 0.01 without affine
parameters, takes its statistics over the padding too), an
``output_activation`` (applied to the scores before the mask), and a mask of
other values or one that requires grad (it weights the scores, as in the
peer, which gives it a gradient).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..functional import din_attention
from ..layer_hooks import run_weight_hooks
from ..problem import check_layer_sizes
from .peer_semantics import (first_layer_everywhere, fused_activation, module_of_class,
                             peer_argument_names, uses_batch_statistics, validate_inputs)

DICE_EPS = 1e-9          # the peer's Dice BatchNorm eps
DICE_MOMENTUM = 0.01     # and momentum
PRELU_INIT = 0.1         # the peer's PReLU slope
SOFTMAX_PADDING = -1e9   # the peer's additive mask before its softmax
LAYER = "DIN_Attention"
MLP = "attention_layer.mlp"  # the peer's Sequential, as state_dict names it
ARGUMENT_NAMES = {"query": "target_item", "keys": "history_sequence"}


class _Dice(nn.Module):
    """The peer's Dice: ``bn`` (no affine) and ``alpha`` [H], on [N, H]."""

    def __init__(self, units: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(units, affine=False, eps=DICE_EPS, momentum=DICE_MOMENTUM)
        self.alpha = nn.Parameter(torch.zeros(units))

    def forward(self, x):
        p = torch.sigmoid(self.bn(x))
        return p * x + self.alpha * (1 - p) * x


def _activation(name, argument: str, units=None):
    """The peer's get_activation: a module for a name (a few special ones,
    else any torch.nn class by its exact name); anything else as it is."""
    if not isinstance(name, str):
        return name
    special = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
               "softmax": lambda: nn.Softmax(dim=-1)}
    if name.lower() in special:
        return special[name.lower()]()
    if name.lower() in ("prelu", "dice"):
        if units is None:
            raise ValueError(f"{LAYER}: `{argument}` cannot be {name!r} (it needs a width; "
                             "only hidden layers have one)")
        return nn.PReLU(units, init=PRELU_INIT) if name.lower() == "prelu" else _Dice(units)
    module = module_of_class(getattr(nn, name, None), LAYER, argument)
    if module is not None:
        return module
    raise ValueError(f"{LAYER}: `{argument}` must name a torch.nn activation (or be relu, "
                     f"sigmoid, tanh, softmax, prelu, dice in any case) or be a module; "
                     f"got {name!r}")


def _per_layer(value, layers: int, argument: str) -> list:
    """The peer's broadcast of a hidden-layer option: one value for every
    layer, or a list of one per layer."""
    if not isinstance(value, list):
        return [value] * layers
    if len(value) < layers or (argument == "hidden_activations" and len(value) != layers):
        raise ValueError(f"{LAYER}: `{argument}` must be one value or a list of one per hidden "
                         f"layer ({layers}); got {value!r}")
    return value[:layers]


class _HiddenLayer(NamedTuple):
    """Where one hidden layer's modules sit in the Sequential (None = absent)."""

    linear: int
    norm: Optional[int]
    activation: Optional[int]
    dropout: Optional[int]


class _MLPBlock(nn.Module):
    """The peer's MLP_Block: ``mlp``, a Sequential of, per hidden layer,
    Linear, [BatchNorm1d], [activation], [Dropout], then the score Linear and
    [the output activation]; the indices are the state_dict's."""

    def __init__(self, input_dim: int, hidden_units, hidden_activations, dropout_rates,
                 batch_norm: bool, output_activation):
        super().__init__()
        widths = [input_dim] + list(hidden_units)
        layers, self.hidden = [], []
        for fan_in, units, activation, rate in zip(widths[:-1], widths[1:], hidden_activations,
                                                   dropout_rates):
            where = [len(layers), None, None, None]
            layers.append(nn.Linear(fan_in, units))
            if batch_norm:
                where[1] = len(layers)
                layers.append(nn.BatchNorm1d(units))
            module = _activation(activation, "hidden_activations", units)
            if module:  # the peer skips a falsy activation (None: no activation)
                if not isinstance(module, nn.Module):
                    raise ValueError(f"{LAYER}: `hidden_activations` must be names or nn.Module "
                                     f"instances; got {module!r}")
                where[2] = len(layers)
                layers.append(module)
            if rate > 0:
                where[3] = len(layers)
                layers.append(nn.Dropout(p=rate))
            self.hidden.append(_HiddenLayer(*where))
        self.score = len(layers)
        layers.append(nn.Linear(widths[-1], 1))
        if output_activation is not None:
            module = _activation(output_activation, "output_activation")
            if not isinstance(module, nn.Module):
                raise ValueError(f"{LAYER}: `output_activation` must be None, a name or an "
                                 f"nn.Module; got {output_activation!r}")
            layers.append(module)
        self.has_output_activation = output_activation is not None
        self.mlp = nn.Sequential(*layers)

    def fused_unit(self):
        """(weights, biases, activation, activation_params) of din_attention
        for the MLP as it runs now (train or eval), or None where
        din_attention cannot express it (see the module doc)."""
        if not self.hidden or self.has_output_activation:
            return None
        names = []
        for layer in self.hidden:
            activation = None if layer.activation is None else self.mlp[layer.activation]
            name = fused_activation(activation, _Dice)
            norm = None if layer.norm is None else self.mlp[layer.norm]
            dropout = None if layer.dropout is None else self.mlp[layer.dropout]
            if name is None or (name == "dice" and uses_batch_statistics(activation.bn)) \
                    or (norm is not None and uses_batch_statistics(norm)) \
                    or (dropout is not None and dropout.training):
                return None
            names.append(name)
        if len(set(names)) != 1:
            return None
        # Read, not called: the layers' weight hooks first (din_fast.layer_hooks).
        run_weight_hooks(LAYER, list(self.mlp.named_modules(prefix=MLP))[1:])
        weights, biases, params = [], [], []
        for layer, name in zip(self.hidden, names):
            norm = None if layer.norm is None else self.mlp[layer.norm]
            weight, bias = _folded_linear(self.mlp[layer.linear], norm)
            weights.append(weight)
            biases.append(bias)
            activation = None if layer.activation is None else self.mlp[layer.activation]
            if name == "prelu":
                params.append(activation.weight)
            elif name == "dice":
                params.append((activation.alpha, activation.bn.running_mean,
                               activation.bn.running_var))
        score = self.mlp[self.score]
        return (weights + [score.weight], biases + [score.bias], names[0],
                params if names[0] in ("prelu", "dice") else None)

    def scores_everywhere(self, query, keys):
        """The peer's scores of every position, [B, T], on the general path:
        its Sequential on [B*T, H] after the folded first layer."""
        batch, length = keys.shape[:2]
        run_weight_hooks(LAYER, [(f"{MLP}.0", self.mlp[0])])            # folded, not called
        h = first_layer_everywhere(self.mlp[0], query, keys)            # [B, T, H_1]
        return self.mlp[1:](h.reshape(batch * length, h.shape[-1])).view(batch, length)


def _folded_linear(linear: nn.Linear, norm):
    """A Linear followed by an eval-mode BatchNorm1d as one Linear."""
    if norm is None:
        return linear.weight, linear.bias
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = (linear.bias - norm.running_mean) * scale
    if norm.bias is not None:
        bias = bias + norm.bias
    return linear.weight * scale[:, None], bias


class DIN_Attention(nn.Module):  # noqa: N801 - the peer's class name
    """DIN target attention with FuxiCTR's interface (see the module doc).

    Args:
        embedding_dim: E, the size of the target item and of every history item.
        attention_units: the MLP's hidden widths (``[]``: the score Linear
            alone, on the general path).
        hidden_activations: one activation for every hidden layer or a list
            of one per layer: a name (relu, sigmoid, tanh, softmax, prelu or
            dice in any case, or a torch.nn class name such as "LeakyReLU"),
            an nn.Module instance, or None (no activation).
        output_activation: None, or a name or nn.Module applied to the scores
            before the mask (general path).
        dropout_rate: a rate <= 1, or a list of one per hidden layer.
        batch_norm: a BatchNorm1d after every hidden Linear.
        use_softmax: softmax over the T positions, padding shifted by -1e9 as
            the peer does; False: raw masked scores.
        backend: "auto", "triton", "torch" or "reference", as
            din_fast.din_attention's (the general path always runs PyTorch).

    Raises:
        ValueError: ``embedding_dim`` or a width that is not a positive int, a
            bad ``dropout_rate``, a per-layer list of the wrong length, or an
            activation that names no torch.nn module or cannot be built.
    """

    def __init__(self, embedding_dim=64, attention_units=[32], hidden_activations="ReLU",
                 output_activation=None, dropout_rate=0, batch_norm=False, use_softmax=False,
                 backend="auto"):
        super().__init__()
        if isinstance(attention_units, (list, tuple)) and len(attention_units) == 0:
            # No hidden layer: the score Linear alone (the check needs a width).
            check_layer_sizes(LAYER, "embedding_dim", embedding_dim, "attention_units", [1])
            units = []
        else:
            units = list(check_layer_sizes(LAYER, "embedding_dim", embedding_dim,
                                           "attention_units", attention_units))
        rates = _per_layer(dropout_rate, len(units), "dropout_rate")
        if not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and r <= 1
                   for r in rates):
            raise ValueError(f"{LAYER}: `dropout_rate` must be a rate <= 1 or a list of one "
                             f"per hidden layer; got {dropout_rate!r}")
        self.embedding_dim = embedding_dim
        self.use_softmax = use_softmax
        self.backend = backend
        self.attention_layer = _MLPBlock(
            4 * embedding_dim, units,
            _per_layer(hidden_activations, len(units), "hidden_activations"), rates,
            bool(batch_norm), output_activation)

    def forward(self, target_item, history_sequence, mask=None):
        """Pool each row's history for its target item.

        Args:
            target_item: the candidate, [B, E] float (float32, float16,
                bfloat16; float64 off the triton backend).
            history_sequence: the history, [B, T, E], in the target's dtype.
            mask: [B, T], 0 = padding: bool, or any real dtype (a mask of
                values other than 0 and 1 weights the scores, as the peer's
                does); None: every position valid.

        Returns:
            The pooled history, [B, E], in the history's dtype (under
            torch.autocast too); with a mask at least float32, as the peer's
            (it applies the mask in float32, which promotes a half-precision
            result), on either path.

        Raises:
            TypeError: a complex mask, or inputs of the wrong type or dtype
                (as din_fast.din_attention, in the peer's argument names).
            ValueError: a target that is not [B, E], or inputs whose shapes
                or devices do not fit.
        """
        if isinstance(target_item, torch.Tensor) and target_item.dim() != 2:
            raise ValueError(f"{LAYER}: `target_item` must have shape [B, E]; "
                             f"got {tuple(target_item.shape)}")
        if isinstance(mask, torch.Tensor) and mask.is_complex():
            raise TypeError(f"{LAYER}: `mask` must be bool or real (0 = padding); "
                            f"got {mask.dtype}")
        # The peer's mask: 0 = padding, any real dtype. A numeric one weights
        # the scores: the fused path takes it only when it holds 0 and 1 alone.
        numeric = isinstance(mask, torch.Tensor) and mask.dtype != torch.bool
        valid = mask != 0 if numeric else mask
        # The peer calls these two; this layer reads them (din_fast.layer_hooks).
        run_weight_hooks(LAYER, [("attention_layer", self.attention_layer),
                                 (MLP, self.attention_layer.mlp)])
        unit = self.attention_layer.fused_unit()
        with peer_argument_names(LAYER, ARGUMENT_NAMES):
            if unit is None or numeric:
                problem = validate_inputs(target_item, history_sequence, None, valid)
                # A mask that requires grad gets the peer's gradient there.
                if unit is None or mask.requires_grad \
                        or not bool(((mask == 0) | (mask == 1)).all()):
                    # The peer pools the history as given (under autocast too).
                    return self._forward_general(problem.query[:, 0], problem.keys,
                                                 history_sequence, mask)
            weights, biases, activation, params = unit
            pooled = din_attention(target_item, history_sequence, mask=valid, weights=weights,
                                   biases=biases, activation=activation,
                                   activation_params=params,
                                   normalization="softmax" if self.use_softmax else None,
                                   backend=self.backend, dice_eps=DICE_EPS)
        if self.use_softmax and valid is not None and history_sequence.shape[1] > 0:
            # The peer's softmax gives a row with no valid position 1/T everywhere.
            empty = (~valid.any(dim=1)).to(pooled.dtype)[:, None]
            pooled = pooled + empty * history_sequence.mean(dim=1).to(pooled.dtype)
        # The peer's result: its scores times the history as given (float32
        # under autocast when the history is), promoted by a mask it applies
        # in float32.
        dtype = history_sequence.dtype
        if valid is not None:
            dtype = torch.promote_types(dtype, torch.float32)
        return pooled.to(dtype)

    def _forward_general(self, target_item, keys, history_sequence, mask):
        """The peer's own order: its MLP on every position (of ``keys``, the
        history as din_attention's checks give it), then the mask (which
        weights the scores), the padding fill, the softmax, and the pooling
        of ``history_sequence`` as given."""
        scores = self.attention_layer.scores_everywhere(target_item, keys)
        if mask is not None:
            scores = scores * mask.float()
        if self.use_softmax:
            if mask is not None:
                scores = scores + SOFTMAX_PADDING * (1 - mask.float())
            scores = scores.softmax(dim=-1)
        return (scores.unsqueeze(-1) * history_sequence).sum(dim=1)

