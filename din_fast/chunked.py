"""The torch backend's forward and backward, block by block, in bounded memory.

The forward walks the row groups of din_fast.chunking: per block of pairs it
scores the keys with the activation unit (din_fast.activation_unit; its
first layer folded or shared, as the group's plan says) and pools them
at once, keeping per (row, candidate) only the pooled sum and, for softmax,
the running max and normalizer (the online softmax of FlashAttention: a
new span's larger max rescales what was pooled so far). Nothing of size
B * C * T is kept, unless the weights are returned.

For training, the forward may also keep each block's scores and hidden
activations (KeptActivations: one flat buffer, bounded by
chunking.kept_activations_bytes, all or nothing); the backward reads them
back, block by block in the same order, or else recomputes them from the
keys, with the same arithmetic (the gradients are the same to the bit).
Per block it runs the chain rule: the weights w from the max and the
normalizer, and for softmax the row term
sum_t w[t] dL/dw[t] = dL/dpooled . pooled (+ the returned weights' own
gradient), known before any block is seen.

Peak memory beyond the inputs and outputs: the per-(row, candidate)
statistics, the gradients' accumulators (each the size of its input), one
block (its size set by chunking.working_set) and the kept activations, if
any.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .activation_unit import ActivationUnit, FoldedFirstLayer, SharedFirstLayer, UnitGrads
from .chunking import History, RowGroup, UnitSize, in_dtype, kept_size, kept_slot, kept_widths
from .problem import JaggedDINProblem


class _Pooling:
    """One block's running pooled sum [G, Cc, Dv] over its spans: raw
    weights for normalization=None, an online softmax otherwise. The first
    span starts the sums (no zeros to add to: most groups have one span)."""

    def __init__(self, softmax: bool):
        self.softmax = softmax
        self.total = self.max = self.sum = None

    def add(self, scores: Tensor, values: Tensor, invalid: Optional[Tensor]) -> None:
        """Pool a span: scaled scores [G, span, Cc] (zero at the ``invalid``
        slots, Block.invalid), values [G, span, Dv]."""
        if not self.softmax:
            if self.total is None:
                self.total = torch.bmm(scores.transpose(1, 2), values)
            else:
                self.total.baddbmm_(scores.transpose(1, 2), values)
            return
        if invalid is not None:
            scores = scores.masked_fill(invalid, float("-inf"))
        # Every row of a group has a valid slot in each of its spans (a group
        # of several rows has one span from position 0; a single row's spans
        # lie within its length), so the new max is finite.
        if self.total is None:
            self.max = scores.amax(1)
            weights = torch.sub(scores, self.max[:, None, :]).exp_()
            self.sum = weights.sum(1)
            self.total = torch.bmm(weights.transpose(1, 2), values)
            return
        new_max = torch.maximum(self.max, scores.amax(1))
        weights = torch.exp(scores - new_max[:, None, :])
        factor = torch.exp(self.max - new_max)
        self.sum.mul_(factor).add_(weights.sum(1))
        self.total.mul_(factor[..., None]).baddbmm_(weights.transpose(1, 2), values)
        self.max = new_max

    def result(self):
        """(pooled [G, Cc, Dv], max, normalizer [G, Cc] or None)."""
        if not self.softmax:
            return self.total, None, None
        return self.total / self.sum[..., None], self.max, self.sum


def _layout(problem):
    """(compute dtype, query [B, C, D], history, values (the history itself
    when the problem has none), History)."""
    keys = getattr(problem, problem.HISTORY)
    values = keys if problem.values is None else problem.values
    return problem.compute_dtype(), problem.query, keys, values, History(problem)


def _groups(problem, history: History, dtype: torch.dtype):
    return history.groups(problem.query.shape[1], UnitSize.of(problem, dtype))


def _first_layer(unit: ActivationUnit, group: RowGroup, query: Tensor):
    """The first layer of a chunk of the group's candidates, query [G, Cc, D],
    in the form its plan chose."""
    return (FoldedFirstLayer if group.folded else SharedFirstLayer)(unit, query)


def _rows(group: RowGroup):
    """The group's rows as an index of [B, ...] tensors (a slice where consecutive)."""
    if group.first_row is not None:
        return slice(group.first_row, group.first_row + len(group.rows))
    return group.rows


def _take(tensor: Tensor, rows, chunk: slice) -> Tensor:
    """tensor[rows, chunk] of a [B, C, ...] tensor, ``rows`` from _rows.
    Scattered rows come with every candidate (plan splits only single rows
    into candidate chunks): index_select then, a row copy where advanced
    indexing pays an iterator per element."""
    if isinstance(rows, slice):
        return tensor[rows, chunk]
    taken = tensor.index_select(0, rows)
    return taken if chunk.stop - chunk.start == tensor.shape[1] else taken[:, chunk]


