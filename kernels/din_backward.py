"""The fused backward of the DIN activation unit + attention pooling.

FlashAttention's method, taken one step further: nothing of the forward is
stored, not even the softmax statistics (each kernel recomputes the max, the
normalizer and the row term delta itself, in a first pass over the row). The
kernels recompute the MLP tile by tile from the keys, with the forward's folded
parameters, and run the chain rule on the spot, so no [B, C, T, H] or
[B, C, T, 4D] tensor ever reaches memory. Positions past a row's length are
skipped (their gradients are zero), as in the forward.

One program owns whole rows (a persistent grid: rows pid, pid + P, ...), so
the key and value gradients of a row, summed over its candidates, are written
by one program only, and its candidates share the row's key tiles from
cache. The weight gradients, summed over every (b, c, t), are accumulated per
row in float32, added to the program's own partial when the row is done, and
the partials are reduced in a fixed order on the host. No atomics: two
backward passes give bitwise-identical gradients.

What stays on chip for a whole pass is the gradient accumulators. When they
add up to at most TILE_BUDGET elements, one kernel computes every gradient
(din_backward_kernel). Past that the backward is split into passes, one
kernel each (BackwardSpec.launches): din_backward_inputs_kernel (dk, dv, the
output layer, the first layer's unit parameters),
din_backward_first_layer_kernel (the first layer's weight sums; one launch per
block of key columns when wide) and, with two or three hidden layers,
din_backward_deeper_kernel (the later layers' sums). Each recomputes the
forward and keeps one kind of accumulator live, and ptxas keeps every one of
them within the register file (python -m din_fast.kernels.aot) at the cost of
the recompute: the split trades arithmetic, which the tiles have to spare, for
not spilling. The weight tiles (M, W_i, W_i^T) are reloaded per tile from
L1/L2 rather than held: staged once in registers they would spill. The walk
over rows, candidates and tiles that every kernel takes is in
backward_steps; the kernels here say what each one keeps.

The first layer goes through the fold z1 = u + k M^T, u = (W_q + W_d) q + b_1,
M = (W_k - W_d) + W_p * q. Per (b, c) the kernels accumulate
P = sum_t dz1_t k_t^T ([H_1, D]) and G = sum_t dz1_t ([H_1]); everything else
of the first layer follows from them:
    dW_q = sum G q^T,  dW_k = sum P,  dW_d = dW_q - dW_k,  dW_p = sum P * q,
    db_1 = sum G,      dq = (W_q + W_d)^T G + colsum(W_p * P),  dk_t = M^T dz1_t.

The kernels' arguments (each takes those its pass uses; grid (P,)):
    inputs   q [B, C, D], u [B, C, H1_P] float32, k [B, T, D], v [B, T, DV]
             (k itself when the values are the keys), lengths [B] int64,
             mask [B, T] uint8, contiguous; the folded parameters padded to the
             tile widths: wp and wa are W_p and W_k - W_d as [H1_P, D_P] rows of
             units in the inputs' dtype, w2 and w3 are W_i^T in float32, unit
             [L, 4, UNIT_W] (bias, a, mu, rstd), wout [HL_P], bout [1];
             dout [B, C, DV] = d loss / d pooled, gs [B, C, T] = d loss / d w;
             m_scratch [P, H1_P, D_P] in the inputs' dtype, each program's slot
             for its candidate's M.
    outputs  dq [B, C, D_P] float32 (the W_p term only), dk [B, T, D] and
             dv [B, T, DV] (float32 when C > 1: the candidates add up in
             place), G [B, C, H1_P] float32; per program float32 partials,
             padded, starting at zero: part_k and part_qk [P, H1_P, D_P] (sum
             of dz1 k^T and of dz1 (q*k)^T), part_w2 [P, H1_P, H2_P] and
             part_w3 [P, H2_P, H3_P] (W_2^T, W_3^T), part_unit [P, L, 4,
             UNIT_W] (bias, a, mu, var), part_out [P, HL_P + 1] (W_out, then
             b_out).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from din_fast.problem import DINProblem, split_first_layer

from .backward_steps import (add_layer_grads, add_output_grads, add_unit_grads,
                             first_layer_tile, hidden_layers_backward, output_layer_tile,
                             program_mlp, recompute_tile, start_candidate, start_row,
                             store_first_layer_sums, store_key_value_grads, unit_backward,
                             zero_layer_grads, zero_past_length, zero_unit_grads)
from .common import (MAX_HIDDEN_LAYERS, NUM_STAGES, TILE_BUDGET, TRITON_DTYPES,
                     fold_parameters, interpreting, launch_device, padded)


@triton.jit
def din_backward_kernel(
    q_ptr, u_ptr, k_ptr, v_ptr, len_ptr, mask_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr,
    wout_ptr, bout_ptr, dout_ptr, gs_ptr, m_scratch_ptr,
    dq_ptr, dk_ptr, dv_ptr, g_ptr,
    part_k_ptr, part_qk_ptr, part_w2_ptr, part_w3_ptr, part_unit_ptr, part_out_ptr,
    B, C, T, D, DV, scale,
    ACTIVATION: tl.constexpr, SOFTMAX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
    MULTI_CANDIDATE: tl.constexpr, NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
    D_P: tl.constexpr, DV_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr,
    H3_P: tl.constexpr, HL_P: tl.constexpr, UNIT_W: tl.constexpr,
):
    """Every gradient in one pass, for MLPs whose accumulators fit on chip together."""
    programs = tl.num_programs(0)
    history = (k_ptr, v_ptr, mask_ptr, gs_ptr, T, D, DV)
    mlp = program_mlp(m_scratch_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr, D_P, H1_P,
                      HL_P)
    for b in range(tl.program_id(0), B, programs):
        b64, t_stop = start_row(len_ptr, b, T, HAS_LENGTHS)
        zero_past_length(dk_ptr, dv_ptr, b64, t_stop, T, D, DV, VALUES_ARE_KEYS, BLOCK_T, D_P,
                         DV_P)
        # The row's sums of the weight gradients (over its candidates and
        # positions), added to this program's partials once the row is done.
        acc_b1, acc_a1, acc_mu1, acc_var1 = zero_unit_grads(H1_P)
        out_sums = (tl.zeros((HL_P,), tl.float32), tl.zeros((1,), tl.float32))
        grads2 = zero_layer_grads(H1_P, H2_P) if NUM_LAYERS >= 2 else ()
        grads3 = zero_layer_grads(H2_P, H3_P) if NUM_LAYERS >= 3 else ()
        for c in range(0, C):
            cand = start_candidate(q_ptr, u_ptr, wa_ptr, wp_ptr, dout_ptr, history, mlp, b64,
                                   b64 * C + c, t_stop, scale, SOFTMAX, HAS_MASK,
                                   HAS_GRAD_SCORES, VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION,
                                   BLOCK_T, D_P, DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32,
                                   INPUT_PRECISION)
            acc_p = tl.zeros((H1_P, D_P), tl.float32)
            acc_g = tl.zeros((H1_P,), tl.float32)
            for t0 in range(0, t_stop, BLOCK_T):
                tile = recompute_tile(t0, history, mlp, cand, SOFTMAX, HAS_MASK, HAS_GRAD_SCORES,
                                      VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION, BLOCK_T, D_P,
                                      DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32, INPUT_PRECISION)
                out_sums = output_layer_tile(out_sums, tile)
                dh, grads2, grads3 = hidden_layers_backward(
                    tile, mlp, grads2, grads3, True, True, NUM_LAYERS, ACTIVATION, BLOCK_T,
                    H1_P, H2_P, H3_P, UNIT_W, DOT_F32, GRAD_PRECISION)
                dz1, da1, dmu1, dvar1 = unit_backward(tile[5], dh, unit_ptr, 0, UNIT_W, H1_P,
                                                      ACTIVATION)
                acc_p, acc_g = first_layer_tile(acc_p, acc_g, dz1, tile, history, cand, 0, D_P,
                                                D_P, DOT_F32, INPUT_PRECISION)
                acc_a1 += da1
                acc_mu1 += dmu1
                acc_var1 += dvar1
                store_key_value_grads(dk_ptr, dv_ptr, dz1, tile, history, mlp, cand, c,
                                      VALUES_ARE_KEYS, MULTI_CANDIDATE, BLOCK_T, D_P, DV_P,
                                      H1_P, DOT_F32, INPUT_PRECISION)
            # This program's partials, indexed by b % P (== pid): addresses
            # computed from the loop variable are not hoisted out of the
            # loops, where they would be held in registers (or spilled).
            store_first_layer_sums(q_ptr, wp_ptr, dq_ptr, g_ptr, part_k_ptr, part_qk_ptr,
                                   acc_p, acc_g, history, cand, b % programs, 0, D_P, D_P,
                                   H1_P)
            acc_b1 += acc_g
        slot = b % programs
        part_unit = part_unit_ptr + slot * NUM_LAYERS * 4 * UNIT_W
        add_unit_grads(part_unit, 0, acc_b1, acc_a1, acc_mu1, acc_var1, UNIT_W, H1_P)
        add_output_grads(part_out_ptr, slot, out_sums, HL_P)
        if NUM_LAYERS >= 2:
            add_layer_grads(part_w2_ptr + slot * H1_P * H2_P, part_unit, 1, grads2, H1_P, H2_P,
                            UNIT_W)
        if NUM_LAYERS >= 3:
            add_layer_grads(part_w3_ptr + slot * H2_P * H3_P, part_unit, 2, grads3, H2_P, H3_P,
                            UNIT_W)


@triton.jit
def din_backward_inputs_kernel(
    q_ptr, u_ptr, k_ptr, v_ptr, len_ptr, mask_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr,
    wout_ptr, bout_ptr, dout_ptr, gs_ptr, m_scratch_ptr,
    dk_ptr, dv_ptr, part_unit_ptr, part_out_ptr,
    B, C, T, D, DV, scale,
    ACTIVATION: tl.constexpr, SOFTMAX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
    MULTI_CANDIDATE: tl.constexpr, NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, GRAD_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
    D_P: tl.constexpr, DV_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr,
    H3_P: tl.constexpr, HL_P: tl.constexpr, UNIT_W: tl.constexpr,
):
    """The split backward's first pass: dk, dv, the output layer's W_out and
    b_out, and the first layer's unit parameters (a, mu, var)."""
    programs = tl.num_programs(0)
    history = (k_ptr, v_ptr, mask_ptr, gs_ptr, T, D, DV)
    mlp = program_mlp(m_scratch_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr, D_P, H1_P,
                      HL_P)
    for b in range(tl.program_id(0), B, programs):
        b64, t_stop = start_row(len_ptr, b, T, HAS_LENGTHS)
        zero_past_length(dk_ptr, dv_ptr, b64, t_stop, T, D, DV, VALUES_ARE_KEYS, BLOCK_T, D_P,
                         DV_P)
        no_bias, acc_a1, acc_mu1, acc_var1 = zero_unit_grads(H1_P)
        out_sums = (tl.zeros((HL_P,), tl.float32), tl.zeros((1,), tl.float32))
        for c in range(0, C):
            cand = start_candidate(q_ptr, u_ptr, wa_ptr, wp_ptr, dout_ptr, history, mlp, b64,
                                   b64 * C + c, t_stop, scale, SOFTMAX, HAS_MASK,
                                   HAS_GRAD_SCORES, VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION,
                                   BLOCK_T, D_P, DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32,
                                   INPUT_PRECISION)
            for t0 in range(0, t_stop, BLOCK_T):
                tile = recompute_tile(t0, history, mlp, cand, SOFTMAX, HAS_MASK, HAS_GRAD_SCORES,
                                      VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION, BLOCK_T, D_P,
                                      DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32, INPUT_PRECISION)
                out_sums = output_layer_tile(out_sums, tile)
                dh = hidden_layers_backward(tile, mlp, (), (), False, True, NUM_LAYERS,
                                            ACTIVATION, BLOCK_T, H1_P, H2_P, H3_P, UNIT_W,
                                            DOT_F32, GRAD_PRECISION)[0]
                dz1, da1, dmu1, dvar1 = unit_backward(tile[5], dh, unit_ptr, 0, UNIT_W, H1_P,
                                                      ACTIVATION)
                acc_a1 += da1
                acc_mu1 += dmu1
                acc_var1 += dvar1
                store_key_value_grads(dk_ptr, dv_ptr, dz1, tile, history, mlp, cand, c,
                                      VALUES_ARE_KEYS, MULTI_CANDIDATE, BLOCK_T, D_P, DV_P,
                                      H1_P, DOT_F32, INPUT_PRECISION)
        slot = b % programs
        # The first layer's bias comes from G, in the first-layer pass.
        add_unit_grads(part_unit_ptr + slot * NUM_LAYERS * 4 * UNIT_W, 0, no_bias, acc_a1,
                       acc_mu1, acc_var1, UNIT_W, H1_P)
        add_output_grads(part_out_ptr, slot, out_sums, HL_P)


