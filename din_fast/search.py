"""Stage one of two-stage attention (SPEC section 6): search the history, keep the top K.

For every row b and candidate c, each valid position t gets a search score
s1[b, c, t], and the K valid positions with the highest s1 are selected, ties
going to the more recent position (larger t); a row with at most K valid
positions keeps them all. A NaN score counts as -inf. The scorers:

- ``"din"``: the exact DIN score as stage two weighs it, ``scale * s`` (TWIN's
  consistent search: the positions stage two would weigh most);
- ``"dot"``: ``<P_q q, P_k k>`` with learned projections P_q, P_k [P, D]
  (SIM's soft search);
- ``"category"``: 1 where the categories of q and k match, else 0 (SIM's hard
  search): the K most recent matching positions, topped up with the most
  recent other ones when fewer than K match.

Selection is not differentiable: it runs without autograd and returns indices.
Implementations: the literal one (din_fast.reference_top_k), the torch path
here (positions in chunks with a running top K, so that memory stays bounded
for any T) and the fused Triton kernel (din_fast.kernels.din_search), which
scores and selects in one pass without writing a score.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from . import torch_backend
from .functional import _autocast_off
from .problem import OWNER, DINProblem
from .triton_backend import unsupported_reason

SEARCHES = ("din", "dot", "category")
# Elements of the [B, C, positions, width] intermediates one chunk of the torch
# search may hold (width: the first hidden layer for "din", P for "dot").
CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK = 64


@dataclass
class Search:
    """A validated stage one: K, the scorer and what the scorer reads.

    ``projections`` ("dot") is (P_q, P_k), each [P, D] in ``nn.Linear``
    layout; ``categories`` ("category") is (query's [B, C], keys' [B, T]),
    int64.
    """

    top_k: int
    scorer: str
    projections: Optional[tuple] = None
    categories: Optional[tuple] = None


@dataclass
class Selection:
    """The selected positions of every (row, candidate): ``positions`` [B, C,
    min(K, T)] int64, the selected ones first in ascending order, then
    in-range fillers; ``counts`` [B, C] int64, how many are selected."""

    positions: torch.Tensor
    counts: torch.Tensor

    def slot_valid(self) -> torch.Tensor:
        """[B, C, K] bool: which slots hold a selected position."""
        slots = torch.arange(self.positions.shape[-1], device=self.positions.device)
        return slots < self.counts[..., None]


def validate_search(problem: DINProblem, top_k, search, search_params, query_categories,
                    key_categories) -> Search:
    """Check the two-stage arguments against a validated problem (messages
    name din_attention; the caller renames them, problem.validating)."""
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise ValueError(f"{OWNER}: `top_k` must be a positive int; got {top_k!r}")
    if search not in SEARCHES:
        raise ValueError(f"{OWNER}: `search` must be one of {SEARCHES}; got {search!r}")
    if search != "dot" and search_params is not None:
        raise ValueError(f"{OWNER}: `search_params` is for search='dot' (the projections); "
                         f"got it with search={search!r}")
    if search != "category" and (query_categories is not None or key_categories is not None):
        raise ValueError(f"{OWNER}: `query_categories` and `key_categories` are for "
                         f"search='category'; got them with search={search!r}")
    result = Search(int(top_k), search)
    if search == "dot":
        result.projections = _validate_projections(search_params, problem)
    elif search == "category":
        result.categories = _validate_categories(query_categories, key_categories, problem)
    return result


def _validate_projections(search_params, problem: DINProblem) -> tuple:
    embed_dim, device = problem.keys.shape[2], problem.keys.device
    needs = (f"a pair (query_projection, key_projection) of float tensors [P, D] with "
             f"D = {embed_dim}")
    if not isinstance(search_params, (list, tuple)) or len(search_params) != 2 \
            or not all(isinstance(p, torch.Tensor) for p in search_params):
        raise ValueError(f"{OWNER}: `search_params` for search='dot' must be {needs}; "
                         f"got {type(search_params).__name__}")
    for name, p in zip(("query_projection", "key_projection"), search_params):
        if not p.is_floating_point() or p.dim() != 2 or p.shape[1] != embed_dim \
                or p.shape[0] < 1:
            raise ValueError(f"{OWNER}: `search_params` ({name}) must be a float tensor "
                             f"[P, {embed_dim}] with P >= 1; got a {p.dtype} tensor of shape "
                             f"{tuple(p.shape)}")
        if p.device != device:
            raise ValueError(f"{OWNER}: `search_params` ({name}) is on {p.device} but `keys` "
                             f"is on {device}; all tensors must be on one device")
    if search_params[0].shape != search_params[1].shape:
        raise ValueError(f"{OWNER}: `search_params` must have one width P: query_projection "
                         f"is {tuple(search_params[0].shape)}, key_projection "
                         f"{tuple(search_params[1].shape)}")
    return tuple(search_params)


def _validate_categories(query_categories, key_categories, problem: DINProblem) -> tuple:
    batch, length = problem.keys.shape[:2]
    candidates = problem.query.shape[1]
    query_shape = (batch,) if problem.squeeze_candidates else (batch, candidates)
    checked = []
    for name, ids, shape in (("query_categories", query_categories, query_shape),
                             ("key_categories", key_categories, (batch, length))):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{OWNER}: `{name}` must be an integer tensor of shape {shape} for "
                            f"search='category'; got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OWNER}: `{name}` must be int32 or int64; got {ids.dtype}")
        if tuple(ids.shape) != shape:
            raise ValueError(f"{OWNER}: `{name}` must have shape {shape} to match the query "
                             f"and keys; got {tuple(ids.shape)}")
        if ids.device != problem.keys.device:
            raise ValueError(f"{OWNER}: `{name}` is on {ids.device} but `keys` is on "
                             f"{problem.keys.device}; all tensors must be on one device")
        checked.append(ids.long())
    return checked[0].reshape(batch, candidates), checked[1]


def kernel_unsupported(problem: DINProblem, search: Search) -> Optional[str]:
    """Why the fused search kernel cannot run this stage one, or None."""
    reason = unsupported_reason(problem)
    if reason is not None:
        return reason
    from .kernels.din_search import search_unsupported

    width = 1 if search.projections is None else search.projections[0].shape[0]
    return search_unsupported(search.top_k, width)


def detached(problem: DINProblem, search: Search):
    """``problem`` and ``search`` with their tensors detached: stage one is
    not differentiable, so it scores detached tensors (rather than under
    no_grad, which the torch backend's scoring cannot be traced under)."""
    problem = problem.with_float_tensors([t.detach() for t in problem.float_tensors()])
    if search.projections is not None:
        search = dataclasses.replace(search, projections=tuple(
            p.detach() for p in search.projections))
    return problem, search


def select(problem: DINProblem, search: Search, backend: str) -> Selection:
    """Stage one on a fast backend: "torch" (chunks with a running top K) or
    "triton" (the fused kernel; kernel_unsupported must be None). Not
    differentiable (see detached). The literal selection, which the reference
    backend runs, is reference_top_k.reference_selection."""
    problem, search = detached(problem, search)
    # Stage one ranks in the compute dtype (float32 for half inputs): autocast
    # must not round the scores behind its back.
    with _autocast_off(problem.keys.device):
        if backend == "triton":
            return _kernel_selection(problem, search)
        return _torch_selection(problem, search)


def _kernel_selection(problem: DINProblem, search: Search) -> Selection:
    from .kernels.din_search import din_search

    projected = None
    if search.projections is not None:
        projected = project(problem.query, problem.keys, search.projections, torch.float32)
    positions, counts = din_search(problem, search.scorer, search.top_k, projected,
                                   search.categories)
    return Selection(positions, counts)


def project(query: torch.Tensor, keys: torch.Tensor, projections: tuple, dtype) -> tuple:
    """(P_q q [B, C, P], P_k k [B, T, P]) in ``dtype``: what "dot" multiplies."""
    query_projection, key_projection = (p.to(dtype) for p in projections)
    return query.to(dtype) @ query_projection.t(), keys.to(dtype) @ key_projection.t()


def search_scores(problem: DINProblem, search: Search, start: int, stop: int) -> torch.Tensor:
    """s1 [B, C, stop - start] of positions start..stop in the compute dtype,
    on the torch backend (any value at invalid positions: the caller masks)."""
    dtype = problem.compute_dtype()
    keys = problem.keys[:, start:stop]
    if search.scorer == "din":
        # The DIN scores alone: no values to pool (Dv = 0), raw scaled scores.
        valid = None if problem.lengths is None and problem.mask is None \
            else problem.valid_mask()[:, start:stop].contiguous()
        chunk = dataclasses.replace(problem, keys=keys, values=keys.new_empty(*keys.shape[:2], 0),
                                    lengths=None, mask=valid, normalization=None,
                                    squeeze_candidates=False)
        return torch_backend.run(chunk)[1]
    if search.scorer == "dot":
        query, keys = project(problem.query, keys, search.projections, dtype)
        return query @ keys.transpose(1, 2)
    query_categories, key_categories = search.categories
    return (query_categories[:, :, None] == key_categories[:, None, start:stop]).to(dtype)


def _chunks(problem: DINProblem, search: Search) -> list:
    """(start, stop) of the torch search's chunks of positions, each one's
    intermediates within CHUNK_ELEMENTS; one chunk while tracing (a trace has
    no loop over a data-dependent size)."""
    batch, length = problem.keys.shape[:2]
    if torch.compiler.is_compiling():
        return [(0, length)]
    if search.scorer == "din":
        width = problem.hidden_units[0]
    elif search.scorer == "dot":
        width = search.projections[0].shape[0]
    else:
        width = 1
    per_position = max(batch * problem.query.shape[1] * width, 1)
    step = max(MIN_CHUNK, CHUNK_ELEMENTS // per_position)
    return [(start, min(start + step, length)) for start in range(0, length, step)]


def _torch_selection(problem: DINProblem, search: Search) -> Selection:
    """Chunks of positions, each scored and merged into a running top K: the
    chunk's positions follow the kept ones, so index order is position order
    and top_k_mask's tie rule (the later index) is the recency rule.

    While tracing, K empty slots (position 0, not kept) come first: the
    selection is then K wide whatever T is, a static size, where min(K, T)
    would make the exported graph's shapes depend on how T compares to K.
    """
    batch, length = problem.keys.shape[:2]
    candidates = problem.query.shape[1]
    device = problem.keys.device
    valid = problem.valid_mask()
    slots = search.top_k if torch.compiler.is_compiling() else 0
    scores = torch.full((batch, candidates, slots), float("-inf"), dtype=problem.compute_dtype(),
                        device=device)
    positions = torch.zeros(batch, candidates, slots, dtype=torch.int64, device=device)
    kept = torch.zeros(batch, candidates, slots, dtype=torch.bool, device=device)
    for start, stop in _chunks(problem, search):
        chunk = search_scores(problem, search, start, stop)
        scores = torch.cat([scores, torch.where(chunk.isnan(), float("-inf"), chunk)], -1)
        here = torch.arange(start, stop, device=device).expand(batch, candidates, -1)
        positions = torch.cat([positions, here], -1)
        kept = torch.cat([kept, valid[:, None, start:stop].expand(-1, candidates, -1)], -1)
        kept = top_k_mask(scores, kept, search.top_k)
        # The kept entries first, in index order (a stable sort of the flags).
        order = kept.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)
        order = order.narrow(-1, 0, torch.sym_min(search.top_k, order.shape[-1]))
        scores, positions, kept = (x.gather(-1, order) for x in (scores, positions, kept))
    return Selection(positions, kept.sum(-1))


def top_k_mask(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N] bool: the k valid entries of each row with the highest scores,
    ties going to the later index; every valid entry where a row has at most k.

    The k-th highest valid score is the threshold: every valid entry above it
    is kept, and of those equal to it the latest ones, as many as fit. (With
    at most k entries the threshold is the lowest, and every valid one is kept.)
    """
    ranked = torch.where(valid, scores, float("-inf"))
    threshold = ranked.topk(torch.sym_min(k, scores.shape[-1]), dim=-1).values[..., -1:]
    above = valid & (scores > threshold)
    tied = valid & (scores == threshold)
    room = k - above.sum(-1, keepdim=True)
    tied_from_here = tied.flip(-1).cumsum(-1).flip(-1)   # tied entries at this index or later
    return above | (tied & (tied_from_here <= room))