def _put(tensor: Tensor, rows, chunk: slice, value: Tensor) -> None:
    """tensor[rows, chunk] = value, as _take reads it."""
    if isinstance(rows, slice) or chunk.stop - chunk.start != tensor.shape[1]:
        tensor[rows, chunk] = value
    else:
        tensor.index_copy_(0, rows, value)


def _scaled(s: Tensor, scale: float) -> Tensor:
    """scale * s, in place (nothing to do for the default scale of 1)."""
    return s if scale == 1 else s.mul_(scale)


def _block_scores(unit: ActivationUnit, keys: Tensor, first_layer, scale: float,
                  invalid: Optional[Tensor], kept: Optional[list] = None,
                  into: Optional[tuple] = None) -> Tensor:
    """The scaled scores [G, span, Cc] of a block's keys [G, span, D], 0 at
    the ``invalid`` slots (Block.invalid); ``kept`` and ``into`` as
    ActivationUnit.scores takes them."""
    s = _scaled(unit.scores(keys, first_layer, kept, into), scale)
    if invalid is not None:
        s.masked_fill_(invalid, 0)
    return s


class KeptActivations:
    """The forward's activations kept for the backward: one flat buffer that
    the blocks fill in plan order, per block its scores [G, span, Cc] (0 at
    the invalid slots), then per hidden layer its pre-activation (where the
    derivative needs it) and its activation [pairs, H], each in an aligned
    slot (chunking.kept_slot) and written there by the layers themselves
    (no copies); the backward reads them back in the same order. The
    forward zeroes the rest (the slots' alignment, the room the plan leaves),
    so that the buffer, an op's output, is the same on every run."""

    def __init__(self, buffer: Tensor, unit: ActivationUnit, writing: bool):
        self.buffer = buffer
        self.unit = unit
        self.writing = writing
        self.offset = 0

    @classmethod
    def of(cls, buffer: Optional[Tensor], groups, candidates: int, unit: ActivationUnit,
           writing: bool = False) -> Optional["KeptActivations"]:
        """Those in ``buffer`` (chunking.kept_bound elements; the forward's
        when ``writing``), or None where it is absent or empty, or the plan
        ``groups`` needs more room (blocks of a few pairs, under a small
        working set): then nothing is kept and the backward, which finds the
        same, recomputes."""
        if buffer is None or buffer.numel() == 0:
            return None
        widths = kept_widths(unit.hidden, unit.activation)
        if kept_size(groups, candidates, widths, buffer.element_size()) <= buffer.numel():
            return cls(buffer, unit, writing)
        if writing:
            buffer.zero_()
        return None

    def _next(self, shape) -> Tensor:
        size = math.prod(shape)
        view = self.buffer[self.offset:self.offset + size].view(shape)
        end = self.offset + kept_slot(size, self.buffer.element_size())
        if self.writing:
            self.buffer[self.offset + size:end].zero_()
        self.offset = end
        return view

    def finish(self) -> None:
        """Zero the room after the last block (the forward's)."""
        self.buffer[self.offset:].zero_()

    def block(self, shape):
        """The views of the next block's (scores ``shape``, [(pre-activation
        or None, activation) per hidden layer]): ActivationUnit.scores's
        ``into`` in the forward, ``kept`` in the backward."""
        scores = self._next(shape)
        pairs = scores.numel()
        kept = [(self._next((pairs, width)) if self.unit.keeps_inputs else None,
                 self._next((pairs, width))) for width in self.unit.hidden]
        return scores, kept


