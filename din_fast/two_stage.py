"""din_attention_top_k: two-stage attention for long histories (SPEC section 6).

Stage one (din_fast.search) scores every valid history position with a cheap
search scorer and keeps the K best per candidate; stage two is exact DIN over
those K only. Stage two reuses the existing backends unchanged: the selected
keys and values of each (row, candidate) are gathered into a history of their
own, [B * C, K, D], each row with one candidate, and the selection count as
its length; the attention weights come back to their positions, zeros
elsewhere. Everything stage two computes is differentiable as exact DIN is;
the gather routes the gradients of the keys and values to the selected
positions, so every other position gets exactly zero.

DINAttention's two-stage forward and SIM's auxiliary search logits (what
trains the "dot" scorer's projections) are here too.
"""

from __future__ import annotations

import dataclasses

import torch

from .functional import resolve_backend, run_problem
from .problem import DEFAULT_DICE_EPS, OWNER, DINProblem, validate, validating
from .reference import masked_normalize
from .reference_top_k import reference_din_attention_top_k, reference_selection
from .search import (Search, Selection, detached, kernel_unsupported, project, select,
                     validate_search)


def din_attention_top_k(query, keys, lengths=None, *, top_k, search="din", search_params=None,
                        query_categories=None, key_categories=None, weights, biases,
                        activation="sigmoid", activation_params=None, mask=None,
                        normalization=None, scale=1.0, values=None, return_scores=False,
                        backend="auto", dice_eps=DEFAULT_DICE_EPS):
    """Two-stage DIN attention: search the history, attend over the top K.

    Stage one gives every valid position t a search score s1 per candidate
    and keeps the ``top_k`` valid positions with the highest s1 (ties: the
    more recent position, larger t; a row with at most ``top_k`` valid
    positions keeps them all, and the result is exact DIN). Stage two is
    din_attention over the kept positions only: softmax and pooling see
    nothing else, the returned weights are zero at the other positions, and
    so are the gradients there. The selection itself is not differentiable.

    Args:
        query: the candidate items, [B, D] or [B, C, D] (C candidates per row).
        keys: the behaviour history, [B, T, D], in the query's dtype (float32,
            float16, bfloat16; float64 on the torch and reference backends).
        lengths: [B] int32/int64 in [0, T]: positions t < lengths[b] are valid.
        top_k: K, a positive int: how many positions stage two attends to.
        search: the stage-one scorer. "din": the exact DIN score, scale * s
            (TWIN's consistent search; nothing extra to learn). "dot": the
            inner product of learned projections, <P_q q, P_k k> (SIM's soft
            search). "category": 1 where the query's category equals the
            key's, else 0 (SIM's hard search: the K most recent matching
            positions, topped up with the most recent others).
        search_params: for "dot", (query_projection, key_projection), each
            [P, D] float (``nn.Linear`` layout); they get no gradient here
            (see DINAttention.search_logits for how a model trains them).
        query_categories: for "category", the candidates' categories, int32/
            int64 [B] (2-D query) or [B, C].
        key_categories: for "category", the history's categories, int32/int64
            [B, T].
        weights: the DIN unit's weights (stage two's, and the "din"
            search's), in din_attention's layout (``nn.Linear``'s, W_1 [H_1, 4D]).
        biases: one per weight.
        activation: the hidden layers': "sigmoid", "relu", "prelu" or "dice".
        activation_params: PReLU's slopes or Dice's inference statistics, as
            din_attention takes them; None for sigmoid and relu.
        mask: [B, T] bool, True = valid; instead of ``lengths`` (not both).
        normalization: None (raw scores, ``scale * s``) or "softmax" over the
            selected positions.
        scale: multiplies the scores before the normalization.
        values: [B, T, Dv] pooled instead of the keys.
        return_scores: also return the weights.
        backend: "auto", "triton", "torch" or "reference", for both stages: on
            "triton" stage one is the fused search kernel (nothing of size
            [B, C, T] written), on "torch" it scores chunks of positions with
            a running top K.
        dice_eps: Dice's epsilon in 1 / sqrt(var + eps).

    Returns:
        din_attention's: the pooled history [B, Dv] or [B, C, Dv] in the
        keys' dtype; with ``return_scores`` also the weights [B, T] or
        [B, C, T], zero at every position not selected.

    Raises:
        TypeError: as din_attention, and for categories that are not int32
            or int64 tensors.
        ValueError: as din_attention, and for a ``top_k`` that is not a
            positive int, an unknown ``search``, projections that are not two
            float [P, D] tensors of one width, categories of the wrong shape
            or device, search arguments given to another scorer, or
            backend="triton" with a search its kernel cannot run (K over
            1024, projections over 256 wide).
    """
    with validating("din_attention_top_k"):
        problem = validate(query, keys, lengths, weights=weights, biases=biases,
                           activation=activation, activation_params=activation_params,
                           mask=mask, normalization=normalization, scale=scale, values=values,
                           dice_eps=dice_eps, return_scores=return_scores)
        stage_one = validate_search(problem, top_k, search, search_params, query_categories,
                                    key_categories)
        if resolve_backend(backend, problem) == "reference":
            pooled, scores = reference_din_attention_top_k(problem, stage_one)
            pooled, scores = problem.shape_output(pooled, scores)
        else:
            selection = selected(problem, stage_one, backend)
            rows = gathered(problem, selection)
            pooled, scores = run_problem(rows, resolve_backend(backend, rows),
                                         need_scores=return_scores)
            pooled, scores = spread(problem, selection, pooled, scores)
    return (pooled, scores) if return_scores else pooled


