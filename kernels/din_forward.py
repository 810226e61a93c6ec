"""The fused forward kernel of the DIN activation unit and attention pooling.

One program owns one history row b, a block of BLOCK_C of its candidates and a range of
its history positions (the whole row unless T is split across programs). It streams the
row's keys in tiles of BLOCK_T positions; each key tile, once loaded, serves every
candidate of the block. Per tile it forms the (position, candidate) pairs, runs the whole
MLP on them on chip, masks, normalizes (an online max/sum for softmax, as FlashAttention
does) and accumulates w^T V. Nothing of size B*C*T*H or B*C*T*4D is written.

The first layer is folded (as the "torch" backend does):
    W_1 [q | k | q-k | q*k] + b_1 = u + k (W_k - W_d)^T + (q*k) W_p^T,
    u = q (W_q + W_d)^T + b_1,
so u is a [B, C, H_1] prologue computed on the host (tiny next to the keys), the key
term is one dot per tile shared by the block's candidates, and the interaction term is one
dot of the [pairs, D] products against W_p^T: the arithmetic of a per-candidate
M = (W_k - W_d) + W_p * q, with one weight operand per dot (tensor cores for any BLOCK_C).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from din_fast.problem import DINProblem, JaggedDINProblem
from .common import (MAX_HIDDEN_LAYERS, NUM_STAGES, TILE_BUDGET, TRITON_DTYPES, activate,
                     cuda_matmul_tf32, device_arch, fold_parameters, interpreting,
                     launch_device, length_stop, mma, padded, program_candidates,
                     split_positions, tile_positions, unit_params)
from .forward_warps import FALLBACK, table_family


@triton.jit
def _hidden_chunk(h, w_ptr, unit_ptr, layer: tl.constexpr, start, H_IN_P: tl.constexpr,
                  H_OUT_P: tl.constexpr, UNIT_W: tl.constexpr, CHUNK: tl.constexpr,
                  ACTIVATION: tl.constexpr, DOT_F32: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """Units start..start+CHUNK of a layer after the first: act(h @ W^T + b).

    w_ptr holds W^T zero-padded to [H_IN_P, H_OUT_P]. Computing a layer in
    column chunks bounds the weight tile held on chip. Padded input units carry
    act(0) != 0 but meet zero weight rows, and padded output units meet zero
    weights downstream.
    """
    offs_in = tl.arange(0, H_IN_P)
    offs_out = start + tl.arange(0, CHUNK)
    w = tl.load(w_ptr + offs_in[:, None] * H_OUT_P + offs_out[None, :])
    bias, a, mu, rstd = unit_params(unit_ptr, layer, start, UNIT_W, CHUNK)
    x = mma(h, w, tl.zeros((h.shape[0], CHUNK), tl.float32), DOT_F32, INPUT_PRECISION)
    return activate(x + bias[None, :], a[None, :], mu[None, :], rstd[None, :], ACTIVATION)


@triton.jit
def _score(h1, w2_ptr, w3_ptr, unit_ptr, wout_ptr, b_out, H2, NUM_LAYERS: tl.constexpr,
           H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
           UNIT_W: tl.constexpr, CHUNK: tl.constexpr, ACTIVATION: tl.constexpr,
           DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The layers after the first and the output layer: the raw score s [pairs].

    Layer 2 runs in chunks of CHUNK units (up to the real width H2), each
    consumed at once: by the output layer (two hidden layers) or as a K slice
    of layer 3's dot (three).
    """
    if NUM_LAYERS == 1:
        s = tl.sum(h1 * tl.load(wout_ptr + tl.arange(0, H1_P))[None, :], axis=1)
    elif NUM_LAYERS == 2:
        s = tl.zeros((h1.shape[0],), tl.float32)
        for start in range(0, H2, CHUNK):
            h2 = _hidden_chunk(h1, w2_ptr, unit_ptr, 1, start, H1_P, H2_P, UNIT_W, CHUNK,
                               ACTIVATION, DOT_F32, INPUT_PRECISION)
            w_out = tl.load(wout_ptr + start + tl.arange(0, CHUNK))
            s += tl.sum(h2 * w_out[None, :], axis=1)
    else:
        offs3 = tl.arange(0, H3_P)
        pre3 = tl.zeros((h1.shape[0], H3_P), tl.float32)
        for start in range(0, H2, CHUNK):
            h2 = _hidden_chunk(h1, w2_ptr, unit_ptr, 1, start, H1_P, H2_P, UNIT_W, CHUNK,
                               ACTIVATION, DOT_F32, INPUT_PRECISION)
            offs2 = start + tl.arange(0, CHUNK)
            w3 = tl.load(w3_ptr + offs2[:, None] * H3_P + offs3[None, :])
            pre3 = mma(h2, w3, pre3, DOT_F32, INPUT_PRECISION)
        bias, a, mu, rstd = unit_params(unit_ptr, 2, 0, UNIT_W, H3_P)
        h3 = activate(pre3 + bias[None, :], a[None, :], mu[None, :], rstd[None, :],
                       ACTIVATION)
        s = tl.sum(h3 * tl.load(wout_ptr + offs3)[None, :], axis=1)
    return s + b_out


