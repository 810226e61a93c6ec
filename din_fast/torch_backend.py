"""The fast pure-PyTorch backend: the CPU default and the fallback everywhere.

Two savings over the literal formula, both exact:
- the first layer is folded, never building the [.., T, 4D] concat:
  W_1 [q, k, q-k, q*k] = (W_q + W_d) q + (W_k - W_d) k + W_p (q*k), where the
  first term is computed once per candidate and the second once per key,
  shared by every candidate of the row;
- the MLP runs on the valid positions only, packed; padding costs nothing.
"""

from __future__ import annotations

import torch

from .activations import activate, dice
from .problem import DINProblem, JaggedDINProblem, split_first_layer
from .reference import masked_normalize


def packed_positions(problem: DINProblem):
    """(rows, cols) of the valid history positions, or None when all are valid."""
    if problem.lengths is None and problem.mask is None:
        return None
    return problem.valid_mask().nonzero(as_tuple=True)


def packed_scores(problem, q_rows: torch.Tensor, packed_keys: torch.Tensor,
                  dtype: torch.dtype, dice_gate=None) -> torch.Tensor:
    """Raw scores s of packed history positions: [N, C].

    ``packed_keys`` [N, D] are the positions to score and ``q_rows`` [N, C, D]
    the candidates of each one's row: gathered from a padded batch, or the
    values of a jagged one as they are. Only the layer fields of ``problem``
    are read (weights, biases, activation, act_params, dice_eps).

    ``dice_gate(layer, x)``, when given, returns the logits of Dice's gate for
    the pre-activations x [N, C, H] of hidden layer ``layer`` in place of
    (x - mu) / sqrt(var + eps): how batch statistics (DINAttention in training)
    and the peers' BatchNorm-based Dice plug in.
    """
    w_q, w_k, w_d, w_p = split_first_layer(problem.weights[0].to(dtype))
    per_candidate = q_rows @ (w_q + w_d).t() + problem.biases[0].to(dtype)     # [N, C, H1]
    per_key = packed_keys @ (w_k - w_d).t()                                    # [N, H1]
    interaction = (q_rows * packed_keys[:, None, :]) @ w_p.t()                 # [N, C, H1]

    def act(layer, x, params):
        params = tuple(p.to(dtype) for p in params)
        if dice_gate is not None:
            return dice(x, params[0], dice_gate(layer, x))
        return activate(x, problem.activation, params, problem.dice_eps)

    h = act(0, per_candidate + interaction + per_key[:, None, :], problem.act_params[0])
    hidden = zip(problem.weights[1:-1], problem.biases[1:-1], problem.act_params[1:])
    for layer, (w, b, params) in enumerate(hidden, start=1):
        h = act(layer, h @ w.to(dtype).t() + b.to(dtype), params)
    w_out, b_out = problem.weights[-1].to(dtype), problem.biases[-1].to(dtype)
    return (h @ w_out.t()).squeeze(-1) + b_out


def torch_din_attention(problem: DINProblem, dice_gate=None):
    """Returns (pooled [B, C, Dv], weights w [B, C, T]) in the compute dtype."""
    dtype = problem.compute_dtype()
    q = problem.query.to(dtype)
    keys = problem.keys.to(dtype)
    batch, length, embed_dim = keys.shape
    candidates = q.shape[1]
    positions = packed_positions(problem)
    if positions is None:
        packed_keys = keys.reshape(batch * length, embed_dim)
        q_rows = q.repeat_interleave(length, dim=0)
    else:
        rows, cols = positions
        packed_keys = keys[rows, cols]
        q_rows = q[rows]
    scores = packed_scores(problem, q_rows, packed_keys, dtype, dice_gate)
    if positions is None:
        dense = scores.view(batch, length, candidates)
    else:
        dense = scores.new_zeros(batch, length, candidates).index_put(positions, scores)
    weights = masked_normalize(dense.transpose(1, 2), problem.valid_mask(),
                               problem.normalization, problem.scale)
    pooled = weights @ problem.value_tensor.to(dtype)
    return pooled, weights


def torch_din_attention_jagged(problem: JaggedDINProblem):
    """Returns (pooled [B, C, Dv], weights w [L, C]) in the compute dtype.

    The jagged values are the packed positions already: the MLP runs on them
    as they are, and the normalization and the weighted sum reduce per
    segment, so nothing of size [B, max_len, ...] is ever built.
    """
    dtype = problem.compute_dtype()
    q = problem.query.to(dtype)
    batch, candidates = q.shape[:2]
    rows = problem.row_ids()
    scores = packed_scores(problem, q[rows], problem.keys_values.to(dtype), dtype) * problem.scale
    if problem.normalization == "softmax":
        # Per-segment softmax; the max only stabilizes, so it carries no gradient.
        # Empty segments have no entries and so pool to zero, never NaN.
        index = rows[:, None].expand(-1, candidates)
        with torch.no_grad():
            seg_max = scores.new_full((batch, candidates), float("-inf"))
            seg_max = seg_max.scatter_reduce(0, index, scores, "amax")
        exp = torch.exp(scores - seg_max[rows])
        denom = exp.new_zeros(batch, candidates).index_add(0, rows, exp)
        scores = exp / denom[rows]
    values = problem.value_tensor.to(dtype)
    pooled = values.new_zeros(batch, candidates, values.shape[1])
    pooled = pooled.index_add(0, rows, scores[:, :, None] * values[:, None, :])
    return pooled, scores