def selected(problem: DINProblem, search: Search, backend: str) -> Selection:
    """Stage one on ``backend`` (see search_backend): the literal selection on
    the reference backend, else search.select."""
    concrete = search_backend(backend, problem, search)
    if concrete == "reference":
        return reference_selection(*detached(problem, search))
    return select(problem, search, concrete)


def search_backend(backend: str, problem: DINProblem, search: Search) -> str:
    """The concrete backend of stage one: ``backend`` resolved as
    din_attention resolves it, then torch where "auto" chose triton and the
    fused search cannot run this one (an explicit triton raises why). While
    tracing (torch.compile, torch.export) the torch search, which traces as
    aten ops; stage two keeps its backend."""
    concrete = resolve_backend(backend, problem)
    if concrete != "triton":
        return concrete
    if torch.compiler.is_compiling():
        return "torch"
    reason = kernel_unsupported(problem, search)
    if reason is None:
        return "triton"
    if backend == "auto":
        return "torch"
    raise ValueError(f"{OWNER}: backend='triton' cannot run this search: {reason}")


def gathered(problem: DINProblem, selection: Selection) -> DINProblem:
    """Stage two's problem: row b * C + c holds candidate c of row b as its
    one (2-D) query and its selected keys and values as its history, the
    selection count as its length ([B * C, K, D]; the fillers past each
    count are padding, never read)."""
    batch, candidates, embed_dim = problem.query.shape
    rows = torch.arange(batch, device=problem.keys.device)[:, None, None]
    positions = selection.positions

    def take(history):
        return None if history is None else history[rows, positions].flatten(0, 1)
    return dataclasses.replace(
        problem, query=problem.query.reshape(batch * candidates, 1, embed_dim),
        keys=take(problem.keys), values=take(problem.values),
        lengths=selection.counts.flatten(), mask=None, squeeze_candidates=True)


def spread(problem: DINProblem, selection: Selection, pooled: torch.Tensor, scores):
    """Stage two's outputs (pooled [B * C, Dv], weights [B * C, K] or None)
    in the problem's shapes: pooled [B, C, Dv] and weights [B, C, T], zero at
    the positions not selected (a 2-D query drops the C axis)."""
    batch, candidates = problem.query.shape[:2]
    pooled = pooled.reshape(batch, candidates, pooled.shape[-1])
    if scores is not None:
        kept = torch.where(selection.slot_valid(),
                           scores.reshape(selection.positions.shape), 0)
        scores = kept.new_zeros(batch, candidates, problem.keys.shape[1]).scatter_add(
            -1, selection.positions, kept)
    return problem.shape_output(pooled, scores)


def module_forward(layer, query, keys, lengths, mask, values, query_categories,
                   key_categories):
    """DINAttention.forward with ``top_k`` set: stage one on the layer's
    backend (Dice in its inference form, with the running statistics), stage
    two as the layer's exact forward would run on the gathered histories
    (training-mode Dice takes its batch statistics over the selected
    positions)."""
    kwargs = layer._functional_kwargs(mask, values)
    with validating("DINAttention"):
        problem = validate(query, keys, lengths, **kwargs)
        stage_one = validate_search(problem, layer.top_k, layer.search, layer.search_params(),
                                    query_categories, key_categories)
        selection = selected(problem, stage_one, layer.backend)
        rows = gathered(problem, selection)
        if layer.activation == "dice" and layer.training:
            result = layer._forward_dice_training(
                rows.query[:, 0], rows.keys, rows.lengths,
                dict(kwargs, mask=None, values=rows.values))
            pooled, scores = result if layer.return_scores else (result, None)
        else:
            pooled, scores = run_problem(rows, resolve_backend(layer.backend, rows),
                                         need_scores=layer.return_scores)
        pooled, scores = spread(problem, selection, pooled, scores)
    return (pooled, scores) if layer.return_scores else pooled


def search_logits(layer, query, keys, lengths=None, mask=None):
    """SIM's auxiliary logits of the "dot" search: the softmax of the search
    scores over all valid positions pools the scores themselves,
    ``sum_t softmax_t(s1) * s1[t]``, one logit per candidate ([B] or [B, C]).

    A CTR loss on them (din_fast.DIN.auxiliary_loss) teaches the projections
    to score high the behaviours that predict a click, over the whole
    history, which stage one's selection cannot: it is not differentiable.
    The query and keys are detached, so this loss trains the projections
    alone and stage two keeps exact DIN's gradients.
    """
    kwargs = layer._functional_kwargs(mask)
    with validating("DINAttention.search_logits"):
        problem = validate(query.detach(), keys.detach(), lengths, **kwargs)
    dtype = problem.compute_dtype()
    valid = problem.valid_mask()
    projected_query, projected_keys = project(problem.query, problem.without_padding(problem.keys),
                                              layer.search_params(), dtype)
    scores = projected_query @ projected_keys.transpose(1, 2)            # [B, C, T]
    weights = masked_normalize(scores, valid, "softmax", 1.0)
    logits = (weights * torch.where(valid[:, None, :], scores, 0)).sum(-1)
    return logits.squeeze(1) if problem.squeeze_candidates else logits