@triton.jit
def din_backward_first_layer_kernel(
    q_ptr, u_ptr, k_ptr, v_ptr, len_ptr, mask_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr,
    wout_ptr, bout_ptr, dout_ptr, gs_ptr, m_scratch_ptr,
    dq_ptr, g_ptr, part_k_ptr, part_qk_ptr, part_unit_ptr,
    B, C, T, D, DV, scale,
    ACTIVATION: tl.constexpr, SOFTMAX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
    NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, D_P: tl.constexpr,
    DV_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
    HL_P: tl.constexpr, UNIT_W: tl.constexpr, FIRST_D0: tl.constexpr, FIRST_DC: tl.constexpr,
):
    """The split backward's first-layer pass over the key columns
    FIRST_D0 + [0, FIRST_DC): the P partials and dq's W_p term on them; the
    launch with FIRST_D0 = 0 also writes G and adds the first bias's sums."""
    programs = tl.num_programs(0)
    history = (k_ptr, v_ptr, mask_ptr, gs_ptr, T, D, DV)
    mlp = program_mlp(m_scratch_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr, D_P, H1_P,
                      HL_P)
    for b in range(tl.program_id(0), B, programs):
        b64, t_stop = start_row(len_ptr, b, T, HAS_LENGTHS)
        acc_b1, no_a, no_mu, no_var = zero_unit_grads(H1_P)
        for c in range(0, C):
            cand = start_candidate(q_ptr, u_ptr, wa_ptr, wp_ptr, dout_ptr, history, mlp, b64,
                                   b64 * C + c, t_stop, scale, SOFTMAX, HAS_MASK,
                                   HAS_GRAD_SCORES, VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION,
                                   BLOCK_T, D_P, DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32,
                                   INPUT_PRECISION)
            acc_p = tl.zeros((H1_P, FIRST_DC), tl.float32)
            acc_g = tl.zeros((H1_P,), tl.float32)
            for t0 in range(0, t_stop, BLOCK_T):
                tile = recompute_tile(t0, history, mlp, cand, SOFTMAX, HAS_MASK, HAS_GRAD_SCORES,
                                      VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION, BLOCK_T, D_P,
                                      DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32, INPUT_PRECISION)
                dh = hidden_layers_backward(tile, mlp, (), (), False, True, NUM_LAYERS,
                                            ACTIVATION, BLOCK_T, H1_P, H2_P, H3_P, UNIT_W,
                                            DOT_F32, GRAD_PRECISION)[0]
                dz1 = unit_backward(tile[5], dh, unit_ptr, 0, UNIT_W, H1_P, ACTIVATION)[0]
                acc_p, acc_g = first_layer_tile(acc_p, acc_g, dz1, tile, history, cand,
                                                FIRST_D0, FIRST_DC, D_P, DOT_F32,
                                                INPUT_PRECISION)
            store_first_layer_sums(q_ptr, wp_ptr, dq_ptr, g_ptr, part_k_ptr, part_qk_ptr,
                                   acc_p, acc_g, history, cand, b % programs, FIRST_D0,
                                   FIRST_DC, D_P, H1_P)
            acc_b1 += acc_g
        if FIRST_D0 == 0:
            add_unit_grads(part_unit_ptr + (b % programs) * NUM_LAYERS * 4 * UNIT_W, 0, acc_b1,
                           no_a, no_mu, no_var, UNIT_W, H1_P)