def forward(problem, need_scores: bool, kept: Optional[Tensor] = None):
    """(pooled [B, C, Dv], w ([B, C, T] padded, [L, C] jagged) or None,
    row_max [B, C], row_sum [B, C]) in the compute dtype, of a DINProblem or
    a JaggedDINProblem. For softmax, row_max is the max over the valid
    positions of scale * s and row_sum the sum of exp(scale * s - row_max)
    (both 0 for a row without valid positions), as the fused kernels keep
    them; for normalization=None both are None. ``kept``, a flat buffer in
    the compute dtype of at least kept_widths elements per padded pair
    (rows padded to T, or to max_len jagged), receives the activations for
    the backward (KeptActivations)."""
    dtype, query, keys, values, history = _layout(problem)
    batch, candidates = query.shape[:2]
    softmax = problem.normalization == "softmax"
    unit = ActivationUnit(problem, dtype)
    pooled = query.new_zeros(batch, candidates, values.shape[-1], dtype=dtype)
    row_max = query.new_zeros(batch, candidates, dtype=dtype) if softmax else None
    row_sum = torch.zeros_like(row_max) if softmax else None
    scores = query.new_zeros(_scores_shape(problem), dtype=dtype) if need_scores else None
    groups = _groups(problem, history, dtype)
    keeping = KeptActivations.of(kept, groups, candidates, unit, writing=True)
    for group in groups:
        rows = _rows(group)
        blocks = [history.block(group, span) for span in group.spans()]
        for chunk in group.candidate_chunks(candidates):
            first_layer = _first_layer(unit, group, in_dtype(_take(query, rows, chunk), dtype))
            pooling = _Pooling(softmax)
            for block in blocks:
                k = history.gather(keys, block, dtype)
                v = k if values is keys else history.gather(values, block, dtype)
                into = (None if keeping is None
                        else keeping.block((*k.shape[:2], chunk.stop - chunk.start)))
                s = _block_scores(unit, k, first_layer, problem.scale, block.invalid, into=into)
                if scores is not None:
                    history.put_scores(scores, block, chunk, s)
                pooling.add(s, v, block.invalid)
            block_pooled, block_max, block_sum = pooling.result()
            _put(pooled, rows, chunk, block_pooled)
            if softmax:
                _put(row_max, rows, chunk, block_max)
                _put(row_sum, rows, chunk, block_sum)
    if keeping is not None:
        keeping.finish()
    if scores is not None and softmax:
        _normalize(problem, scores, row_max, row_sum)
    return pooled, scores, row_max, row_sum


def _scores_shape(problem) -> tuple:
    if isinstance(problem, JaggedDINProblem):
        return (problem.keys_values.shape[0], problem.query.shape[1])
    return (problem.keys.shape[0], problem.query.shape[1], problem.keys.shape[1])


def _per_position(problem, per_row: Tensor) -> Tensor:
    """Row statistics [B, C] laid out against the scores: [B, C, 1] padded,
    [L, C] jagged."""
    if isinstance(problem, JaggedDINProblem):
        return per_row[problem.row_ids()]
    return per_row[..., None]


def _normalize(problem, scores: Tensor, row_max: Tensor, row_sum: Tensor) -> None:
    """Softmax weights, in place, from the scaled scores and the row statistics;
    0 at the padding."""
    normalizer = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
    scores.sub_(_per_position(problem, row_max)).exp_()
    scores.div_(_per_position(problem, normalizer))
    if not isinstance(problem, JaggedDINProblem):
        scores.masked_fill_(~problem.valid_mask()[:, None, :], 0)


def _row_term(problem, grad_pooled: Tensor, pooled: Tensor, w: Optional[Tensor],
              grad_w: Optional[Tensor]) -> Tensor:
    """sum_t w[t] * dL/dw[t] over each row's valid positions, [B, C], where
    dL/dw[t] = dL/dpooled . v[t] (+ the weights' own gradient)."""
    term = (grad_pooled * pooled).sum(-1)
    if grad_w is None:
        return term
    products = w * grad_w
    if isinstance(problem, JaggedDINProblem):
        return term.index_add_(0, problem.row_ids(), products)
    # w is 0 at the padding, grad_w maybe not finite there: a select.
    products = torch.where(problem.valid_mask()[:, None, :], products, 0)
    return term + products.sum(-1)


class _Softmax:
    """What the backward of softmax needs per (row, candidate): the forward's
    max and normalizer, and the row term sum_t w[t] dL/dw[t]."""

    def __init__(self, problem, grad_pooled: Tensor, grad_scores: Optional[Tensor], saved):
        if saved:
            pooled, self.max, row_sum, *rest = saved
            w = rest[0] if rest else None
        else:
            pooled, w, self.max, row_sum = forward(problem, grad_scores is not None)
        self.normalizer = torch.where(row_sum > 0, row_sum, torch.ones_like(row_sum))
        self.term = _row_term(problem, grad_pooled, pooled, w, grad_scores)

    def block(self, rows, chunk: slice, whole_rows: bool):
        """(max, normalizer, row term or None where the block holds whole rows),
        each [G, 1, Cc]."""
        term = None if whole_rows else _take(self.term, rows, chunk)[:, None, :]
        return (_take(self.max, rows, chunk)[:, None, :],
                _take(self.normalizer, rows, chunk)[:, None, :], term)