@triton.jit
def tile_scores(q_row, k_row, u_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, b_out,
                b, C, D, H2, offs_t, t_valid, offs_c, c_ok, stride_kt, scale,
                ACTIVATION: tl.constexpr, NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr,
                H3_P: tl.constexpr, UNIT_W: tl.constexpr, CHUNK: tl.constexpr):
    """scale * s [BLOCK_T, BLOCK_C]: the activation unit's scores of one tile
    of (position, candidate) pairs, positions offs_t of the row at k_row (keys
    read where t_valid) against candidates offs_c (c_ok) of the row at q_row.
    What the forward and the top-K search (din_search.py) both compute; the
    invalid pairs hold the scores of zero keys, for the caller to mask.
    """
    PAIRS: tl.constexpr = BLOCK_T * BLOCK_C
    offs_h1 = tl.arange(0, H1_P)
    # Layer 1 on the BLOCK_T x BLOCK_C pairs (position-major), D in chunks.
    pre_pair = tl.zeros((PAIRS, H1_P), tl.float32)
    if BLOCK_C > 1:
        pre_key = tl.zeros((BLOCK_T, H1_P), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        k = tl.load(k_row + offs_t[:, None] * stride_kt + offs_d[None, :],
                    mask=t_valid[:, None] & d_ok[None, :], other=0.0)
        q = tl.load(q_row + offs_d[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        w_off = offs_d[:, None] * H1_P + offs_h1[None, :]
        wp = tl.load(wp_ptr + w_off)
        wa = tl.load(wa_ptr + w_off)
        qk = k[:, None, :].to(tl.float32) * q[None, :, :].to(tl.float32)
        pre_pair = mma(tl.reshape(qk, (PAIRS, BLOCK_D)), wp, pre_pair, DOT_F32,
                        INPUT_PRECISION)
        if BLOCK_C > 1:
            pre_key = mma(k, wa, pre_key, DOT_F32, INPUT_PRECISION)
        else:
            # One candidate: pairs are positions, one accumulator serves both.
            pre_pair = mma(k, wa, pre_pair, DOT_F32, INPUT_PRECISION)
    # Per-unit vectors are reloaded per tile (L1 hits): kept live across
    # the loop they would cost more registers than the tiles themselves.
    u = tl.load(u_ptr + (b * C + offs_c)[:, None] * H1_P + offs_h1[None, :],
                mask=c_ok[:, None], other=0.0)
    _, a1, mu1, rstd1 = unit_params(unit_ptr, 0, 0, UNIT_W, H1_P)
    if BLOCK_C > 1:
        pre = tl.reshape(pre_pair, (BLOCK_T, BLOCK_C, H1_P)) + pre_key[:, None, :] \
            + u[None, :, :]
        pre = tl.reshape(pre, (PAIRS, H1_P))
    else:
        pre = pre_pair + u
    h1 = activate(pre, a1[None, :], mu1[None, :], rstd1[None, :], ACTIVATION)
    s = _score(h1, w2_ptr, w3_ptr, unit_ptr, wout_ptr, b_out, H2, NUM_LAYERS, H1_P, H2_P,
               H3_P, UNIT_W, CHUNK, ACTIVATION, DOT_F32, INPUT_PRECISION)
    return tl.reshape(s, (BLOCK_T, BLOCK_C)) * scale


@triton.jit
def din_forward_kernel(
    q_ptr, u_ptr, k_ptr, v_ptr, len_ptr, mask_ptr,
    wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr,
    pooled_ptr, scores_ptr, max_ptr, sum_ptr,
    B, C, T, D, DV, H2, t_per_split, L,
    stride_qb, stride_qc, stride_kb, stride_kt, stride_vb, stride_vt, stride_mb,
    scale,
    ACTIVATION: tl.constexpr, SOFTMAX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_SCORES: tl.constexpr, NUM_LAYERS: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    JAGGED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    DV_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
    UNIT_W: tl.constexpr, CHUNK: tl.constexpr,
):
    """Grid (B * cdiv(C, BLOCK_C), splits).

    Inputs: q [B, C, D], keys [B, T, D], values [B, T, DV], lengths [B] int64
    or mask [B, T] uint8, and the parameters of FoldedParameters, zero-padded to
    the tile widths (X_P) so that their loads need no masks and vectorize.
    Outputs: pooled [S, B, C, DV], max / sum [S, B, C] float32 (S = splits),
    scores [B, C, T] float32: scale*s where valid, else 0 (None) or -inf
    (softmax, normalized by the host with the row stats).
    With SPLIT, pooled is the unnormalized float32 partial of this split.

    JAGGED: keys [L, D] and values [L, DV] hold the rows back to back, row b at
    positions offsets[b]:offsets[b + 1] (len_ptr: offsets [B + 1] int64, read
    with HAS_LENGTHS, each clamped into [0, L] and the end to at least the
    start); T is the longest row the launch allows, stride_kb and stride_vb
    are unused, and scores are jagged [L, C] (nothing past a row). L is unused
    by the padded layout.
    """
    split = tl.program_id(1)
    b, offs_c, c_ok = program_candidates(C, BLOCK_C)
    offs_dv = tl.arange(0, DV_P)
    dv_ok = offs_dv < DV

    # The positions this program owns, and the row's valid prefix.
    t_lo, t_hi = split_positions(T, t_per_split)
    if JAGGED:
        # 64-bit row start and end, clamped into the L rows (whatever the
        # offsets hold, nothing is read outside keys and values); the length
        # then to [0, T] as lengths are below.
        row0 = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L)
        row_end = tl.minimum(tl.maximum(tl.load(len_ptr + b + 1), row0), L)
        n = tl.minimum(row_end - row0, T).to(tl.int32)
        t_stop = tl.maximum(tl.minimum(t_hi, n), 0)
    elif HAS_LENGTHS:
        t_stop = length_stop(len_ptr, b, t_hi, T)
    else:
        t_stop = t_hi

    b_out = tl.load(bout_ptr)

    row_max = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_C,), tl.float32)
    acc = tl.zeros((BLOCK_C, DV_P), tl.float32)
    q_row = q_ptr + b * stride_qb + offs_c[:, None] * stride_qc
    if JAGGED:
        k_row = k_ptr + row0 * stride_kt
        v_row = v_ptr + row0 * stride_vt
        scores_row = scores_ptr + row0 * C + offs_c[None, :]
    else:
        k_row = k_ptr + b * stride_kb
        v_row = v_ptr + b * stride_vb
        scores_row = scores_ptr + (b * C + offs_c)[None, :].to(tl.int64) * T

    for t0 in range(t_lo, t_stop, BLOCK_T):
        offs_t, t_valid = tile_positions(t0, t_stop, mask_ptr, b, stride_mb, HAS_MASK, BLOCK_T)

        s = tile_scores(q_row, k_row, u_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr,
                        b_out, b, C, D, H2, offs_t, t_valid, offs_c, c_ok, stride_kt, scale,
                        ACTIVATION, NUM_LAYERS, DOT_F32, INPUT_PRECISION, BLOCK_C, BLOCK_T,
                        BLOCK_D, H1_P, H2_P, H3_P, UNIT_W, CHUNK)

        valid = t_valid[:, None] & c_ok[None, :]
        if SOFTMAX:
            s = tl.where(valid, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=0))
            # exp base 0 while a candidate has seen no valid position: keeps
            # exp(-inf - base) = 0 instead of NaN.
            base = tl.where(new_max == float("-inf"), 0.0, new_max)
            w = tl.exp(s - base[None, :])
            rescale = tl.exp(row_max - base)
            row_sum = row_sum * rescale + tl.sum(w, axis=0)
            acc = acc * rescale[:, None]
            row_max = new_max
        else:
            s = tl.where(valid, s, 0.0)
            w = s
        v = tl.load(v_row + offs_t[:, None] * stride_vt + offs_dv[None, :],
                    mask=t_valid[:, None] & dv_ok[None, :], other=0.0)
        if BLOCK_C >= 16:
            acc = mma(tl.trans(w), v, acc, DOT_F32, INPUT_PRECISION)
        else:
            # Too few candidates for a tensor-core tile: a broadcast sum.
            acc += tl.sum(w[:, :, None] * v[:, None, :].to(tl.float32), axis=0)
        if NEED_SCORES:
            if JAGGED:
                score_ptrs = scores_row + offs_t[:, None] * C
            else:
                score_ptrs = scores_row + offs_t[:, None]
            tl.store(score_ptrs, s,
                     mask=(offs_t[:, None] < t_stop) & c_ok[None, :])

    if NEED_SCORES and not JAGGED:
        # Positions past the row's length are skipped above but still written.
        if SOFTMAX:
            fill = float("-inf")
        else:
            fill = 0.0
        for t0 in range(tl.maximum(t_lo, t_stop), t_hi, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tl.store(scores_row + offs_t[:, None],
                     tl.full((BLOCK_T, BLOCK_C), fill, tl.float32),
                     mask=(offs_t[:, None] < t_hi) & c_ok[None, :])

    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    if SOFTMAX and not SPLIT:
        acc = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    out = (split * B + b) * C + offs_c
    tl.store(pooled_ptr + out[:, None] * DV + offs_dv[None, :], acc,
             mask=c_ok[:, None] & dv_ok[None, :])
    if SOFTMAX:
        tl.store(max_ptr + out, row_max, mask=c_ok)
        tl.store(sum_ptr + out, row_sum, mask=c_ok)


# ---------------------------------------------------------------------------
# Host side: specialization, parameter folding, launch.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ForwardSpec:
    """Everything that selects one compiled forward kernel."""

    dtype: torch.dtype
    activation: str
    softmax: bool
    has_lengths: bool
    has_mask: bool
    need_scores: bool
    hidden: tuple
    embed_dim: int
    value_dim: int
    candidates: int
    split: bool
    interpret: bool = False
    tf32: bool = False
    jagged: bool = False

    def blocks(self):
        """(BLOCK_C, BLOCK_T, BLOCK_D, CHUNK).

        The [pairs, units] tiles and the weight tiles (first layer: BLOCK_D x
        H1, later layers: H_in x CHUNK) each stay within the tile budget, and
        the [pairs, BLOCK_D] key products within a quarter of it, except that
        no tile is narrower than 16 (the tl.dot minimum). IEEE float32 dots run
        on the FMA units with their operands in registers: half the budget.
        """
        budget = self._budget()
        widths = [padded(h) for h in self.hidden]
        widest = self._widest()
        block_c = min(16, triton.next_power_of_2(self.candidates))
        while block_c > 1 and 16 * block_c * widest > budget:
            block_c //= 2
        block_t = min(128, max(16, budget // (block_c * widest)))
        pairs = block_t * block_c
        block_d = max(16, min(padded(self.embed_dim), budget // widths[0], budget // (4 * pairs)))
        chunk = max(16, min(widths[1] if len(widths) > 1 else 16, budget // widths[0]))
        return block_c, block_t, block_d, chunk

    def _budget(self) -> int:
        return TILE_BUDGET // 2 if self.dtype == torch.float32 else TILE_BUDGET

    def _widest(self) -> int:
        return max([padded(h) for h in self.hidden] + [padded(self.value_dim)])

    def warp_choices(self) -> tuple:
        """(preferred, other) warp counts; the launcher takes the other one
        where the warp table lists the spec for the device's family (num_warps).

        Preferred: four warps, eight only for a [pairs, units] tile over the
        budget (at the 16-row minimum), so each thread holds at most
        budget / 128 of its elements. With either count, ptxas (under
        Triton's .reqntid) may move a few loop-invariant values to the stack to
        fit one more program per SM, and which configurations it does that to
        does not follow from the tile sizes: with triton 3.9, 52 of the 1008
        kernels of the compile grid spilled 8-32 bytes at the preferred count,
        and moving float32 kernels to the other count spilled about as many
        others (one in ten). The other count is the fallback; every kernel of
        the grid compiles spill-free with one of the two, and the compile
        report writes down which (forward_warps.py).
        """
        block_c, block_t = self.blocks()[:2]
        if block_c * block_t * self._widest() <= self._budget():
            return (4, 8)
        return (8, 4)

    def num_warps(self, arch=None) -> int:
        """The warp count for sm_<arch>, from the spec alone: the preferred
        one, or the other where the compile report found the preferred one
        spilling on that architecture family and the other clean (the table
        it writes, forward_warps.FALLBACK). The preferred count when arch is
        None (the interpreter) or outside the table's families."""
        preferred, other = self.warp_choices()
        if arch is not None and self.key() in FALLBACK.get(table_family(arch), ()):
            return other
        return preferred

    def key(self) -> str:
        """A name for the compiled kernel: a hash of everything that selects it
        (argument types, constants, alignment), the warp table's key."""
        selected = (sorted(self.signature().items()), sorted(self.constexprs().items()),
                    self.aligned())
        return hashlib.sha1(repr(selected).encode()).hexdigest()[:16]

    def constexprs(self) -> dict:
        block_c, block_t, block_d, chunk = self.blocks()
        widths = [padded(h) for h in self.hidden] + [16] * (MAX_HIDDEN_LAYERS - len(self.hidden))
        if self.dtype == torch.float32:
            precision = "tf32" if self.tf32 else "ieee"
        else:
            precision = "ieee"
        return dict(
            ACTIVATION=self.activation, SOFTMAX=self.softmax, HAS_LENGTHS=self.has_lengths,
            HAS_MASK=self.has_mask, NEED_SCORES=self.need_scores, NUM_LAYERS=len(self.hidden),
            SPLIT=self.split, DOT_F32=self.interpret, INPUT_PRECISION=precision,
            JAGGED=self.jagged,
            BLOCK_C=block_c, BLOCK_T=block_t, BLOCK_D=block_d, DV_P=padded(self.value_dim),
            H1_P=widths[0], H2_P=widths[1], H3_P=widths[2], UNIT_W=max(widths), CHUNK=chunk,
        )

    def signature(self) -> dict:
        """Argument types for triton.compile (the AOT compile report)."""
        io = "*" + TRITON_DTYPES[self.dtype]
        pointers = dict(q_ptr=io, u_ptr="*fp32", k_ptr=io, v_ptr=io, len_ptr="*i64",
                        mask_ptr="*u8", wp_ptr=io, wa_ptr=io, w2_ptr=io, w3_ptr=io,
                        unit_ptr="*fp32", wout_ptr="*fp32", bout_ptr="*fp32",
                        pooled_ptr="*fp32" if self.split else io, scores_ptr="*fp32",
                        max_ptr="*fp32", sum_ptr="*fp32")
        ints = ("B C T D DV H2 t_per_split L stride_qb stride_qc stride_kb "
                "stride_kt stride_vb stride_vt stride_mb").split()
        return {**pointers, **{name: "i32" for name in ints}, "scale": "fp32",
                **{name: "constexpr" for name in self.constexprs()}}

    def aligned(self) -> tuple:
        """Arguments a launch sees as multiples of 16, as Triton's JIT specializes them.

        Pointers from torch are 16-byte aligned; the row strides are when D
        (and Dv) are multiples of 16 (T assumed so as well).
        """
        names = [name for name, kind in self.signature().items() if kind.startswith("*")]
        if self.embed_dim % 16 == 0:
            names += ["D", "stride_qb", "stride_qc", "stride_kb", "stride_kt"]
        if self.value_dim % 16 == 0:
            names += ["DV", "stride_vb", "stride_vt"]
        return tuple(names + ["T", "stride_mb"])


def forward_spec(problem, need_scores: bool, split: bool) -> ForwardSpec:
    """The specialization for a DINProblem or a JaggedDINProblem (offsets read
    as lengths, never a mask)."""
    jagged = isinstance(problem, JaggedDINProblem)
    query = problem.query
    return ForwardSpec(
        dtype=query.dtype, activation=problem.activation,
        softmax=problem.normalization == "softmax",
        has_lengths=jagged or problem.lengths is not None,
        has_mask=not jagged and problem.mask is not None, need_scores=need_scores,
        hidden=problem.hidden_units, embed_dim=query.shape[2],
        value_dim=problem.value_tensor.shape[-1], candidates=query.shape[1], split=split,
        interpret=interpreting(),
        tf32=query.is_cuda and cuda_matmul_tf32(), jagged=jagged,
    )


def choose_splits(programs: int, length: int, block_t: int, device: torch.device) -> int:
    """How many programs share one row's positions (flash-decoding).

    Only when the B * C blocks cannot fill the GPU and each split still gets
    several tiles; the interpreter never splits unless asked.
    """
    if device.type != "cuda":
        return 1
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(length, block_t)
    if programs >= target or tiles < 8:
        return 1
    return max(1, min(triton.cdiv(target, programs), tiles // 4))


def combine_splits(partial, part_max, part_sum):
    """Merge softmax partials of the splits [S, B, C, ...]: (pooled, row_max, row_sum)."""
    seen = torch.where(part_sum > 0, part_max, torch.full_like(part_max, float("-inf")))
    row_max = seen.amax(0)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    factor = torch.exp(seen - row_max)
    row_sum = (part_sum * factor).sum(0)
    pooled = (partial * factor[..., None]).sum(0)
    return pooled / torch.where(row_sum > 0, row_sum, 1.0)[..., None], row_max, row_sum


def normalize_scores(raw, row_max, row_sum):
    """Softmax weights from the kernel's scaled scores (-inf where invalid); the
    statistics broadcast against raw without its last axis."""
    weights = torch.exp(raw - row_max[..., None])
    return weights / torch.where(row_sum > 0, row_sum, 1.0)[..., None]


def allocate(shape, dtype, device) -> torch.Tensor:
    """Every output buffer of din_forward comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def din_forward(problem: DINProblem, need_scores: bool, num_splits=None):
    """Run the fused forward on a validated problem.

    Returns (pooled [B, C, Dv] in the keys' dtype, w [B, C, T] float32 or None,
    row_max [B, C] float32, row_sum [B, C] float32). For softmax, row_max is
    the max over valid t of scale*s (0 for a row with no valid position) and
    row_sum the sum over valid t of exp(scale*s - row_max) (0 for none): the
    statistics the backward recomputes the weights from. For
    normalization=None both are empty.
    """
    keys = problem.keys.contiguous()
    values = problem.value_tensor.contiguous()
    mask = problem.mask.contiguous().view(torch.uint8) if problem.mask is not None else None
    batch, length = keys.shape[:2]
    lengths = None if problem.lengths is None else problem.lengths.contiguous()
    pooled, scores, row_max, row_sum = _launch(
        problem, keys, values, lengths, mask, length,
        (keys.stride(0), values.stride(0), 0 if mask is None else mask.stride(0)),
        (batch, problem.query.shape[1], length), need_scores, num_splits)
    if need_scores and problem.normalization == "softmax":
        scores = normalize_scores(scores, row_max, row_sum)
    return pooled, scores, row_max, row_sum


def din_forward_jagged(problem: JaggedDINProblem, need_scores: bool, num_splits=None):
    """din_forward on jagged histories, read in place: row b is positions
    offsets[b]:offsets[b + 1] of keys_values [L, D] (and values [L, Dv]).

    Returns (pooled [B, C, Dv] in the keys' dtype, w [L, C] float32 or None,
    row_max, row_sum) with din_forward's meaning of the statistics.
    """
    keys = problem.keys_values.contiguous()
    values = problem.value_tensor.contiguous()
    # No row is longer than max_len, nor than all positions together.
    length = min(problem.max_len, keys.shape[0])
    pooled, scores, row_max, row_sum = _launch(
        problem, keys, values, problem.offsets.contiguous(), None, length, (0, 0, 0),
        (keys.shape[0], problem.query.shape[1]), need_scores, num_splits)
    if need_scores and problem.normalization == "softmax":
        rows = problem.row_ids()
        scores = normalize_scores(scores[..., None], row_max[rows], row_sum[rows])[..., 0]
    return pooled, scores, row_max, row_sum


def _launch(problem, keys, values, lengths, mask, length, row_strides, scores_shape,
            need_scores, num_splits):
    """The launch behind both layouts: (pooled, raw scores or None, row_max, row_sum).

    keys / values are contiguous with positions on dim -2; lengths is the
    lengths [B] (padded) or the offsets [B + 1] (jagged), mask uint8 [B, T] or
    None; length is the longest row (T); row_strides = (stride_kb, stride_vb,
    stride_mb), unused by the jagged layout.
    """
    query = problem.query.contiguous()
    batch, candidates, embed_dim = query.shape
    value_dim = values.shape[-1]
    hidden = problem.hidden_units
    device = keys.device
    softmax = problem.normalization == "softmax"
    f32 = torch.float32
    if batch * candidates == 0 or length == 0:
        # No (candidate, position) pair: every output is zero (and empty
        # shapes need no specialization, whose tile sizes divide by them).
        stats = query.new_zeros((batch, candidates) if softmax else (0,), dtype=f32)
        scores = query.new_zeros(scores_shape, dtype=f32) if need_scores else None
        return (query.new_zeros(batch, candidates, value_dim, dtype=keys.dtype), scores,
                stats, stats.clone())

    spec = forward_spec(problem, need_scores, split=False)
    block_c, block_t, block_d = spec.blocks()[:3]
    programs = batch * triton.cdiv(candidates, block_c)
    splits = num_splits or choose_splits(programs, length, block_t, device)
    t_per_split = triton.cdiv(triton.cdiv(max(length, 1), block_t), splits) * block_t
    splits = triton.cdiv(max(length, 1), t_per_split)
    if splits > 1:
        spec = forward_spec(problem, need_scores, split=True)
    constexprs = spec.constexprs()
    num_warps = spec.num_warps(None if spec.interpret else device_arch(device))

    folded = fold_parameters(problem, block_d)
    deeper = folded.deeper + [folded.w_p] * (MAX_HIDDEN_LAYERS - 1 - len(folded.deeper))
    # Absent lengths / mask: one-element placeholders the kernel never reads.
    if lengths is None:
        lengths = keys.new_zeros(1, dtype=torch.int64)
    if mask is None:
        mask = keys.new_zeros(1, dtype=torch.uint8)

    # normalization=None has no row stats: one-element placeholders, never read.
    stats_shape = (splits, batch, candidates) if softmax else (1,)
    pooled = allocate((splits, batch, candidates, value_dim),
                      f32 if splits > 1 else keys.dtype, device)
    part_max = allocate(stats_shape, f32, device)
    part_sum = allocate(stats_shape, f32, device)
    scores = allocate(scores_shape, f32, device) if need_scores else part_max
    stride_kb, stride_vb, stride_mb = row_strides
    with launch_device(device):
        wrap_triton(din_forward_kernel)[(programs, splits)](
            query, folded.u, keys, values, lengths, mask,
            folded.w_p, folded.w_a, deeper[0], deeper[1], folded.unit, folded.w_out,
            folded.b_out, pooled, scores, part_max, part_sum,
            batch, candidates, length, embed_dim, value_dim,
            hidden[1] if len(hidden) > 1 else 1, t_per_split, keys.shape[0],
            query.stride(0), query.stride(1), stride_kb, keys.stride(-2),
            stride_vb, values.stride(-2), stride_mb,
            problem.scale, num_warps=num_warps, num_stages=NUM_STAGES, **constexprs,
        )
    if not softmax:
        pooled = pooled.sum(0) if splits > 1 else pooled[0]
        row_max = row_sum = part_max.new_empty(0)
    elif splits > 1:
        pooled, row_max, row_sum = combine_splits(pooled, part_max, part_sum)
    else:
        pooled, row_max, row_sum = pooled[0], part_max[0], part_sum[0]
    return pooled.to(keys.dtype), (scores if need_scores else None), row_max, row_sum
