"""Two-stage attention written for clarity: the oracle of din_attention_top_k.

For each row b and candidate c, literally (SPEC section 6): score every valid
position with the search scorer, rank the positions by (score, position) from
the highest, keep the first K, and run the reference DIN (din_fast.reference)
on the kept positions alone, gathered into a history of their own; their
weights go back to their positions, zeros elsewhere. Loops over rows and
candidates in Python: slow, and meant to be read.
"""

from __future__ import annotations

import math

import torch

from .problem import DINProblem
from .reference import reference_din_attention
from .search import Search, Selection


def reference_search_scores(problem: DINProblem, search: Search) -> torch.Tensor:
    """s1 [B, C, T] of every (row, candidate, position), in the compute dtype."""
    dtype = problem.compute_dtype()
    query, keys = problem.query.to(dtype), problem.keys.to(dtype)
    if search.scorer == "din":
        # The reference's weights without normalization and with every position
        # valid are scale * s.
        everything = DINProblem(query=query, keys=keys, values=None, lengths=None, mask=None,
                                weights=problem.weights, biases=problem.biases,
                                activation=problem.activation, act_params=problem.act_params,
                                normalization=None, scale=problem.scale,
                                dice_eps=problem.dice_eps, squeeze_candidates=False)
        return reference_din_attention(everything)[1]
    if search.scorer == "dot":
        query_projection, key_projection = (p.to(dtype) for p in search.projections)
        return torch.einsum("bcp,btp->bct", query @ query_projection.t(),
                            keys @ key_projection.t())
    query_categories, key_categories = search.categories
    return (query_categories[:, :, None] == key_categories[:, None, :]).to(dtype)


def ranked_positions(problem: DINProblem, search: Search) -> list:
    """For every row b and candidate c, the selected positions, ascending: [[[t, ...]]]."""
    with torch.no_grad():
        scores = reference_search_scores(problem, search)
    valid = problem.valid_mask()
    batch, candidates, length = scores.shape
    selected = []
    for b in range(batch):
        row = []
        for c in range(candidates):
            def rank(t):
                score = float(scores[b, c, t])
                return (-math.inf if math.isnan(score) else score, t)
            ranked = sorted((t for t in range(length) if valid[b, t]), key=rank, reverse=True)
            row.append(sorted(ranked[:search.top_k]))
        selected.append(row)
    return selected


def reference_selection(problem: DINProblem, search: Search) -> Selection:
    """The selection as a Selection (the positions past each count are 0)."""
    batch, length = problem.keys.shape[:2]
    candidates = problem.query.shape[1]
    width = min(search.top_k, length)
    positions = torch.zeros(batch, candidates, width, dtype=torch.int64)
    counts = torch.zeros(batch, candidates, dtype=torch.int64)
    for b, row in enumerate(ranked_positions(problem, search)):
        for c, chosen in enumerate(row):
            positions[b, c, :len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
            counts[b, c] = len(chosen)
    device = problem.keys.device
    return Selection(positions.to(device), counts.to(device))


def reference_din_attention_top_k(problem: DINProblem, search: Search):
    """(pooled [B, C, Dv], w [B, C, T]) in the compute dtype: for each
    candidate, the reference DIN over its selected positions only."""
    batch, length = problem.keys.shape[:2]
    candidates = problem.query.shape[1]
    values = problem.value_tensor
    pooled, weights = [], []
    for b, row in enumerate(ranked_positions(problem, search)):
        for c, chosen in enumerate(row):
            chosen = torch.tensor(chosen, dtype=torch.int64, device=problem.keys.device)
            alone = DINProblem(
                query=problem.query[b:b + 1, c:c + 1], keys=problem.keys[b, chosen][None],
                values=values[b, chosen][None], lengths=None, mask=None,
                weights=problem.weights, biases=problem.biases,
                activation=problem.activation, act_params=problem.act_params,
                normalization=problem.normalization, scale=problem.scale,
                dice_eps=problem.dice_eps, squeeze_candidates=False)
            out, w = reference_din_attention(alone)
            pooled.append(out[0, 0])
            weights.append(w.new_zeros(length).index_put((chosen,), w[0, 0]))
    if not pooled:
        # No (row, candidate) pair at all: exact DIN's results are as empty,
        # and they come from the inputs, so that a backward reaches them
        # (zero gradients) as it does on the other backends.
        return reference_din_attention(problem)
    return (torch.stack(pooled).view(batch, candidates, -1),
            torch.stack(weights).view(batch, candidates, length))
