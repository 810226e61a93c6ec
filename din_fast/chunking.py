"""How the torch backend walks the (row, candidate, position) triples of a
problem: in blocks whose working set fits a budget, so that its memory never
grows with B * C * T.

A *row group* is a set of rows taken together: either several whole rows
(short histories: a training batch), padded to the longest of them, or one
row whose history times its candidates exceeds the budget, split into
candidate chunks and position spans (long histories, many candidates: a
serving request). Rows are taken longest first, so that a group's rows have
nearly equal lengths and padding them to one length wastes little work;
rows with no valid position are skipped (they pool to zero).

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
from dataclasses import dataclass
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from .problem import DINProblem, JaggedDINProblem

# The default working set of one block (every hidden activation of its
# pairs, forward and backward): 4 MiB is far under any memory limit, and
# measured on a Zen 4 core (1 MiB L2, 32 MiB shared L3) at least as fast as
# 2, 8 and 16 MiB at both the training and the serving shape: smaller blocks
# pay more Python and dispatch per pair, larger ones leave the caches.
WORKING_SET_BYTES = 4 << 20
# A span of one row's positions is at least this long (when the row has that
# many), so that the first layer's product keeps a matrix shape: spans of a
# few positions would turn it into matrix-vector products.
MIN_SPAN = 64

_budget = [WORKING_SET_BYTES]


@contextlib.contextmanager
def working_set(nbytes: int):
    """Inside ``with working_set(nbytes):`` the torch backend sizes its blocks
    to ``nbytes`` of working set (the tests force blocks of one pair this
    way; a process may trade memory for fewer, larger products)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"working_set: `nbytes` must be a positive int; got {nbytes!r}")
    previous = _budget[0]
    _budget[0] = nbytes
    try:
        yield
    finally:
        _budget[0] = previous


def pair_bytes(hidden: tuple, element_size: int) -> int:
    """The working set of one (candidate, position) pair of a block: its
    hidden activations and pre-activations, and in the backward two
    gradients of the widest layer, besides a few scalars."""
    return element_size * (2 * sum(hidden) + 2 * max(hidden) + 4)


def pair_budget(hidden: tuple, element_size: int) -> int:
    """How many pairs one block may hold under the working-set budget."""
    return max(1, _budget[0] // pair_bytes(hidden, element_size))


@dataclass
class RowGroup:
    """Rows ``rows`` [G] (int64) with ``counts`` [G] valid positions each,
    walked as candidate chunks of ``candidate_step`` and position spans of
    ``span`` up to ``length`` (the largest count). ``first_row`` is the first
    row id when the rows are consecutive ids in order (their tensors are then
    slices, not gathers), else None; ``shortest`` is the smallest count."""

    rows: Tensor
    counts: Tensor
    length: int
    shortest: int
    first_row: Optional[int]
    candidate_step: int
    span: int

    def candidate_chunks(self, candidates: int) -> Iterator[slice]:
        for start in range(0, candidates, self.candidate_step):
            yield slice(start, min(start + self.candidate_step, candidates))

    def spans(self) -> Iterator[slice]:
        for start in range(0, self.length, self.span):
            yield slice(start, min(start + self.span, self.length))

    def valid(self, span: slice) -> Optional[Tensor]:
        """[G, span] bool: which slots of ``span`` hold a valid position, or
        None when all of them do."""
        if span.stop <= self.shortest:
            return None
        positions = torch.arange(span.start, span.stop, device=self.counts.device)
        return positions[None, :] < self.counts[:, None]


def plan(counts: Tensor, candidates: int, pairs: int) -> List[RowGroup]:
    """The row groups of rows with ``counts`` [B] valid positions, for
    ``candidates`` candidates and at most ``pairs`` pairs per block."""
    if candidates == 0:
        return []
    host_counts = counts.tolist()
    order = sorted(range(len(host_counts)), key=lambda b: -host_counts[b])
    order = [b for b in order if host_counts[b] > 0]
    groups = []
    start = 0
    while start < len(order):
        longest = host_counts[order[start]]
        size = max(1, pairs // (longest * candidates))
        rows = order[start:start + size]
        start += len(rows)
        if len(rows) > 1:
            span, candidate_step = longest, candidates
        else:
            # One row beyond the budget: spans of at least MIN_SPAN positions
            # (fewer only under a budget of fewer pairs) and as many
            # candidates as the budget leaves.
            span = min(longest, max(pairs // candidates, min(MIN_SPAN, pairs)))
            candidate_step = min(candidates, max(1, pairs // span))
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        groups.append(RowGroup(
            rows=torch.tensor(rows, dtype=torch.int64, device=counts.device),
            counts=torch.tensor([host_counts[b] for b in rows], dtype=torch.int64,
                                device=counts.device),
            length=longest, shortest=host_counts[rows[-1]],
            first_row=rows[0] if consecutive else None,
            candidate_step=candidate_step, span=span))
    return groups


@dataclass
class Block:
    """The slots (g, j) of one span of a row group: ``index`` [G, span], the
    flat position of each in the history (its rows merged, [B * T, ...], or
    jagged [L, ...]); ``window`` the same slots as a tuple of slices of the
    unmerged history where they form one and are all valid, else None;
    ``valid`` [G, span] bool, or None when every slot is valid."""

    group: RowGroup
    span: slice
    index: Tensor
    window: Optional[tuple]
    valid: Optional[Tensor]


class History:
    """Where the valid positions of each row are in a problem's history tensors.

    Padded histories ([B, T, ...]) keep row b's j-th valid position at
    (b, j) with lengths (or none), at (b, the j-th True of the row) with a
    mask; jagged histories ([L, ...]) at offsets[b] + j.
    """

    def __init__(self, problem):
        self.jagged = isinstance(problem, JaggedDINProblem)
        self.columns = None          # mask: the valid columns, row after row
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

    def groups(self, candidates: int, pairs: int) -> List[RowGroup]:
        return plan(self.counts, candidates, pairs)

    def block(self, group: RowGroup, span: slice) -> Block:
        valid = group.valid(span)
        device = self.counts.device
        # Past a row's count: its last valid position (every row of a group has one).
        slots = torch.arange(span.start, span.stop, device=device)[None, :]
        if valid is not None:
            slots = torch.minimum(slots, group.counts[:, None] - 1)
        window = None
        if self.jagged:
            index = self.starts[group.rows][:, None] + slots
            if len(group.rows) == 1:
                start = int(index[0, 0])
                window = (slice(start, start + span.stop - span.start),)
        elif self.columns is not None:
            columns = self.columns[self.starts[group.rows][:, None] + slots]
            index = group.rows[:, None] * self.length + columns
        else:
            index = group.rows[:, None] * self.length + slots
            if group.first_row is not None and valid is None:
                window = (slice(group.first_row, group.first_row + len(group.rows)), span)
        return Block(group, span, index, window, valid)

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
            return (window[None] if self.jagged else window).to(dtype)
        merged = self._merged(history)
        if merged is None:
            rows = torch.div(block.index, self.length, rounding_mode="floor")
            taken = history[rows, block.index - rows * self.length]
        else:
            taken = merged.index_select(0, block.index.view(-1))
        return taken.view(*block.index.shape, history.shape[-1]).to(dtype)

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
        if block.valid is not None:
            taken = torch.where(block.valid[..., None], taken, 0)
        return taken