def _score_gradients(s: Tensor, grad_w: Tensor, invalid: Optional[Tensor], scale: float,
                     softmax: Optional[tuple]):
    """(w, dL/ds) of a block, both [G, span, Cc] and 0 at the ``invalid``
    slots, from its scaled scores ``s`` (0 at those slots; left as they
    are: they may be the kept ones) and dL/dw (overwritten);
    ``softmax`` is _Softmax.block's, or None for normalization=None."""
    if softmax is None:
        grad_s = _scaled(grad_w, scale)
        if invalid is not None:
            grad_s.masked_fill_(invalid, 0)
        return s, grad_s
    row_max, normalizer, term = softmax
    w = torch.sub(s, row_max).exp_().div_(normalizer)
    if invalid is not None:
        w.masked_fill_(invalid, 0)
    if term is None:
        # The row term from the very weights used here: then sum_t dL/ds[t]
        # cancels to rounding (the biases' gradients are such sums);
        # dL/dpooled . pooled, from the forward's rounding, would leave ~1e-7.
        term = (w * grad_w).sum(1, keepdim=True)
    return w, _scaled(grad_w.sub_(term).mul_(w), scale)


def backward(problem, grad_pooled: Tensor, grad_scores: Optional[Tensor], saved=()):
    """The gradients of every input from dL/dpooled [B, C, Dv] (and dL/dw,
    [B, C, T] padded or [L, C] jagged): (dq, d history, dv or None when the
    values are the keys, dweights, dbiases, dact_params per layer), each in
    its input's dtype.

    ``saved`` is what the forward op kept, in the compute dtype: the kept
    activations (forward's ``kept``; empty where it kept none: then each
    block recomputes them), then for softmax [pooled, row_max, row_sum] and
    w when it returned the weights; or empty: then for softmax the forward
    runs first (normalization=None needs nothing more).
    """
    dtype, query, keys, values, history = _layout(problem)
    candidates = query.shape[1]
    grad_pooled = grad_pooled.to(dtype)
    # Contiguous (a loss's gradient may be an expanded scalar): blocks index it flat.
    grad_scores = None if grad_scores is None else grad_scores.to(dtype).contiguous()
    softmax = (_Softmax(problem, grad_pooled, grad_scores, saved[1:])
               if problem.normalization == "softmax" else None)
    unit = ActivationUnit(problem, dtype)
    grads = UnitGrads(unit)
    grad_query = torch.zeros(query.shape, dtype=dtype, device=query.device)
    grad_keys = torch.zeros(keys.shape, dtype=dtype, device=keys.device)
    grad_values = (grad_keys if values is keys
                   else torch.zeros(values.shape, dtype=dtype, device=values.device))
    groups = _groups(problem, history, dtype)
    activations = KeptActivations.of(saved[0] if saved else None, groups, candidates, unit)
    for group in groups:
        rows = _rows(group)
        blocks = [history.block(group, span) for span in group.spans()]
        for chunk in group.candidate_chunks(candidates):
            first_layer = _first_layer(unit, group, in_dtype(_take(query, rows, chunk), dtype))
            grad_out = _take(grad_pooled, rows, chunk)                   # [G, Cc, Dv]
            stats = None if softmax is None else softmax.block(rows, chunk, len(blocks) == 1)
            for block in blocks:
                k = history.gather(keys, block, dtype)
                v = k if values is keys else history.gather(values, block, dtype)
                if activations is None:
                    kept = []
                    s = _block_scores(unit, k, first_layer, problem.scale, block.invalid, kept)
                else:
                    s, kept = activations.block((*k.shape[:2], chunk.stop - chunk.start))
                grad_w = torch.bmm(v, grad_out.transpose(1, 2))          # [G, span, Cc]
                if grad_scores is not None:
                    grad_w += history.take_scores(grad_scores, block, chunk, dtype)
                w, grad_s = _score_gradients(s, grad_w, block.invalid, problem.scale, stats)
                grad_z = unit.backward(grad_s, kept, grads)             # [G, span, Cc, H1]
                grad_k = first_layer.backward(k, grad_z, grads)
                # dL/dv[t] = sum_c w[c, t] dL/dpooled[c]: into d keys in place
                # where the values are the keys (a product of inner size Cc).
                if values is keys:
                    grad_k.baddbmm_(w, grad_out)
                else:
                    history.add(grad_values, block, torch.bmm(w, grad_out))
                del w, s, grad_w, grad_s, kept
                history.add(grad_keys, block, grad_k)
            _put(grad_query, rows, chunk, first_layer.finish(grads))
    return (
        grad_query.to(query.dtype), grad_keys.to(keys.dtype),
        None if values is keys else grad_values.to(values.dtype),
        [d.to(t.dtype) for d, t in zip(grads.weights(), problem.weights)],
        [d.to(t.dtype) for d, t in zip(grads.biases(), problem.biases)],
        [tuple(d.to(p.dtype) for d, p in zip(layer, params))
         for layer, params in zip(grads.act_params, problem.act_params)],
    )
