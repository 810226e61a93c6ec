"""The fused search of two-stage attention: score and select the top K in one pass.

Stage one of din_fast.din_attention_top_k (SPEC section 6) on the GPU. One
program owns one history row b, a block of BLOCK_C of its candidates and a
range of its positions (the whole row unless T is split across programs, as
the forward splits it). Per tile of BLOCK_T positions it computes the search
score of every (position, candidate) pair on chip -- the exact DIN score with
the forward's own ``tile_scores`` ("din"), the inner product of the projected
query and key ("dot"), or a category match ("category") -- and folds the tile
into a running top-M per candidate held in registers. No score is written to
memory: what leaves the kernel is the K best per candidate.

The sort keys. Each pair becomes one int64: the score's float32 bits, mapped
to an int32 of the same order, in the high half, and the position in the low
half. Keys are distinct and compare as (score, position) pairs: the larger
key is the higher score, ties going to the more recent position, which is the
selection's rule, by plain integer comparison. A NaN score counts as -inf and
-0.0 as +0.0 (which the float comparison of the torch path does too); an
invalid pair (padding, a candidate past C) is EMPTY, below every key.

The running top-M. ``best`` [BLOCK_C, M] stays sorted in descending order. A
tile's keys, widened to M with EMPTY and sorted in ascending order, meet it
elementwise: max(best_i, tile_i) of a descending and an ascending sequence is
the top M of their union as a bitonic sequence (the first step of Batcher's
bitonic merge), which one bitonic merge sorts again. With the cheap scorers
a tile without a key above its candidate's current M-th best is not sorted
at all. The sorting
network is written here (_exchange) rather than taken from tl.sort: the same
steps, with a pair's min and max as reductions, which the interpreter runs
at numpy's speed. M is the next power of two of K, at least BLOCK_T;
M * BLOCK_C stays within MERGE_BUDGET keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import (MAX_HIDDEN_LAYERS, NUM_STAGES, TILE_BUDGET, TRITON_DTYPES,
                     cuda_matmul_tf32, device_arch, fold_parameters, interpreting, launch_device,
                     length_stop, mma, padded, program_candidates, split_positions,
                     tile_positions)
from .din_forward import ForwardSpec, choose_splits, tile_scores

SCORERS = ("din", "dot", "category")
# Keys of the running top-M one program holds (int64): 8 per thread at 4 warps.
# At 2048 (two candidates of K = 1024), ptxas spills with four warps and eight.
MERGE_BUDGET = 1024
# The largest K the kernel selects (M = K rounded up to a power of two). Its
# sorting network is unrolled: at M = 2048 ptxas takes many minutes over it.
MAX_TOP_K = 1024
# The widest "dot" projection (the [BLOCK_T, P] tile of projected keys).
MAX_PROJECTION = 256
# Below every key: the key of an invalid pair (-2**63 + 1: -2**63 is no literal Triton takes).
EMPTY_KEY = -(2 ** 63 - 1)
EMPTY = tl.constexpr(EMPTY_KEY)
POSITION_BITS = 32


@triton.jit
def _sort_keys(s, offs_t, valid):
    """int64 keys of scores s [BLOCK_T, BLOCK_C] at positions offs_t: larger
    key = higher score, then later position; EMPTY where not valid."""
    s = tl.where(s != s, float("-inf"), s)          # NaN counts as -inf
    s = tl.where(s == 0.0, 0.0, s)                  # -0.0 as +0.0
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order by magnitude the other way round: flip their low 31 bits.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (ordered.to(tl.int64) << 32) | offs_t[:, None].to(tl.int64)
    return tl.where(valid, keys, tl.full(keys.shape, EMPTY, tl.int64))


@triton.jit
def _exchange(x, descending, STRIDE: tl.constexpr):
    """One compare-exchange step of a bitonic network along the last axis of
    x [R, N]: elements i and i + STRIDE of each block of 2 * STRIDE are put
    in ascending order, or descending where ``descending`` [R, N] is set
    (the same for both). The pair is an axis of size 2 of a reshape, its min
    and max two reductions over it (numpy's own in the interpreter, where
    tl.sort's xor reduction runs in Python)."""
    R: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    pairs: tl.constexpr = (R * N // (2 * STRIDE), 2, STRIDE)
    y = tl.reshape(x, pairs)
    low = tl.min(y, axis=1, keep_dims=True)
    high = tl.max(y, axis=1, keep_dims=True)
    second = tl.arange(0, 2)[None, :, None] == 1
    return tl.reshape(tl.where(second != tl.reshape(descending, pairs), high, low), (R, N))


@triton.jit
def _merge(best, keys, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, M: tl.constexpr,
           LOG_M: tl.constexpr):
    """The top M of best [BLOCK_C, M] (sorted descending) and keys [BLOCK_T,
    BLOCK_C], sorted descending."""
    keys = tl.trans(keys)
    if M > BLOCK_T:
        # Widen to M: the tile in the first of M // BLOCK_T slots, EMPTY in the others.
        slot = tl.arange(0, M // BLOCK_T)
        wide = tl.where(slot[None, None, :] == 0, keys[:, :, None],
                        tl.full((BLOCK_C, BLOCK_T, M // BLOCK_T), EMPTY, tl.int64))
        keys = tl.reshape(wide, (BLOCK_C, M))
    # Bitonic sort of the tile, ascending: stage s sorts runs of 2**s, every
    # other one descending, so that each pair of runs is bitonic for the next.
    index = tl.broadcast_to(tl.arange(0, M)[None, :], (BLOCK_C, M))
    for s in tl.static_range(1, LOG_M + 1):
        descending = ((index >> s) & 1) == 1
        for j in tl.static_range(s):
            keys = _exchange(keys, descending, 1 << (s - 1 - j))
    # max of a descending and an ascending run: the top M, bitonic; merged descending.
    best = tl.maximum(best, keys)
    for j in tl.static_range(LOG_M):
        best = _exchange(best, index >= 0, 1 << (LOG_M - 1 - j))
    return best


@triton.jit
def din_search_kernel(
    q_ptr, u_ptr, k_ptr, len_ptr, mask_ptr,
    wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr,
    qs_ptr, ks_ptr, qcat_ptr, kcat_ptr, out_ptr,
    B, C, T, D, P, H2, K, t_per_split,
    stride_qb, stride_qc, stride_kb, stride_kt, stride_mb, stride_cb,
    scale,
    SCORER: tl.constexpr, ACTIVATION: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
    UNIT_W: tl.constexpr, CHUNK: tl.constexpr, M: tl.constexpr, LOG_M: tl.constexpr,
):
    """Grid (B * cdiv(C, BLOCK_C), splits).

    Inputs by scorer. "din": q [B, C, D], keys [B, T, D] and the parameters
    of FoldedParameters (as the forward reads them). "dot": the projected
    query qs [B, C, P] and keys ks [B, T, P], float32, contiguous. "category":
    the query's categories [B, C] and the keys' [B, T] (row stride
    stride_cb), int64. Always: lengths [B] int64 or mask [B, T] uint8.
    Output: out [S, B, C, K] int64 (S = splits), each candidate's K largest
    keys of its split's positions in descending order, EMPTY where the split
    has fewer than K valid positions.
    """
    split = tl.program_id(1)
    b, offs_c, c_ok = program_candidates(C, BLOCK_C)
    t_lo, t_hi = split_positions(T, t_per_split)
    if HAS_LENGTHS:
        t_stop = length_stop(len_ptr, b, t_hi, T)
    else:
        t_stop = t_hi

    if SCORER == "din":
        b_out = tl.load(bout_ptr)
        q_row = q_ptr + b * stride_qb + offs_c[:, None] * stride_qc
        k_row = k_ptr + b * stride_kb
    elif SCORER == "dot":
        offs_p = tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        qs = tl.load(qs_ptr + (b * C + offs_c)[:, None] * P + offs_p[None, :],
                     mask=c_ok[:, None] & p_ok[None, :], other=0.0)
    else:
        q_cat = tl.load(qcat_ptr + b * C + offs_c, mask=c_ok, other=0)

    best = tl.full((BLOCK_C, M), EMPTY, tl.int64)
    for t0 in range(t_lo, t_stop, BLOCK_T):
        offs_t, t_valid = tile_positions(t0, t_stop, mask_ptr, b, stride_mb, HAS_MASK, BLOCK_T)
        if SCORER == "din":
            s = tile_scores(q_row, k_row, u_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr,
                            wout_ptr, b_out, b, C, D, H2, offs_t, t_valid, offs_c, c_ok,
                            stride_kt, scale, ACTIVATION, NUM_LAYERS, DOT_F32, INPUT_PRECISION,
                            BLOCK_C, BLOCK_T, BLOCK_D, H1_P, H2_P, H3_P, UNIT_W, CHUNK)
        elif SCORER == "dot":
            ks = tl.load(ks_ptr + (b * T + offs_t)[:, None] * P + offs_p[None, :],
                         mask=t_valid[:, None] & p_ok[None, :], other=0.0)
            if BLOCK_C >= 16:
                s = mma(ks, tl.trans(qs), tl.zeros((BLOCK_T, BLOCK_C), tl.float32), DOT_F32,
                        INPUT_PRECISION)
            else:
                # Too few candidates for a tensor-core tile: a broadcast sum.
                s = tl.sum(ks[:, None, :] * qs[None, :, :], axis=2)
        else:
            k_cat = tl.load(kcat_ptr + b * stride_cb + offs_t, mask=t_valid, other=0)
            s = (k_cat[:, None] == q_cat[None, :]).to(tl.float32)
        keys = _sort_keys(s, offs_t, t_valid[:, None] & c_ok[None, :])
        if SCORER == "din":
            best = _merge(best, keys, BLOCK_C, BLOCK_T, M, LOG_M)
        else:
            # A tile none of whose keys beats its candidate's M-th best changes
            # nothing: its sort is skipped (on a long row, past the first
            # tiles, most are). For the cheap scorers the sorting network is
            # most of the work; the DIN score's MLP costs far more than it, and
            # with the branch ptxas spilled some of its kernels at either warp
            # count, so "din" merges every tile.
            beats = tl.max(keys, axis=0) > tl.min(best, axis=1)
            if tl.max(beats.to(tl.int32), axis=0) > 0:
                best = _merge(best, keys, BLOCK_C, BLOCK_T, M, LOG_M)

    offs_m = tl.arange(0, M)
    out = (split * B + b) * C + offs_c
    tl.store(out_ptr + out[:, None] * K + offs_m[None, :], best,
             mask=c_ok[:, None] & (offs_m < K)[None, :])


# ---------------------------------------------------------------------------
# Host side: specialization, launch, and the keys decoded into positions.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SearchSpec:
    """Everything that selects one compiled search kernel. ``hidden`` and
    ``activation`` matter to "din" only, ``projection`` (P) to "dot" only."""

    scorer: str
    dtype: torch.dtype
    top_k: int
    candidates: int
    has_lengths: bool
    has_mask: bool
    embed_dim: int
    hidden: tuple = (16,)
    activation: str = "sigmoid"
    projection: int = 1
    interpret: bool = False
    tf32: bool = False

    # The forward's warp choice, by duck typing: key() hashes signature(),
    # constexprs() and aligned(), which name this kernel in the same warp
    # table (forward_warps.FALLBACK), and num_warps(arch) reads it.
    key = ForwardSpec.key
    num_warps = ForwardSpec.num_warps

    def warp_choices(self) -> tuple:
        """(preferred, other): four warps, eight where the compile report
        found four spilling and eight clean (as for the forward, ptxas may
        spill a few bytes at either count, and the tile sizes do not say
        which; with the forward's eight for its wide float32 tiles, the
        search spills more often)."""
        return (4, 8)

    def _forward(self) -> ForwardSpec:
        """The forward's specialization for the same tiles of scores (no values)."""
        return ForwardSpec(dtype=self.dtype, activation=self.activation, softmax=False,
                           has_lengths=self.has_lengths, has_mask=self.has_mask,
                           need_scores=False, hidden=self.hidden, embed_dim=self.embed_dim,
                           value_dim=1, candidates=self.candidates, split=False,
                           interpret=self.interpret, tf32=self.tf32)

    def blocks(self):
        """(BLOCK_C, BLOCK_T, BLOCK_D, CHUNK, M).

        "din" takes the forward's tiles; "dot" a [BLOCK_T, BLOCK_C, P] product
        (a tensor-core tile from 16 candidates on) within the tile budget;
        "category" one compare per pair. Then, until the running top-M fits
        MERGE_BUDGET keys, fewer positions per tile (down to 16, or to K)
        and then fewer candidates per program.
        """
        block_c = min(16, triton.next_power_of_2(self.candidates))
        block_d = chunk = 16
        if self.scorer == "din":
            block_c, block_t, block_d, chunk = self._forward().blocks()
        elif self.scorer == "dot":
            width = padded(self.projection) * (1 if block_c >= 16 else block_c)
            block_t = max(16, min(128, TILE_BUDGET // width))
        else:
            block_t = max(16, min(128, TILE_BUDGET // block_c))
        top = triton.next_power_of_2(self.top_k)
        while block_t > max(16, top) and block_t * block_c > MERGE_BUDGET:
            block_t //= 2
        while block_c > 1 and max(top, block_t) * block_c > MERGE_BUDGET:
            block_c //= 2
        return block_c, block_t, block_d, chunk, max(top, block_t)

    def constexprs(self) -> dict:
        block_c, block_t, block_d, chunk, merge = self.blocks()
        forward = self._forward().constexprs()
        return dict(
            SCORER=self.scorer, ACTIVATION=self.activation, HAS_LENGTHS=self.has_lengths,
            HAS_MASK=self.has_mask, NUM_LAYERS=forward["NUM_LAYERS"],
            DOT_F32=self.interpret, INPUT_PRECISION=forward["INPUT_PRECISION"],
            BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_D=block_d,
            BLOCK_P=padded(self.projection), H1_P=forward["H1_P"], H2_P=forward["H2_P"],
            H3_P=forward["H3_P"], UNIT_W=forward["UNIT_W"], CHUNK=chunk, M=merge,
            LOG_M=merge.bit_length() - 1,
        )

    def signature(self) -> dict:
        """Argument types for triton.compile (the AOT compile report)."""
        io = "*" + TRITON_DTYPES[self.dtype]
        pointers = dict(q_ptr=io, u_ptr="*fp32", k_ptr=io, len_ptr="*i64", mask_ptr="*u8",
                        wp_ptr=io, wa_ptr=io, w2_ptr=io, w3_ptr=io, unit_ptr="*fp32",
                        wout_ptr="*fp32", bout_ptr="*fp32", qs_ptr="*fp32", ks_ptr="*fp32",
                        qcat_ptr="*i64", kcat_ptr="*i64", out_ptr="*i64")
        ints = ("B C T D P H2 K t_per_split stride_qb stride_qc stride_kb stride_kt "
                "stride_mb stride_cb").split()
        return {**pointers, **{name: "i32" for name in ints}, "scale": "fp32",
                **{name: "constexpr" for name in self.constexprs()}}

    def aligned(self) -> tuple:
        """Arguments a launch sees as multiples of 16 (see ForwardSpec.aligned)."""
        names = [name for name, kind in self.signature().items() if kind.startswith("*")]
        if self.embed_dim % 16 == 0:
            names += ["D", "stride_qb", "stride_qc", "stride_kb", "stride_kt"]
        return tuple(names + ["T", "stride_mb", "stride_cb"])


def search_spec(problem, scorer: str, top_k: int, projection: int = 1) -> SearchSpec:
    query = problem.query
    return SearchSpec(
        scorer=scorer, dtype=query.dtype, top_k=top_k, candidates=query.shape[1],
        has_lengths=problem.lengths is not None, has_mask=problem.mask is not None,
        embed_dim=query.shape[2], hidden=problem.hidden_units, activation=problem.activation,
        projection=projection, interpret=interpreting(),
        tf32=query.is_cuda and cuda_matmul_tf32())


def search_unsupported(top_k: int, projection: int) -> str | None:
    """Why the kernel cannot select this (its limits beyond the forward's), or None."""
    if top_k > MAX_TOP_K:
        return f"top_k is {top_k}; the fused search selects at most {MAX_TOP_K}"
    if projection > MAX_PROJECTION:
        return (f"the search projections are {projection} wide; the fused search takes at "
                f"most {MAX_PROJECTION}")
    return None


def din_search(problem, scorer: str, top_k: int, projected=None, categories=None,
               num_splits=None):
    """The K = min(top_k, T) selected positions of every (row, candidate).

    ``problem`` is a validated DINProblem (its keys, lengths or mask, and for
    "din" its activation unit and scale); ``projected`` the "dot" scorer's
    (query [B, C, P], keys [B, T, P]) projections, ``categories`` the
    "category" scorer's (query [B, C], keys [B, T]) ids. Returns (positions
    [B, C, K] int64, in ascending order, then any in-range position past each
    row's count; counts [B, C] int64).
    """
    keys = problem.keys.contiguous()
    query = problem.query.contiguous()
    batch, length = keys.shape[:2]
    candidates = query.shape[1]
    device = keys.device
    k = min(top_k, length)
    if batch * candidates == 0 or k == 0:
        return (torch.zeros(batch, candidates, k, dtype=torch.int64, device=device),
                torch.zeros(batch, candidates, dtype=torch.int64, device=device))

    projection = 1 if projected is None else projected[0].shape[-1]
    spec = search_spec(problem, scorer, top_k, projection)
    block_c, block_t, block_d = spec.blocks()[:3]
    programs = batch * triton.cdiv(candidates, block_c)
    splits = num_splits or choose_splits(programs, length, block_t, device)
    t_per_split = triton.cdiv(triton.cdiv(length, block_t), splits) * block_t
    splits = triton.cdiv(length, t_per_split)

    # What a scorer does not read: one-element placeholders.
    f32_none = keys.new_zeros(1, dtype=torch.float32)
    i64_none = keys.new_zeros(1, dtype=torch.int64)
    if scorer == "din":
        folded = fold_parameters(problem, block_d)
        deeper = folded.deeper + [folded.w_p] * (MAX_HIDDEN_LAYERS - 1 - len(folded.deeper))
        unit = (folded.u, folded.w_p, folded.w_a, deeper[0], deeper[1], folded.unit,
                folded.w_out, folded.b_out)
    else:
        unit = (f32_none, keys, keys, keys, keys, f32_none, f32_none, f32_none)
    query_projected, keys_projected = (f32_none, f32_none) if projected is None else \
        (projected[0].float().contiguous(), projected[1].float().contiguous())
    query_categories, key_categories = (i64_none, i64_none) if categories is None else \
        (categories[0].long().contiguous(), categories[1].long().contiguous())
    lengths = i64_none if problem.lengths is None else problem.lengths.contiguous()
    mask = keys.new_zeros(1, dtype=torch.uint8) if problem.mask is None else \
        problem.mask.contiguous().view(torch.uint8)
    hidden = problem.hidden_units
    out = torch.empty(splits, batch, candidates, k, dtype=torch.int64, device=device)
    with launch_device(device):
        wrap_triton(din_search_kernel)[(programs, splits)](
            query, unit[0], keys, lengths, mask, *unit[1:],
            query_projected, keys_projected, query_categories, key_categories, out,
            batch, candidates, length, query.shape[2], projection,
            hidden[1] if len(hidden) > 1 else 1, k, t_per_split,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
            0 if problem.mask is None else mask.stride(0), key_categories.stride(0),
            problem.scale, num_warps=spec.num_warps(None if spec.interpret else device_arch(device)),
            num_stages=NUM_STAGES,
            **spec.constexprs(),
        )
    best = out[0] if splits == 1 else out.permute(1, 2, 0, 3).flatten(2).topk(k, dim=-1).values
    return positions_of(best, length)


def positions_of(best: torch.Tensor, length: int):
    """(positions in ascending order, counts) from keys in descending order."""
    valid = best != EMPTY_KEY
    positions = torch.where(valid, best & ((1 << POSITION_BITS) - 1), length)
    positions = positions.sort(dim=-1).values.clamp_(max=max(length - 1, 0))
    return positions, valid.sum(-1)
