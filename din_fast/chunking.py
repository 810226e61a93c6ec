"""How the torch backend walks the (row, candidate, position) triples of a
problem: in blocks whose working set fits a budget, so that its memory never
grows with B * C * T.

A *row group* is a set of rows taken together: either several whole rows
(short histories: a training batch), padded to the longest of them, or one
row whose history times its candidates exceeds the budget, split into
candidate chunks and position spans (long histories, many candidates: a
serving request). Rows are taken longest first, so that a group's rows have
nearly equal lengths and padding them to one length wastes little work;
rows with no valid position are skipped (they pool to zero). A group's
rows decide the form of its first layer (din_fast.activation_unit): folded
per candidate where they are long enough to pay for the fold, shared
otherwise; its blocks are sized to what that form holds (UnitSize.footprint),
the folded M of their candidates included.

``History`` finds row b's j-th valid position in the history tensors, for
every masking (none, lengths, a mask, jagged offsets): it gathers a block's
keys and values as [rows, span, D] and adds a block's gradients back into
tensors shaped like the history. A slot past its row's count (the padding
of a group) reads the row's last valid position instead: real, finite
data, whatever the padding of the input holds, so that a masked weight of 0
times it is 0 (0 * NaN would not be), and a gradient of 0 added there
changes nothing.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from .activations import derivative_needs_input
from .problem import JaggedDINProblem

# The default working set of one block (its activations, the folded M of its
# candidates, its gathered keys and values, their gradients), by device.
# CPU: 4 MiB is far under any memory limit, and measured on a Zen 4 core
# (1 MiB L2, 32 MiB shared L3) at least as fast as 2, 6, 8 and 16 MiB at
# both the training and the serving shape: smaller blocks pay more Python
# and dispatch per pair, larger ones leave the caches. CUDA: a block is some
# twelve kernel launches, so small blocks leave the GPU waiting on the host;
# 256 MiB is a guess, not yet measured on a GPU (issue #24 measures it).
CPU_WORKING_SET_BYTES = 4 << 20
CUDA_WORKING_SET_BYTES = 256 << 20
# A span of one row's positions is at least this long (when the row has that
# many and the budget holds it with one candidate), so that the first layer's
# product keeps a matrix shape (spans of a few positions would turn it into
# matrix-vector products) and the candidate chunk's M stays small. Measured
# at the serving shape on a Zen 4 core: spans of 256 with 12 candidates
# about 6% faster than spans of 64 with 40, within the same budget.
MIN_SPAN = 256
# What UnitSize.folds weighs, in multiply-adds of a cache-resident matrix
# product: FOLD_COST per element of a candidate's folded M (built, then read
# by products with few positions per row, in the backward summed twice
# more), PAIR_COST per element of the shared form's per-pair vectors (q * k
# and, in the backward, its gradient's products with q and k). Fitted to
# where the two forms cross, forward and backward, on one Zen 4 core
# (float32, measured interleaved on a loaded machine): rows of about 20
# positions with one candidate at D = 64, hidden 80-40, at D = 32,
# hidden 200-80 and at D = 128, hidden 80-40 (the rule folds from 21, 23 and
# 21), about 85 with 16 candidates (the rule: from 92), and no difference
# beyond the noise from 64 to 128 positions with 64 candidates. The
# one-candidate crossing does not move with H1: a single cost per element
# (64 for both, the rule before) put it at 36 for H1 = 80 and 49 for
# H1 = 200, where the fold was already 10-20% faster.
FOLD_COST = 24
PAIR_COST = 16

# What the training forward may keep for its backward (din_fast.chunked): each
# block's scores and the hidden activations the unit's backward reads, so that
# the backward does not score every pair a second time (that recompute made
# forward + backward about 1.2x slower at the training shape, B = 1024,
# T = 100, hidden 80-40, measured back to back: 121 floats a pair, a 50 MB
# bound, a peak of 77 MB against 30 MB without). Kept all or nothing, as the upper bound from the shapes alone
# (kept_widths per padded (row, candidate, position) slot) fits: so memory
# stays bounded whatever B * C * T, and a traced graph knows the size.
# DIN_FAST_KEEP_ACTIVATIONS_MB in the environment overrides it (0: always
# recompute).
KEPT_ACTIVATIONS_BYTES = 64 << 20
KEEP_ACTIVATIONS_ENV = "DIN_FAST_KEEP_ACTIVATIONS_MB"
# Each kept tensor starts at this alignment, as the CPU allocator's tensors
# do (64 bytes): the products then round as on the tensors they replace.
KEPT_ALIGNMENT_BYTES = 64

_budget: List[Optional[int]] = [None]     # working_set's override, else by device


def in_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``: itself where it is already (Tensor.to's
    argument parsing alone costs as much as a small op, once per block)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@contextlib.contextmanager
def working_set(nbytes: int):
    """Inside ``with working_set(nbytes):`` the torch backend sizes its blocks
    to ``nbytes`` of working set on every device (the tests force blocks of
    one pair this way; a process may trade memory for fewer, larger products).
    A backward run outside the budget its forward ran under recomputes the
    activations (the kept ones follow the forward's blocks)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"working_set: `nbytes` must be a positive int; got {nbytes!r}")
    previous = _budget[0]
    _budget[0] = nbytes
    try:
        yield
    finally:
        _budget[0] = previous


def working_set_bytes(device: torch.device) -> int:
    """The working set of one block on ``device``: working_set's, else the default."""
    if _budget[0] is not None:
        return _budget[0]
    return CUDA_WORKING_SET_BYTES if device.type == "cuda" else CPU_WORKING_SET_BYTES


def kept_activations_bytes() -> int:
    """What the forward may keep for the backward, in bytes:
    DIN_FAST_KEEP_ACTIVATIONS_MB (MiB) where set, else KEPT_ACTIVATIONS_BYTES."""
    value = os.environ.get(KEEP_ACTIVATIONS_ENV)
    if value is None or value.strip() == "":
        return KEPT_ACTIVATIONS_BYTES
    if not value.strip().isdigit():
        raise ValueError(f"din_attention: environment variable {KEEP_ACTIVATIONS_ENV} must be "
                         f"a whole number of MiB >= 0 (0: the backward recomputes the "
                         f"activations); got {value!r}")
    return int(value) << 20


def kept_widths(hidden, activation: str) -> List[int]:
    """The widths of what is kept per (row, candidate, position) pair, in the
    order of a block's slots: the score, then per hidden layer its
    pre-activation where the derivative needs it (prelu, dice) and its
    activation."""
    per_layer = 2 if derivative_needs_input(activation) else 1
    return [1] + [width for width in hidden for _ in range(per_layer)]


def kept_slot(elements: int, element_size: int) -> int:
    """The room one kept tensor of ``elements`` takes: rounded up to
    KEPT_ALIGNMENT_BYTES, so that every one starts aligned as a new tensor
    would (BLAS takes other paths, other roundings, for other alignments)."""
    step = max(1, KEPT_ALIGNMENT_BYTES // element_size)
    return -(-elements // step) * step


def kept_bound(batch: int, candidates: int, length: int, widths: List[int],
               element_size: int) -> int:
    """The kept activations' room, from the shapes alone: every (row,
    candidate, position) slot of rows padded to ``length`` (no block's rows
    are longer), and the alignment of each kept tensor of as many blocks as
    a plan makes under any but a tiny working set, one per (row, candidate)
    and MIN_SPAN positions (a plan of more keeps nothing:
    din_fast.chunked.KeptActivations)."""
    blocks = batch * candidates * -(-length // MIN_SPAN)
    alignment = len(widths) * kept_slot(1, element_size)
    return batch * candidates * length * sum(widths) + blocks * alignment


def kept_size(groups: List["RowGroup"], candidates: int, widths: List[int],
              element_size: int) -> int:
    """The room the kept activations of ``groups``' blocks take, slot by slot."""
    total = 0
    for group in groups:
        for chunk in group.candidate_chunks(candidates):
            for span in group.spans():
                pairs = len(group.rows) * (chunk.stop - chunk.start) * (span.stop - span.start)
                total += sum(kept_slot(pairs * width, element_size) for width in widths)
    return total


@dataclass(frozen=True)
class Footprint:
    """The working set of a block, in elements of the compute dtype: ``pair``
    per (candidate, position) pair, ``query`` per (row, candidate),
    ``position`` per (row, position)."""

    pair: int
    query: int
    position: int

    def elements(self, rows: int, candidates: int, span: int) -> int:
        """The working set of a block of ``rows`` x ``candidates`` x ``span``."""
        return rows * (candidates * (span * self.pair + self.query) + span * self.position)

    def split(self, length: int, candidates: int, budget: int):
        """(span, candidate step) of one row of ``length`` positions that
        exceeds ``budget`` elements whole: spans of at least MIN_SPAN
        positions where a candidate fits with them (fewer only under a
        smaller budget), and as many candidates as the budget leaves; spans
        and chunks of nearly equal sizes."""
        span = (budget - candidates * self.query) // (candidates * self.pair + self.position)
        if span >= min(MIN_SPAN, length):
            return _balanced(length, span), candidates
        span = min(MIN_SPAN, length)
        step = (budget - span * self.position) // (span * self.pair + self.query)
        if step >= 1:
            return _balanced(length, span), _balanced(candidates, step)
        span = (budget - self.query) // (self.pair + self.position)
        return _balanced(length, max(1, span)), 1


def _balanced(total: int, step: int) -> int:
    """The step, at most ``step``, that cuts ``total`` into as few parts of
    nearly equal sizes: a last part of a few positions or candidates would
    be a block of small products."""
    parts = -(-total // step)
    return -(-total // parts)


@dataclass(frozen=True)
class UnitSize:
    """What a block's working set depends on: the hidden widths, the key
    width, the value width (0 when the values are the keys), whether the
    activation's derivative needs its inputs kept (prelu, dice), the compute
    dtype's element size and the device."""

    hidden: tuple
    dim: int
    value_dim: int
    keeps_inputs: bool
    element_size: int
    device: torch.device

    @classmethod
    def of(cls, problem, dtype: torch.dtype) -> "UnitSize":
        value_dim = 0 if problem.values is None else problem.values.shape[-1]
        return cls(tuple(problem.hidden_units), problem.query.shape[-1], value_dim,
                   derivative_needs_input(problem.activation),
                   torch.empty((), dtype=dtype).element_size(), problem.query.device)

    def budget(self) -> int:
        """The working set of one block, in elements."""
        return working_set_bytes(self.device) // self.element_size

    def footprint(self, folded: bool) -> Footprint:
        """The working set of a block in the backward (the forward holds
        less: one plan serves both) whose first layer is ``folded`` (else
        shared), as din_fast.chunked and din_fast.activation_unit allocate it."""
        first, dim = self.hidden[0], self.dim
        # Per pair: every hidden activation (and pre-activation, where the
        # derivative needs it), two gradients of the widest layer, and a few
        # scalars (s, w, their gradients, an index).
        pair = (2 if self.keeps_inputs else 1) * sum(self.hidden) + 2 * max(self.hidden) + 4
        # Per (row, candidate): the query, u, the pooled sum, dL/dpooled,
        # the gradients of the query and u, the softmax statistics.
        query = 2 * (first + dim) + 2 * max(dim, self.value_dim) + 4
        # Per (row, position): the gathered keys and values, their
        # gradients, an index.
        position = 2 * (dim + self.value_dim) + 2
        if folded:
            # M, its gradient and a product of its size.
            query += 3 * first * dim
        else:
            # q * k per pair, its gradient and a product of their size;
            # (W_k - W_d) k per position and its gradient.
            pair += 3 * dim
            position += 2 * first
        return Footprint(pair, query, position)

    def folds(self, length: int, candidates: int) -> bool:
        """Whether rows of ``length`` positions (a group's longest) against
        ``candidates`` candidates score faster with the first layer folded.

        Per (row, candidate) the fold costs element-wise passes over M,
        H1 * D elements each (FOLD_COST a element), and saves per position
        the shared form's (W_k - W_d) k, H1 * D multiply-adds shared by the
        candidates, and per pair its element-wise work on q * k, D elements
        (PAIR_COST a element): fold where
        length * (H1 / candidates + PAIR_COST) * D > FOLD_COST * H1 * D.
        """
        first = self.hidden[0]
        return length * (first + PAIR_COST * candidates) > FOLD_COST * first * candidates


@dataclass
class RowGroup:
    """Rows ``rows`` [G] (int64) with ``counts`` [G] valid positions each,
    walked as candidate chunks of ``candidate_step`` and position spans of
    ``span`` up to ``length`` (the largest count), the first layer
    ``folded`` or shared (UnitSize.folds). ``first_row`` is the first row id
    when the rows are consecutive ids in order (their tensors are then
    slices, not gathers), else None; ``shortest`` is the smallest count.
    ``last`` [G, 1] is counts - 1 and ``positions`` [1, >= length] the
    positions 0, 1, ...: what ``slots`` takes its views of, computed once
    for all the groups of a plan, so that a block costs few small ops."""

    rows: Tensor
    counts: Tensor
    last: Tensor
    positions: Tensor
    length: int
    shortest: int
    first_row: Optional[int]
    candidate_step: int
    span: int
    folded: bool

    def candidate_chunks(self, candidates: int) -> Iterator[slice]:
        for start in range(0, candidates, self.candidate_step):
            yield slice(start, min(start + self.candidate_step, candidates))

    def spans(self) -> Iterator[slice]:
        for start in range(0, self.length, self.span):
            yield slice(start, min(start + self.span, self.length))

    def slots(self, span: slice):
        """(positions, invalid) of ``span``'s slots: positions [G, span] ([1,
        span] where every slot is valid), each slot's position in its row,
        past a row's count its last valid one;
        invalid [G, span, 1] bool, True past a row's count (the trailing 1
        broadcasts against the candidates), or None when every slot is valid."""
        positions = self.positions[:, span.start:span.stop]
        if span.stop <= self.shortest:
            return positions, None
        return torch.minimum(positions, self.last), (positions > self.last).unsqueeze(-1)


def plan(counts: Tensor, candidates: int, unit: UnitSize) -> List[RowGroup]:
    """The row groups of rows with ``counts`` [B] valid positions, for
    ``candidates`` candidates, each block's working set (its footprint under
    ``unit``) within unit.budget() elements, or one pair where not even one
    fits."""
    if candidates == 0:
        return []
    budget = unit.budget()
    # One stable sort (ties keep their row order), read to the host at once:
    # the groups' rows and counts are slices of its results, no tensor built
    # per group.
    sorted_counts, order = torch.sort(counts.long(), descending=True, stable=True)
    host_counts, host_order = torch.stack((sorted_counts, order)).tolist()
    nonempty = sum(1 for count in host_counts if count > 0)
    if nonempty == 0:
        return []
    last = sorted_counts[:, None] - 1
    positions = torch.arange(host_counts[0], device=counts.device)[None, :]
    footprints = {}
    groups = []
    start = 0
    while start < nonempty:
        longest = host_counts[start]
        folded = unit.folds(longest, candidates)
        if folded not in footprints:
            footprints[folded] = unit.footprint(folded)
        footprint = footprints[folded]
        size = budget // footprint.elements(1, candidates, longest)
        if size >= 1:
            stop = min(start + size, nonempty)
            span, candidate_step = longest, candidates
        else:
            # One row beyond the budget: in spans and candidate chunks.
            stop = start + 1
            span, candidate_step = footprint.split(longest, candidates, budget)
        first = host_order[start]
        consecutive = host_order[start:stop] == list(range(first, first + stop - start))
        groups.append(RowGroup(
            rows=order[start:stop], counts=sorted_counts[start:stop], last=last[start:stop],
            positions=positions, length=longest, shortest=host_counts[stop - 1],
            first_row=first if consecutive else None,
            candidate_step=candidate_step, span=span, folded=folded))
        start = stop
    return groups


@dataclass
class Block:
    """The slots (g, j) of one span of a row group: ``index`` [G, span], the
    flat position of each in the history (its rows merged, [B * T, ...], or
    jagged [L, ...]); ``window`` the same slots as a tuple of slices of the
    unmerged history where they form one and are all valid, else None;
    ``invalid`` [G, span, 1] bool, True at the slots past their row's
    count, or None when every slot is valid."""

    group: RowGroup
    span: slice
    index: Tensor
    window: Optional[tuple]
    invalid: Optional[Tensor]


class History:
    """Where the valid positions of each row are in a problem's history tensors.

    Padded histories ([B, T, ...]) keep row b's j-th valid position at
    (b, j) with lengths (or none), at (b, the j-th True of the row) with a
    mask; jagged histories ([L, ...]) at offsets[b] + j.
    """

    def __init__(self, problem):
        self.jagged = isinstance(problem, JaggedDINProblem)
        self.columns = None          # mask: the valid columns, row after row
        self.host_starts = None      # jagged: the rows' offsets, read once where needed
        if self.jagged:
            self.length = 1          # a jagged position is its own row of the history
            self.counts = problem.lengths()
            self.starts = problem.offsets[:-1]
            return
        batch, self.length = problem.keys.shape[:2]
        if problem.mask is not None:
            self.counts = problem.mask.sum(1)
            self.columns = problem.mask.nonzero()[:, 1]
            self.starts = self.counts.cumsum(0) - self.counts
        else:
            self.counts = (problem.lengths if problem.lengths is not None
                           else torch.full((batch,), self.length, dtype=torch.int64,
                                           device=problem.keys.device))
            self.starts = None

    def groups(self, candidates: int, unit: UnitSize) -> List[RowGroup]:
        return plan(self.counts, candidates, unit)

    def block(self, group: RowGroup, span: slice) -> Block:
        # Past a row's count: its last valid position (every row of a group has one).
        slots, invalid = group.slots(span)
        window = None
        if self.jagged:
            index = self.starts[group.rows][:, None] + slots
            if len(group.rows) == 1:
                # A single row's spans lie within its length: its slots are
                # one window, found on the host (reading index would wait
                # for the device, once per block).
                if self.host_starts is None:
                    self.host_starts = self.starts.tolist()
                start = self.host_starts[group.first_row] + span.start
                window = (slice(start, start + span.stop - span.start),)
        elif self.columns is not None:
            columns = self.columns[self.starts[group.rows][:, None] + slots]
            index = group.rows[:, None] * self.length + columns
        else:
            index = torch.add(slots, group.rows.unsqueeze(1), alpha=self.length)
            if group.first_row is not None and invalid is None:
                window = (slice(group.first_row, group.first_row + len(group.rows)), span)
        return Block(group, span, index, window, invalid)

    def _merged(self, history: Tensor) -> Optional[Tensor]:
        """The history with its position axes merged ([B * T, X] or [L, X]) as
        a view, or None where its strides allow none (an expanded batch)."""
        if self.jagged:
            return history
        try:
            return history.view(history.shape[0] * history.shape[1], history.shape[2])
        except RuntimeError:
            return None

    def gather(self, history: Tensor, block: Block, dtype: torch.dtype) -> Tensor:
        """[G, span, X] in ``dtype``: the block's slots of ``history`` ([B, T, X]
        padded, [L, X] jagged)."""
        if block.window is not None:
            window = history[block.window]
            return in_dtype(window[None] if self.jagged else window, dtype)
        merged = self._merged(history)
        if merged is None:
            rows = torch.div(block.index, self.length, rounding_mode="floor")
            taken = history[rows, block.index - rows * self.length]
        else:
            taken = merged.index_select(0, block.index.view(-1))
        return in_dtype(taken.view(*block.index.shape, history.shape[-1]), dtype)

    def add(self, target: Tensor, block: Block, values: Tensor) -> None:
        """Add ``values`` [G, span, X] (zero at invalid slots) into ``target``,
        shaped like the history and contiguous, at the block's slots."""
        if block.window is not None:
            window = target[block.window]
            window += values.view(window.shape)
            return
        width = target.shape[-1]
        merged = target if self.jagged else target.view(target.shape[0] * target.shape[1], width)
        merged.index_add_(0, block.index.view(-1), values.reshape(block.index.numel(), width))

    def _score_index(self, block: Block, chunk: slice, candidates: int) -> Tensor:
        """The flat index [G, span, Cc] of the block's slots and ``chunk``'s
        candidates in scores [B, C, T] or [L, C] (C = ``candidates``)."""
        chosen = torch.arange(chunk.start, chunk.stop, device=self.counts.device)
        if self.jagged:
            return block.index[..., None] * candidates + chosen
        column = block.index % self.length
        return (block.index - column)[..., None] * candidates + column[..., None] \
            + chosen * self.length

    def put_scores(self, scores: Tensor, block: Block, chunk: slice, values: Tensor) -> None:
        """Add the block's scores [G, span, Cc] (zero at invalid slots) into
        ``scores`` ([B, C, T] padded, [L, C] jagged; contiguous, zeros before)."""
        index = self._score_index(block, chunk, scores.shape[1])
        scores.view(-1).index_add_(0, index.view(-1), values.reshape(-1))

    def take_scores(self, scores: Tensor, block: Block, chunk: slice,
                    dtype: torch.dtype) -> Tensor:
        """The block's slots [G, span, Cc] of ``scores`` (contiguous) in
        ``dtype``, zero at invalid slots."""
        index = self._score_index(block, chunk, scores.shape[1])
        taken = scores.view(-1)[index].to(dtype)
        if block.invalid is not None:
            taken = taken.masked_fill(block.invalid, 0)
        return taken