@triton.jit
def din_backward_deeper_kernel(
    q_ptr, u_ptr, k_ptr, v_ptr, len_ptr, mask_ptr, wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr,
    wout_ptr, bout_ptr, dout_ptr, gs_ptr, m_scratch_ptr,
    part_w2_ptr, part_w3_ptr, part_unit_ptr,
    B, C, T, D, DV, scale,
    ACTIVATION: tl.constexpr, SOFTMAX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
    NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, D_P: tl.constexpr,
    DV_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
    HL_P: tl.constexpr, UNIT_W: tl.constexpr,
):
    """The split backward's last pass (two or three hidden layers): the sums of
    the layers after the first, W_i and their unit vectors."""
    programs = tl.num_programs(0)
    history = (k_ptr, v_ptr, mask_ptr, gs_ptr, T, D, DV)
    mlp = program_mlp(m_scratch_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr, D_P, H1_P,
                      HL_P)
    for b in range(tl.program_id(0), B, programs):
        b64, t_stop = start_row(len_ptr, b, T, HAS_LENGTHS)
        grads2 = zero_layer_grads(H1_P, H2_P)
        grads3 = zero_layer_grads(H2_P, H3_P) if NUM_LAYERS >= 3 else ()
        for c in range(0, C):
            cand = start_candidate(q_ptr, u_ptr, wa_ptr, wp_ptr, dout_ptr, history, mlp, b64,
                                   b64 * C + c, t_stop, scale, SOFTMAX, HAS_MASK,
                                   HAS_GRAD_SCORES, VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION,
                                   BLOCK_T, D_P, DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32,
                                   INPUT_PRECISION)
            for t0 in range(0, t_stop, BLOCK_T):
                tile = recompute_tile(t0, history, mlp, cand, SOFTMAX, HAS_MASK, HAS_GRAD_SCORES,
                                      VALUES_ARE_KEYS, NUM_LAYERS, ACTIVATION, BLOCK_T, D_P,
                                      DV_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32, INPUT_PRECISION)
                chained = hidden_layers_backward(tile, mlp, grads2, grads3, True, False,
                                                 NUM_LAYERS, ACTIVATION, BLOCK_T, H1_P, H2_P,
                                                 H3_P, UNIT_W, DOT_F32, GRAD_PRECISION)
                grads2, grads3 = chained[1], chained[2]
        slot = b % programs
        part_unit = part_unit_ptr + slot * NUM_LAYERS * 4 * UNIT_W
        add_layer_grads(part_w2_ptr + slot * H1_P * H2_P, part_unit, 1, grads2, H1_P, H2_P,
                        UNIT_W)
        if NUM_LAYERS >= 3:
            add_layer_grads(part_w3_ptr + slot * H2_P * H3_P, part_unit, 2, grads3, H2_P, H3_P,
                            UNIT_W)


