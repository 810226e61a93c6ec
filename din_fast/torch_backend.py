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

from .activations import activate
from .problem import DINProblem, split_first_layer
from .reference import masked_normalize


def packed_positions(problem: DINProblem):
    """(rows, cols) of the valid history positions, or None when all are valid."""
    if problem.lengths is None and problem.mask is None:
        return None
    return problem.valid_mask().nonzero(as_tuple=True)


def packed_first_layer(problem: DINProblem, positions, dtype: torch.dtype):
    """The folded first layer's pre-activation [N, C, H1] at the packed positions,
    with the packed queries [N, C, D] and keys [N, D] it was computed from."""
    q = problem.query.to(dtype)
    keys = problem.keys.to(dtype)
    batch, length, embed_dim = keys.shape
    if positions is None:
        packed_keys = keys.reshape(batch * length, embed_dim)
        q_rows = q.repeat_interleave(length, dim=0)
    else:
        rows, cols = positions
        packed_keys = keys[rows, cols]
        q_rows = q[rows]
    w_q, w_k, w_d, w_p = split_first_layer(problem.weights[0].to(dtype))
    per_candidate = q_rows @ (w_q + w_d).t() + problem.biases[0].to(dtype)     # [N, C, H1]
    per_key = packed_keys @ (w_k - w_d).t()                                    # [N, H1]
    interaction = (q_rows * packed_keys[:, None, :]) @ w_p.t()                 # [N, C, H1]
    return per_candidate + interaction + per_key[:, None, :], q_rows, packed_keys


def packed_scores(problem: DINProblem, positions, dtype: torch.dtype,
                  dice_batch_stats=None) -> torch.Tensor:
    """Raw scores s of the valid positions: [N, C] in the order of ``positions``.

    With ``dice_batch_stats`` (a list), Dice normalizes each layer with the mean
    and biased variance of its pre-activations over the packed (valid)
    positions, as BatchNorm does in training, and appends (mu, var, count).
    """
    first_layer, _, _ = packed_first_layer(problem, positions, dtype)

    def act(x, params):
        params = tuple(p.to(dtype) for p in params)
        if dice_batch_stats is not None:
            flat = x.flatten(0, 1)
            count = flat.shape[0]
            mu = flat.sum(0) / max(count, 1)
            var = (flat - mu).square().sum(0) / max(count, 1)
            dice_batch_stats.append((mu, var, count))
            params = (params[0], mu, var)
        return activate(x, problem.activation, params, problem.dice_eps)

    h = act(first_layer, problem.act_params[0])
    for w, b, params in zip(problem.weights[1:-1], problem.biases[1:-1], problem.act_params[1:]):
        h = act(h @ w.to(dtype).t() + b.to(dtype), params)
    w_out, b_out = problem.weights[-1].to(dtype), problem.biases[-1].to(dtype)
    return (h @ w_out.t()).squeeze(-1) + b_out


def unpack(packed: torch.Tensor, positions, batch: int, length: int) -> torch.Tensor:
    """[N, ...] at the packed positions to dense [B, T, ...], zeros elsewhere."""
    if positions is None:
        return packed.view(batch, length, *packed.shape[1:])
    dense = packed.new_zeros(batch, length, *packed.shape[1:])
    return dense.index_put(positions, packed)


def attention_weights(problem: DINProblem, scores: torch.Tensor, positions) -> torch.Tensor:
    """The weights w [B, C, T] from the packed raw scores [N, C]."""
    batch, length = problem.keys.shape[:2]
    dense = unpack(scores, positions, batch, length)
    return masked_normalize(dense.transpose(1, 2), problem.valid_mask(),
                            problem.normalization, problem.scale)


def torch_din_attention(problem: DINProblem, dice_batch_stats=None):
    """Returns (pooled [B, C, Dv], weights w [B, C, T]) in the compute dtype."""
    dtype = problem.compute_dtype()
    positions = packed_positions(problem)
    scores = packed_scores(problem, positions, dtype, dice_batch_stats)
    weights = attention_weights(problem, scores, positions)
    pooled = weights @ problem.value_tensor.to(dtype)
    return pooled, weights
