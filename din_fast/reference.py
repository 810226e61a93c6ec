"""The literal DIN activation unit (din_attention's formula, written plainly): the test oracle.

Written for clarity, not speed: it builds the [B, C, T, 4D] concat and runs the
MLP on every position, the padding zeroed first (never read), then masks. Runs on any device and
dtype; half-precision inputs are computed in float32.
"""

from __future__ import annotations

import torch

from .activations import activate
from .problem import DINProblem, JaggedDINProblem


def masked_normalize(scores: torch.Tensor, valid: torch.Tensor, normalization, scale: float):
    """Attention weights from raw scores [B, C, T] and the valid mask [B, T].

    softmax: over the valid positions only; a row with none gets all zeros
    (not NaN, not a mean of the padding).
    """
    valid = valid[:, None, :]
    scaled = scores * scale
    if normalization is None:
        return torch.where(valid, scaled, torch.zeros_like(scaled))
    if scaled.shape[-1] == 0:  # no history at all: nothing to take a max over
        return scaled
    masked = torch.where(valid, scaled, torch.full_like(scaled, float("-inf")))
    row_max = masked.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(masked - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    return exp / torch.where(denom > 0, denom, torch.ones_like(denom))


def reference_din_attention(problem: DINProblem):
    """Returns (pooled [B, C, Dv], weights w [B, C, T]) in the compute dtype."""
    dtype = problem.compute_dtype()
    q = problem.query.to(dtype)
    k = problem.without_padding(problem.keys.to(dtype))
    v = problem.without_padding(problem.value_tensor.to(dtype))
    length = k.shape[1]
    candidates = q.shape[1]

    q_b = q[:, :, None, :].expand(-1, -1, length, -1)          # [B, C, T, D]
    k_b = k[:, None, :, :].expand(-1, candidates, -1, -1)      # [B, C, T, D]
    h = torch.cat([q_b, k_b, q_b - k_b, q_b * k_b], dim=-1)   # [B, C, T, 4D]
    for w, b, params in zip(problem.weights[:-1], problem.biases[:-1], problem.act_params):
        h = h @ w.to(dtype).t() + b.to(dtype)
        h = activate(h, problem.activation, tuple(p.to(dtype) for p in params),
                      problem.dice_eps)
    scores = (h @ problem.weights[-1].to(dtype).t() + problem.biases[-1].to(dtype)).squeeze(-1)

    weights = masked_normalize(scores, problem.valid_mask(), problem.normalization, problem.scale)
    pooled = weights @ v                                        # [B, C, Dv]
    return pooled, weights


def reference_din_attention_jagged(problem: JaggedDINProblem):
    """The oracle on jagged input: pad to the longest row, run the reference,
    unpad the weights. Returns (pooled [B, C, Dv], w [L, C])."""
    # max_len is only a bound (it may be huge): pad to the longest row there is.
    lengths = problem.lengths()
    length = int(lengths.max()) if lengths.numel() else 0
    padded = DINProblem(
        query=problem.query, keys=problem.padded(problem.keys_values, length),
        values=None if problem.values is None else problem.padded(problem.values, length),
        lengths=lengths, mask=None, weights=problem.weights, biases=problem.biases,
        activation=problem.activation, act_params=problem.act_params,
        normalization=problem.normalization, scale=problem.scale, dice_eps=problem.dice_eps,
        squeeze_candidates=problem.squeeze_candidates,
    )
    pooled, weights = reference_din_attention(padded)
    rows, cols = problem.padded_positions()
    return pooled, weights[rows, :, cols]


def run(problem):
    """(pooled [B, C, Dv], w) of a DINProblem (w [B, C, T]) or a
    JaggedDINProblem (w [L, C]), in the compute dtype."""
    if isinstance(problem, JaggedDINProblem):
        return reference_din_attention_jagged(problem)
    return reference_din_attention(problem)
