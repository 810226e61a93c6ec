"""DINAttention: the drop-in module holding the activation unit's parameters."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from . import two_stage
from .dice_statistics import DiceStatistics, batch_moments, update_running
from .functional import din_attention, din_attention_jagged, resolve_backend, run_problem
from .layer_hooks import run_weight_hooks
from .problem import (BACKENDS, DEFAULT_DICE_EPS, check_layer_sizes, validate,
                      validate_jagged, validate_options, validating)
from .search import SEARCHES

PRELU_INIT = 0.25  # torch.nn.PReLU's default slope


class DINAttention(DiceStatistics, nn.Module):
    """The DIN local activation unit and attention pooling, as a layer.

    Scores every history item against the candidate with an MLP over
    ``[q, k, q - k, q * k]``, masks the padding and pools the history with the
    resulting weights: ``help(din_fast.din_attention)`` gives the exact formula.

    Args:
        embed_dim: D, the size of the query and of every key.
        hidden_units: the MLP's hidden widths, at least one (the paper: 80, 40).
        activation: "sigmoid" (the original unit), "relu", "prelu" or "dice".
        normalization: None (the paper's raw scores) or "softmax" over the
            valid positions (the released DIN code).
        scale: multiplies the scores before the normalization.
        return_scores: forward also returns the attention weights.
        backend: "auto", "triton", "torch" or "reference" (din_attention's).
        dice_eps: Dice's epsilon.
        momentum: Dice's running-statistics momentum, as BatchNorm's.
        top_k: None (exact DIN over the whole history) or K: two-stage
            attention, din_fast.din_attention_top_k (stage one keeps the K
            positions that ``search`` scores highest, stage two is this
            layer's DIN over those alone).
        search: the stage-one scorer with ``top_k``: "din" (this layer's own
            score), "dot" (learned projections ``search_query`` and
            ``search_key``, trained by a loss on ``search_logits``) or
            "category" (forward then takes the categories).
        search_dim: P, the width of the "dot" projections (default: embed_dim).

    Raises:
        ValueError: ``embed_dim`` or a width not a positive int, no hidden
            layer, an unknown activation, normalization or backend, a
            non-finite scale, a dice_eps that is not a positive number, a
            momentum outside [0, 1].
        TypeError: a scale that is not a real number.

    Parameters are in ``nn.Linear`` layout, so weights of other PyTorch DIN
    layers load unchanged: ``hidden[i]`` is layer i+1 (the first takes the 4D
    features [q | k | q-k | q*k]) and ``output`` maps the last hidden layer to
    the score. PReLU and Dice keep one slope per unit in ``alphas``; Dice keeps,
    per layer, BatchNorm-style running statistics ``running_mean_{i}`` and
    ``running_var_{i}``. In training mode Dice normalizes with the statistics
    of the batch's valid positions only (never the padding) and updates the
    running ones; in eval mode it uses the running ones.

    The forward reads the layers' weights without calling the layers, running
    their forward pre-hooks first, so weight reparametrizations hold
    (``torch.nn.utils.weight_norm``, ``spectral_norm``, ``prune`` and
    ``torch.nn.utils.parametrize``); a hook that needs a layer's input or
    output (a forward or backward hook) is refused by name at forward.
    """

    def __init__(self, embed_dim: int, hidden_units=(80, 40), activation: str = "sigmoid",
                 normalization=None, scale: float = 1.0, return_scores: bool = False,
                 backend: str = "auto", dice_eps: float = DEFAULT_DICE_EPS,
                 momentum: float = 0.1, top_k=None, search: str = "din", search_dim=None):
        super().__init__()
        hidden_units = check_layer_sizes("DINAttention", "embed_dim", embed_dim,
                                         "hidden_units", hidden_units)
        with validating("DINAttention"):
            validate_options(activation, normalization, scale, dice_eps, return_scores)
        if backend not in BACKENDS:
            raise ValueError(f"DINAttention: `backend` must be one of {BACKENDS}; "
                             f"got {backend!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
                or not 0 <= momentum <= 1:
            raise ValueError(f"DINAttention: `momentum` must be a number in [0, 1]; "
                             f"got {momentum!r}")
        self.embed_dim = embed_dim
        self.hidden_units = hidden_units
        self.activation = activation
        self.normalization = normalization
        self.scale = scale
        self.return_scores = return_scores
        self.backend = backend
        self.dice_eps = dice_eps
        self.momentum = momentum
        self.top_k, self.search = _check_search_options(top_k, search, search_dim)
        # Dice's training statistics over this process's batch (None) or a
        # process group's (din_fast.synchronize_dice_statistics).
        self.statistics_group = None
        widths = (4 * embed_dim,) + hidden_units
        self.hidden = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(hidden_units[-1], 1)
        if activation in ("prelu", "dice"):
            init = PRELU_INIT if activation == "prelu" else 0.0
            self.alphas = nn.ParameterList(nn.Parameter(torch.full((h,), init))
                                           for h in hidden_units)
        if activation == "dice":
            for i, h in enumerate(hidden_units):
                self.register_buffer(f"running_mean_{i}", torch.zeros(h))
                self.register_buffer(f"running_var_{i}", torch.ones(h))
        if search == "dot":
            width = embed_dim if search_dim is None else search_dim
            self.search_query = nn.Linear(embed_dim, width, bias=False)
            self.search_key = nn.Linear(embed_dim, width, bias=False)

    def _running_stats(self):
        return [(getattr(self, f"running_mean_{i}"), getattr(self, f"running_var_{i}"))
                for i in range(len(self.hidden_units))]

    def activation_params(self):
        """The functional form's activation_params (Dice: the running statistics)."""
        if self.activation == "prelu":
            return list(self.alphas)
        if self.activation == "dice":
            return [(a, mu, var) for a, (mu, var) in zip(self.alphas, self._running_stats())]
        return None

    def _run_layer_hooks(self) -> None:
        """The layers' forward pre-hooks (old-style weight_norm, spectral_norm,
        prune recompute ``weight`` there), which calling them would run: the
        forward reads their weights instead (din_fast.layer_hooks)."""
        layers = [(f"hidden.{i}", layer) for i, layer in enumerate(self.hidden)]
        layers.append(("output", self.output))
        if self.search == "dot":
            layers += [("search_query", self.search_query), ("search_key", self.search_key)]
        run_weight_hooks("DINAttention", layers)

    def search_params(self):
        """din_attention_top_k's search_params: the "dot" projections, else None."""
        if self.search != "dot":
            return None
        return (self.search_query.weight, self.search_key.weight)

    def _functional_kwargs(self, mask=None, values=None) -> dict:
        """din_attention's keyword arguments for this layer, less the backend."""
        weights = [layer.weight for layer in self.hidden] + [self.output.weight]
        biases = [layer.bias for layer in self.hidden] + [self.output.bias]
        return dict(weights=weights, biases=biases, activation=self.activation,
                    activation_params=self.activation_params(), mask=mask,
                    normalization=self.normalization, scale=self.scale, values=values,
                    dice_eps=self.dice_eps)

    def resolved_backend(self, dtype: torch.dtype = torch.float32) -> str:
        """The concrete backend a forward in the current mode runs.

        ``backend`` with "auto" (and DIN_FAST_BACKEND) resolved as
        din_attention resolves it; training-mode Dice always runs the torch
        backend.

        Args:
            dtype: the inputs' floating dtype (on the parameters' device).

        Returns:
            "triton", "torch" or "reference".

        Raises:
            ValueError: DIN_FAST_BACKEND names no backend.
        """
        if self.activation == "dice" and self.training:
            return "torch"
        probe = self.output.weight.new_zeros(1, 1, self.embed_dim, dtype=dtype)
        return resolve_backend(self.backend, validate(probe[:, 0], probe, None,
                                                      **self._functional_kwargs()))

    def forward(self, query, keys, lengths=None, mask=None, values=None,
                query_categories=None, key_categories=None):
        """Pool the history for each candidate.

        Args:
            query: the candidates, [B, D] or [B, C, D].
            keys: the history, [B, T, D], in the query's dtype.
            lengths: [B] int, valid positions t < lengths[b]; or
            mask: [B, T] bool, True = valid (not both; neither: all valid).
            values: [B, T, Dv] pooled instead of the keys.
            query_categories: with ``search="category"``, the candidates'
                categories, int32/int64 [B] (2-D query) or [B, C].
            key_categories: with ``search="category"``, the history's
                categories, int32/int64 [B, T].

        Returns:
            The pooled history, [B, Dv] or [B, C, Dv] in the keys' dtype; with
            ``return_scores`` also the weights, [B, T] or [B, C, T].

        Raises:
            TypeError: as din_fast.din_attention (din_attention_top_k with
                ``top_k``), for inputs of the wrong type or dtype.
            ValueError: as din_fast.din_attention (din_attention_top_k with
                ``top_k``), for inputs whose shapes or devices do not fit, and
                for a forward or backward hook on one of the layers.
        """
        self._run_layer_hooks()
        if self.top_k is not None:
            return two_stage.module_forward(self, query, keys, lengths, mask, values,
                                            query_categories, key_categories)
        kwargs = self._functional_kwargs(mask, values)
        if self.activation == "dice" and self.training:
            return self._forward_dice_training(query, keys, lengths, kwargs)
        return din_attention(query, keys, lengths, return_scores=self.return_scores,
                             backend=self.backend, **kwargs)

    def forward_jagged(self, query, keys_values, offsets, max_len, values=None):
        """The layer on jagged histories (din_fast.din_attention_jagged's layout).

        Training-mode Dice pads the rows to ``max_len`` for its batch
        statistics (the other modes never build the padding).

        Args:
            query: the candidates, [B, D] or [B, C, D].
            keys_values: every row's history back to back, [L, D], in the
                query's dtype (TorchRec's ``JaggedTensor.values()``).
            offsets: [B + 1] int32/int64, from 0 to L, non-decreasing: row b is
                ``keys_values[offsets[b]:offsets[b + 1]]`` (``.offsets()``).
            max_len: a non-negative int, an upper bound on every row's length.
            values: [L, Dv] jagged like ``keys_values``, pooled instead of it.

        Returns:
            The pooled history, [B, Dv] or [B, C, Dv] in the keys' dtype; with
            ``return_scores`` also the weights as jagged values, [L] or [L, C].

        Raises:
            TypeError: as din_fast.din_attention_jagged, for inputs of the
                wrong type or dtype.
            ValueError: the layer has ``top_k`` (no two-stage mode on jagged
                input), or as din_fast.din_attention_jagged.
        """
        self._run_layer_hooks()
        if self.top_k is not None:
            raise ValueError("DINAttention: forward_jagged has no two-stage mode; pad the "
                             "histories and call forward (top_k is set)")
        kwargs = self._functional_kwargs(values=values)
        del kwargs["mask"]                       # jagged rows have no padding to mask
        if self.activation == "dice" and self.training:
            return self._forward_dice_training_jagged(query, keys_values, offsets, max_len,
                                                      kwargs)
        return din_attention_jagged(query, keys_values, offsets, max_len,
                                    return_scores=self.return_scores, backend=self.backend,
                                    **kwargs)

    def _forward_dice_training_jagged(self, query, keys_values, offsets, max_len, kwargs):
        problem = validate_jagged(query, keys_values, offsets, max_len, **kwargs)
        values = None if problem.values is None else problem.padded(problem.values, max_len)
        result = self._forward_dice_training(query, problem.padded(problem.keys_values, max_len),
                                             problem.lengths(), dict(kwargs, mask=None,
                                                                     values=values))
        if not self.return_scores:
            return result
        pooled, scores = result                 # scores [B, T] or [B, C, T]
        rows, cols = problem.padded_positions()
        return pooled, (scores[rows, cols] if scores.dim() == 2 else scores[rows, :, cols])

    def _forward_dice_training(self, query, keys, lengths, kwargs):
        # Batch statistics need every valid pre-activation of a layer before
        # any of them is activated: a whole-batch pass, which the torch
        # backend does layer by layer (the fused kernels serve Dice at eval).
        problem = validate(query, keys, lengths, **kwargs)
        batch_stats = []

        def batch_stats_gate(layer, x, valid):
            mu, var, count = _valid_moments(x, valid, self.statistics_group)
            batch_stats.append((mu, var, count))
            return (x - mu) * torch.rsqrt(var + self.dice_eps)

        pooled, scores = run_problem(problem, "torch", dice_gate=batch_stats_gate)
        for (mu, var, count), (run_mu, run_var) in zip(batch_stats, self._running_stats()):
            update_running(run_mu, run_var, mu, var, count, self.momentum)
        return (pooled, scores) if self.return_scores else pooled

    def search_logits(self, query, keys, lengths=None, mask=None):
        """SIM's auxiliary logits of the "dot" search.

        ``sum_t softmax_t(s1) * s1[t]`` over the valid positions, s1 the
        projections' inner products. A CTR loss on them trains the
        projections over the whole history (stage one's selection has no
        gradient); query and keys are detached, so nothing else learns from
        it (din_fast.two_stage.search_logits).

        Args:
            query: the candidates, [B, D] or [B, C, D].
            keys: the history, [B, T, D], in the query's dtype.
            lengths: [B] int32/int64, valid positions t < lengths[b]; or
            mask: [B, T] bool, True = valid (not both; neither: all valid).

        Returns:
            One logit per candidate, [B] or [B, C]: float32 (float64 for
            float64 inputs).

        Raises:
            ValueError: the layer's ``search`` is not "dot", or inputs whose
                shapes or devices do not fit (as din_fast.din_attention).
            TypeError: inputs of the wrong type or dtype.
        """
        if self.search != "dot":
            raise ValueError(f"DINAttention: search_logits needs search='dot'; this layer's "
                             f"search is {self.search!r}")
        self._run_layer_hooks()
        return two_stage.search_logits(self, query, keys, lengths, mask)

    def extra_repr(self) -> str:
        two_stage_mode = "" if self.top_k is None else \
            f", top_k={self.top_k}, search={self.search!r}"
        return (f"embed_dim={self.embed_dim}, hidden_units={self.hidden_units}, "
                f"activation={self.activation!r}, normalization={self.normalization!r}, "
                f"scale={self.scale}, backend={self.backend!r}{two_stage_mode}")


def _check_search_options(top_k, search, search_dim):
    """(top_k, search) of a DINAttention, checked."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"DINAttention: `top_k` must be None or a positive int; got {top_k!r}")
    if search not in SEARCHES:
        raise ValueError(f"DINAttention: `search` must be one of {SEARCHES}; got {search!r}")
    if search != "din" and top_k is None:
        raise ValueError(f"DINAttention: search={search!r} is stage one of the two-stage mode; "
                         "give `top_k` too")
    if search_dim is not None and (search != "dot" or isinstance(search_dim, bool)
                                   or not isinstance(search_dim, int) or search_dim < 1):
        raise ValueError(f"DINAttention: `search_dim` is the positive width of the 'dot' "
                         f"projections; got {search_dim!r} with search={search!r}")
    return top_k, search


def _valid_moments(x, valid, group):
    """Mean and biased variance per unit of the pre-activations x [N, C, H]
    over their valid positions (every candidate), as BatchNorm normalizes in
    training, and the count of values they cover (an int64 tensor); over the
    process group's batch with ``group`` (din_fast.dice_statistics).

    ``valid`` [N] bool marks the valid positions, or is None when all are (the
    eager torch backend passes the valid positions only, packed).
    """
    keep = None if valid is None else valid[:, None, None].expand(-1, x.shape[1], 1).flatten(0, 1)
    return batch_moments(x.flatten(0, 1), keep, group)