# ---------------------------------------------------------------------------
# Host side: specialization, launch, the reduction of the partials.
# ---------------------------------------------------------------------------

# A launch's kernel, and which weight-gradient accumulators it holds on chip
# (the first layer's P; the deeper layers' W_i), as BackwardSpec.blocks weighs them.
PARTS = {
    "all": (din_backward_kernel, True, True),
    "inputs": (din_backward_inputs_kernel, False, False),
    "first": (din_backward_first_layer_kernel, True, False),
    "deeper": (din_backward_deeper_kernel, False, True),
}


@dataclass(frozen=True)
class BackwardSpec:
    """Everything that selects one compiled backward kernel."""

    dtype: torch.dtype
    activation: str
    softmax: bool
    has_lengths: bool
    has_mask: bool
    has_grad_scores: bool
    values_are_keys: bool
    hidden: tuple
    embed_dim: int
    value_dim: int
    candidates: int
    interpret: bool = False
    part: str = "all"       # which pass this launch runs: a key of PARTS
    first_d0: int = 0       # a "first" launch's key columns of P: first_d0 + [0, first_dc)
    first_dc: int = 0       # (0: all of them)

    def launches(self) -> list:
        """The backward's launches: one computing everything ("all") when its
        live accumulators fit on chip, else split (see PARTS): the inputs' one,
        the first layer's (in column blocks of P where [H_1, D] is over
        accumulator_budget), and the deeper layers'. Each recomputes the forward."""
        if not self.split_parts():
            return [replace(self, part="all")]
        d_p, h1_p = _weight_tiles(self.embed_dim, self.hidden)[0]
        budget = accumulator_budget(self.dtype)
        # A launch on a block of columns loads that block's key tile too, next
        # to the whole one: its blocks take half the budget.
        columns = d_p if d_p * h1_p <= budget else max(16, budget // (2 * h1_p))
        return ([replace(self, part="inputs")]
                + [replace(self, part="first", first_d0=d0, first_dc=columns)
                   for d0 in range(0, d_p, columns)]
                + [replace(self, part="deeper")] * (len(self.hidden) > 1))

    def split_parts(self) -> bool:
        """One launch holds every accumulator: it fits while they add up to
        at most TILE_BUDGET elements."""
        return sum(n * m for n, m in _weight_tiles(self.embed_dim, self.hidden)) > TILE_BUDGET

    def blocks(self):
        """(BLOCK_T, num_warps).

        The dots form one chain, for which Triton gives every dot the same
        MMA layout with all warps along the rows (units, or D): the right
        operands ([K, BLOCK_T] activation tiles) are then held whole by every
        warp, and so is the [BLOCK_T, N] key tile of the weight-gradient dot.
        Their registers grow with BLOCK_T, the weight tiles stay in shared
        memory: the smallest tile (16, tl.dot's minimum) and eight warps keep
        the loop within 255 registers (python -m din_fast.kernels.aot).
        Four warps where every unit tile has at most 64 rows (one warpgroup's
        MMA tile) and the launch's largest accumulator is within TILE_BUDGET
        (half that for float32 inputs): with eight, ptxas caps such kernels at
        128 registers and spills.
        """
        rows = max(padded(h) for h in self.hidden)
        budget = TILE_BUDGET // 2 if self.dtype == torch.float32 else TILE_BUDGET
        return 16, 4 if rows <= 64 and self.largest_accumulator() <= budget else 8

    def largest_accumulator(self) -> int:
        """Elements of the largest weight-gradient tile this launch keeps on chip."""
        first, *deeper = (n * m for n, m in _weight_tiles(self.embed_dim, self.hidden))
        if self.first_dc:
            first = first * self.first_dc // padded(self.embed_dim)
        first_weights, deeper_weights = PARTS[self.part][1:]
        return max([first * first_weights] + [tile * deeper_weights for tile in deeper])

    @property
    def kernel(self):
        return PARTS[self.part][0]

    def constexprs(self) -> dict:
        """The launch's constexpr arguments: those its kernel takes."""
        widths = [padded(h) for h in self.hidden] + [16] * (MAX_HIDDEN_LAYERS - len(self.hidden))
        # TF32 for float32 inputs (the GPU accuracy bound allows it): with IEEE
        # float32 dots ptxas keeps 32 registers and spills about 10 KB per thread.
        # Half inputs: dz stays float32 (GRAD_PRECISION), in TF32 dots.
        precision = "tf32" if self.dtype == torch.float32 else "ieee"
        every = dict(
            ACTIVATION=self.activation, SOFTMAX=self.softmax, HAS_LENGTHS=self.has_lengths,
            HAS_MASK=self.has_mask, HAS_GRAD_SCORES=self.has_grad_scores,
            VALUES_ARE_KEYS=self.values_are_keys, MULTI_CANDIDATE=self.candidates > 1,
            NUM_LAYERS=len(self.hidden),
            DOT_F32=self.interpret, INPUT_PRECISION=precision,
            GRAD_PRECISION="tf32",
            BLOCK_T=self.blocks()[0],
            D_P=padded(self.embed_dim), DV_P=padded(self.value_dim),
            H1_P=widths[0], H2_P=widths[1], H3_P=widths[2],
            HL_P=widths[len(self.hidden) - 1], UNIT_W=max(widths[:len(self.hidden)]),
            FIRST_D0=self.first_d0, FIRST_DC=self.first_dc or padded(self.embed_dim),
        )
        return {name: value for name, value in every.items() if name in self.kernel.arg_names}

    def signature(self) -> dict:
        """Argument types for triton.compile (the AOT compile report), in the
        kernel's order."""
        io = "*" + TRITON_DTYPES[self.dtype]
        grad = io if self.candidates == 1 else "*fp32"
        types = dict(
            q_ptr=io, u_ptr="*fp32", k_ptr=io, v_ptr=io, len_ptr="*i64", mask_ptr="*u8",
            wp_ptr=io, wa_ptr=io, w2_ptr="*fp32", w3_ptr="*fp32", unit_ptr="*fp32",
            wout_ptr="*fp32", bout_ptr="*fp32", dout_ptr=io, gs_ptr=io, m_scratch_ptr=io,
            dq_ptr="*fp32", dk_ptr=grad, dv_ptr=grad, g_ptr="*fp32",
            **{name: "*fp32" for name in ("part_k_ptr", "part_qk_ptr", "part_w2_ptr",
                                          "part_w3_ptr", "part_unit_ptr", "part_out_ptr")},
            **{name: "i32" for name in "B C T D DV".split()}, scale="fp32",
            **{name: "constexpr" for name in self.constexprs()})
        return {name: types[name] for name in self.kernel.arg_names}

    def aligned(self) -> tuple:
        """Arguments a launch sees as multiples of 16, as Triton's JIT specializes
        them (see ForwardSpec.aligned): every pointer (torch allocations), D
        and Dv when they are multiples of 16, T assumed so as well."""
        names = [name for name, kind in self.signature().items() if kind.startswith("*")]
        names += ["D"] if self.embed_dim % 16 == 0 else []
        names += ["DV"] if self.value_dim % 16 == 0 else []
        return tuple(names + ["T"])


def backward_spec(problem: DINProblem, has_grad_scores: bool) -> BackwardSpec:
    return BackwardSpec(
        dtype=problem.keys.dtype, activation=problem.activation,
        softmax=problem.normalization == "softmax", has_lengths=problem.lengths is not None,
        has_mask=problem.mask is not None, has_grad_scores=has_grad_scores,
        values_are_keys=problem.values is None, hidden=problem.hidden_units,
        embed_dim=problem.keys.shape[2], value_dim=problem.value_tensor.shape[2],
        candidates=problem.query.shape[1], interpret=interpreting(),
    )


def _weight_tiles(embed_dim: int, hidden: tuple) -> list:
    """The padded weight tiles (fan_in, fan_out) of the MLP: [D, H_1], [H_1, H_2], ..."""
    widths = [padded(embed_dim)] + [padded(h) for h in hidden]
    return list(zip(widths[:-1], widths[1:]))


# Key columns (padded D) the fused backward takes: its inputs launch stages
# the [H_1, D] fold and [BLOCK_T, D] key and key-gradient tiles whole.
MAX_KEY_COLUMNS = 128


def accumulator_budget(dtype: torch.dtype) -> int:
    """Elements of the largest gradient accumulator one launch keeps on chip:
    TILE_BUDGET for float32 inputs, twice that for half-precision ones (whose
    operand tiles take half the room)."""
    return TILE_BUDGET if dtype == torch.float32 else 2 * TILE_BUDGET


def backward_unsupported_shape(embed_dim: int, hidden: tuple, dtype: torch.dtype):
    """Why the fused backward cannot run these widths and dtype (None when it can).

    Within these bounds every launch compiles without spills on sm_80 and
    sm_90 (python -m din_fast.kernels.aot checks them): the deeper weight
    tiles within accumulator_budget (one launch holds such a gradient whole);
    the first-layer [D, H_1] tile within twice that for half-precision inputs
    (its gradient is split into column blocks, but the fold M is staged
    whole) and D within MAX_KEY_COLUMNS, within the budget for float32 ones.
    """
    name = str(dtype).replace("torch.", "")
    if len(hidden) > MAX_HIDDEN_LAYERS:
        return f"{len(hidden)} hidden layers (the fused kernels take 1 to {MAX_HIDDEN_LAYERS})"
    budget = accumulator_budget(dtype)
    (d_p, h1_p), *deeper = _weight_tiles(embed_dim, hidden)
    first_budget = budget if dtype == torch.float32 else 2 * budget
    if dtype != torch.float32 and d_p > MAX_KEY_COLUMNS:
        return (f"D={embed_dim} (padded to {d_p}) over the backward's {MAX_KEY_COLUMNS} "
                f"key columns")
    for (fan_in, fan_out), limit in [((d_p, h1_p), first_budget)] + [(t, budget) for t in deeper]:
        if fan_in * fan_out > limit:
            return (f"a padded weight tile of {fan_in} x {fan_out} (D={embed_dim}, "
                    f"hidden={hidden}) over the backward's on-chip budget of {limit} "
                    f"elements for {name} inputs")
    return None


def _num_programs(batch: int, device: torch.device) -> int:
    """Persistent grid: enough programs to fill the GPU, each owning several rows.

    The grid shapes the reduction order, so it depends only on the batch and
    the device: the same call is bitwise repeatable.
    """
    if device.type == "cuda":
        return max(1, min(batch, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(batch, 3))


def _launch_part(part: BackwardSpec, programs: int, arguments: dict) -> None:
    """One launch of the part's kernel, with those of `arguments` (by name) it takes."""
    kernel = part.kernel
    wrap_triton(kernel)[(programs,)](
        **{name: arguments[name] for name in kernel.arg_names if name in arguments},
        num_warps=part.blocks()[1], num_stages=NUM_STAGES, **part.constexprs())


def din_backward(problem: DINProblem, grad_pooled: torch.Tensor,
                 grad_scores: torch.Tensor | None = None):
    """Gradients of din_attention from the fused backward kernel.

    grad_pooled is d loss / d pooled [B, C, Dv]; grad_scores, when the
    weights w were returned and used, is d loss / d w [B, C, T]. Returns
    (dq [B, C, D], dk [B, T, D], dv [B, T, Dv] or None, dweights, dbiases,
    dact_params) in the dtypes of the inputs; dact_params has per layer ()
    / (da,) / (da, dmu, dvar).
    """
    reason = backward_unsupported_shape(problem.keys.shape[2], problem.hidden_units,
                                        problem.keys.dtype)
    if reason is not None:
        raise ValueError(f"din_backward: the fused backward does not support {reason}")
    query, keys = problem.query.contiguous(), problem.keys.contiguous()
    values = problem.value_tensor.contiguous()
    batch, candidates, embed_dim = query.shape
    length, value_dim = keys.shape[1], values.shape[2]
    hidden = problem.hidden_units
    layers = len(hidden)
    device = keys.device
    f32 = dict(dtype=torch.float32, device=device)
    spec = backward_spec(problem, grad_scores is not None)

    constexprs = spec.constexprs()
    d_p = constexprs["D_P"]
    widths = [constexprs[f"H{i}_P"] for i in (1, 2, 3)]     # padded, 16 past the last layer
    folded = fold_parameters(problem, block_d=d_p)
    # W_i^T in float32: the forward recompute rounds them to the inputs' dtype,
    # the backward's dh = W^T dz reads them as TF32 operands.
    deeper = [w.float() for w in folded.deeper]
    deeper += [folded.b_out] * (MAX_HIDDEN_LAYERS - 1 - len(deeper))
    # W_p and W_k - W_d as [H1_P, D_P] rows: the kernel's M and its W_p term
    # of dq are [H1, D] tiles, loaded contiguously (vectorized, coalesced).
    w_p, w_a = folded.w_p.t().contiguous(), folded.w_a.t().contiguous()
    grad_pooled = grad_pooled.contiguous()
    # Absent lengths, mask or d loss / d w: one-element placeholders of the
    # types the kernel's signature names (never read), as the compile report
    # compiles it.
    lengths = (problem.lengths.contiguous() if problem.lengths is not None
               else keys.new_zeros(1, dtype=torch.int64))
    mask = (problem.mask.contiguous().view(torch.uint8) if problem.mask is not None
            else keys.new_zeros(1, dtype=torch.uint8))
    grad_scores = grad_scores.contiguous() if grad_scores is not None else keys.new_zeros(1)

    programs = _num_programs(batch, device)
    launch = batch > 0 and candidates > 0 and length > 0
    alloc = torch.empty if launch else torch.zeros
    # dk/dv are summed over candidates in place: float32 unless a single candidate writes.
    grad_dtype = keys.dtype if candidates == 1 else torch.float32
    dq_part = alloc(batch, candidates, d_p, **f32)
    dk = alloc(batch, length, embed_dim, dtype=grad_dtype, device=device)
    dv = None if problem.values is None else alloc(batch, length, value_dim,
                                                   dtype=grad_dtype, device=device)
    g = alloc(batch, candidates, widths[0], **f32)
    # Padded partials: the kernel writes whole tiles, the host keeps the real part.
    m_scratch = torch.empty(programs, widths[0], d_p, dtype=keys.dtype, device=device)
    part_k = torch.zeros(programs, widths[0], d_p, **f32)
    part_qk = torch.zeros_like(part_k)
    part_w2 = torch.zeros(programs, widths[0], widths[1], **f32)    # W_2^T, W_3^T
    part_w3 = torch.zeros(programs, widths[1], widths[2], **f32)
    part_unit = torch.zeros(programs, layers, 4, constexprs["UNIT_W"], **f32)
    part_out = torch.zeros(programs, widths[layers - 1] + 1, **f32)
    with launch_device(device):
        for part in spec.launches() if launch else ():
            _launch_part(part, programs, dict(
                q_ptr=query, u_ptr=folded.u, k_ptr=keys, v_ptr=values, len_ptr=lengths,
                mask_ptr=mask, wp_ptr=w_p, wa_ptr=w_a, w2_ptr=deeper[0], w3_ptr=deeper[1],
                unit_ptr=folded.unit, wout_ptr=folded.w_out, bout_ptr=folded.b_out,
                dout_ptr=grad_pooled, gs_ptr=grad_scores, m_scratch_ptr=m_scratch,
                dq_ptr=dq_part, dk_ptr=dk, dv_ptr=dv if dv is not None else dk, g_ptr=g,
                part_k_ptr=part_k, part_qk_ptr=part_qk, part_w2_ptr=part_w2,
                part_w3_ptr=part_w3, part_unit_ptr=part_unit, part_out_ptr=part_out,
                B=batch, C=candidates, T=length, D=embed_dim, DV=value_dim,
                scale=problem.scale))

    # Host epilogue: the first layer from G and the P partials; fixed-order sums.
    h1 = hidden[0]
    g = g[..., :h1]
    dw_q = g.reshape(-1, h1).t() @ query.reshape(-1, embed_dim).float()
    dw_k = part_k.sum(0)[:h1, :embed_dim]
    dweights = [torch.cat([dw_q, dw_k, dw_q - dw_k, part_qk.sum(0)[:h1, :embed_dim]], dim=1)]
    dweights += [part.sum(0)[:n_in, :n_out].t()
                 for part, n_in, n_out in zip((part_w2, part_w3), hidden, hidden[1:])]
    out = part_out.sum(0)
    # Clones: the custom op may not return views of one another.
    dweights.append(out[None, :hidden[-1]].clone())
    unit = part_unit.sum(0)
    dbiases = [unit[i, 0, :width].clone() for i, width in enumerate(hidden)] + [out[-1:].clone()]
    dact = [tuple(unit[i, 1 + j, :width].clone() for j in range(len(problem.act_params[i])))
            for i, width in enumerate(hidden)]
    w_q, _, w_d, _ = (w.float() for w in split_first_layer(problem.weights[0]))
    dq = dq_part[..., :embed_dim] + g @ (w_q + w_d)
    return (
        dq.to(query.dtype), dk.to(keys.dtype), None if dv is None else dv.to(keys.dtype),
        [d.to(w.dtype) for d, w in zip(dweights, problem.weights)],
        [d.to(b.dtype) for d, b in zip(dbiases, problem.biases)],
        [tuple(d.to(p.dtype) for d, p in zip(grads, params))
         for grads, params in zip(dact, problem.act_params)],
    )
