"""The fused backward of the DIN activation unit + attention pooling.

FlashAttention's method, taken one step further: nothing of the forward is
stored, not even the softmax statistics (the kernel recomputes the max, the
normalizer and the row term delta itself, in a first pass over the row). The
kernel recomputes the MLP tile by tile from the keys, with the forward's folded
parameters, and runs the chain rule on the spot, so no [B, C, T, H] or
[B, C, T, 4D] tensor ever reaches memory. Positions past a row's length are
skipped (their gradients are zero), as in the forward.

One program owns whole rows (a persistent grid: rows pid, pid + P, ...), so
the key and value gradients of a row, summed over its candidates, are written
by one program only, and its candidates share the row's key tiles from
cache. The weight gradients, summed over every (b, c, t), are accumulated per
row in float32, added to the program's own partial when the row is done, and
the partials are reduced in a fixed order on the host. No atomics: two
backward passes give bitwise-identical gradients.

What stays on chip for a whole pass is the gradient accumulators. When
they add up to more than TILE_BUDGET elements, the backward runs as three
launches of the same kernel (BackwardSpec.launches; PARTS): dk and dv; the
first layer's sums; the deeper layers'. Each recomputes the forward and
keeps one kind of accumulator live, and ptxas keeps every one of them within
the register file (python -m din_fast.kernels.aot) at the cost of the
recompute: the split trades arithmetic, which the tiles have to spare, for
not spilling. The weight tiles (M, W_i, W_i^T) are reloaded per tile from
L1/L2 rather than held: staged once in registers they would spill.

The first layer goes through the fold z1 = u + k M^T, u = (W_q + W_d) q + b_1,
M = (W_k - W_d) + W_p * q. Per (b, c) the kernel accumulates
P = sum_t dz1_t k_t^T ([H_1, D]) and G = sum_t dz1_t ([H_1]); everything else
of the first layer follows from them:
    dW_q = sum G q^T,  dW_k = sum P,  dW_d = dW_q - dW_k,  dW_p = sum P * q,
    db_1 = sum G,      dq = (W_q + W_d)^T G + colsum(W_p * P),  dk_t = M^T dz1_t.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from din_fast.problem import DINProblem, split_first_layer

from .common import (MAX_HIDDEN_LAYERS, NUM_STAGES, TILE_BUDGET, TRITON_DTYPES, activate,
                     fold_parameters, interpreting, launch_device, load_tile, mma, padded,
                     store_tile, unit_params)


@triton.jit
def _activation_backward(z, dh, a, mu, rstd, ACTIVATION: tl.constexpr):
    """dz, and per element the gradient terms of the unit parameters (a, mu, var).

    Tiles [H, BLOCK_T]; a, mu, rstd are [H, 1] (rstd = 1/sqrt(var + eps)).
    """
    zero = tl.zeros_like(z)
    if ACTIVATION == "sigmoid":
        p = tl.sigmoid(z)
        return dh * p * (1.0 - p), zero, zero, zero
    elif ACTIVATION == "relu":
        return tl.where(z > 0, dh, 0.0), zero, zero, zero
    elif ACTIVATION == "prelu":
        negative = z <= 0  # the a-branch of where(z > 0, z, a * z), z == 0 included
        return tl.where(negative, dh * a, dh), tl.where(negative, dh * z, 0.0), zero, zero
    else:
        p = tl.sigmoid((z - mu) * rstd)
        slope = (1.0 - a) * z * p * (1.0 - p)  # d f / d((z - mu) * rstd)
        dz = dh * (a + p * (1.0 - a) + slope * rstd)
        dmu = -dh * slope * rstd
        dvar = -0.5 * dh * slope * (z - mu) * rstd * rstd * rstd
        return dz, dh * z * (1.0 - p), dmu, dvar


@triton.jit
def _unit_backward(z, dh, unit_ptr, layer: tl.constexpr, UNIT_W: tl.constexpr, HP: tl.constexpr,
                   ACTIVATION: tl.constexpr):
    """A hidden layer's [H, BLOCK_T] tile backward: dz, and the per-unit sums of
    the (a, mu, var) gradient terms.

    The unit parameters are reloaded per tile (cache hits): held across the
    loops, broadcast to the tiles' layouts, they cost more registers than the
    tiles themselves."""
    _, a, mu, rstd = _unit_columns(unit_ptr, layer, UNIT_W, HP)
    dz, da, dmu, dvar = _activation_backward(z, dh, a, mu, rstd, ACTIVATION)
    return dz, tl.sum(da, axis=1), tl.sum(dmu, axis=1), tl.sum(dvar, axis=1)


@triton.jit
def _deeper_layer_backward(z, dh, h_in, w_ptr, unit_ptr, layer: tl.constexpr, acc_w, acc_b,
                           acc_a, acc_mu, acc_var, IN_P: tl.constexpr, OUT_P: tl.constexpr,
                           UNIT_W: tl.constexpr, BLOCK_T: tl.constexpr,
                           ACTIVATION: tl.constexpr, WEIGHTS: tl.constexpr,
                           NEED_DH_IN: tl.constexpr,
                           DOT_F32: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """A hidden layer after the first (z = W h_in + b), transposed: d loss / d h_in
    (with NEED_DH_IN), and with WEIGHTS the layer's accumulators (W and its
    unit vectors) updated; a launch without them passes them through."""
    dz, da, dmu, dvar = _unit_backward(z, dh, unit_ptr, layer, UNIT_W, OUT_P, ACTIVATION)
    # dz stays float32 (in TF32 dots): rounded to half precision here, the
    # error would compound down the layers into the gradients that cancel.
    # acc_w is W's gradient transposed, [IN_P, OUT_P]: h_in (the wider side)
    # is then the left operand, split across the warps, and only dz^T is held
    # whole by each warp.
    if WEIGHTS:
        acc_w = mma(h_in, tl.trans(dz), acc_w, DOT_F32, GRAD_PRECISION)
        acc_b += tl.sum(dz, axis=1)
        acc_a += da
        acc_mu += dmu
        acc_var += dvar
    dh_in = dh
    if NEED_DH_IN:
        # W^T in float32 straight from memory: a TF32 operand the tensor
        # cores read from shared memory, not a converted copy in registers.
        dh_in = mma(load_tile(w_ptr, IN_P, OUT_P, False), dz,
                     tl.zeros((IN_P, BLOCK_T), tl.float32), DOT_F32, GRAD_PRECISION)
    return dh_in, acc_w, acc_b, acc_a, acc_mu, acc_var


@triton.jit
def _tile_inputs(k_ptr, v_ptr, mask_ptr, gs_ptr, b64, bc, t0, t_stop, T, D, DV, dout,
                 HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
                 VALUES_ARE_KEYS: tl.constexpr, BLOCK_T: tl.constexpr, D_P: tl.constexpr,
                 DV_P: tl.constexpr):
    """A tile of positions: (offsets, in range, valid, key tile [BLOCK_T, D_P], and
    dw = d loss / d w = dout . v_t (+ gs_t)).

    Invalid positions load as zeros, never as what the padding holds: their
    gradients are multiplied by zero, and 0 * NaN is NaN."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    t_ok = offs_t < t_stop
    if HAS_MASK:
        valid = t_ok & (tl.load(mask_ptr + b64 * T + offs_t, mask=t_ok, other=0) != 0)
    else:
        valid = t_ok
    rows = b64 * T + offs_t
    keys = tl.load(k_ptr + rows[:, None] * D + offs_d[None, :],
                   mask=valid[:, None] & (offs_d < D)[None, :], other=0.0)
    if VALUES_ARE_KEYS:
        vals = keys.to(tl.float32)
    else:
        vals = tl.load(v_ptr + rows[:, None] * DV + offs_dv[None, :],
                       mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0).to(tl.float32)
    dw = tl.sum(vals * dout[None, :], axis=1)
    if HAS_GRAD_SCORES:
        dw += tl.load(gs_ptr + bc * T + offs_t, mask=valid, other=0.0).to(tl.float32)
    return offs_t, t_ok, valid, keys, dw


@triton.jit
def _tile_forward(keys, m_ptr, u, w2_ptr, w3_ptr, unit_ptr, w_out, b_out,
                  NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_T: tl.constexpr,
                  D_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr,
                  H3_P: tl.constexpr, UNIT_W: tl.constexpr, DOT_F32: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """The MLP on a key tile, transposed ([H, BLOCK_T]): (z1, h1, z2, h2, z3, h3, s).

    Layers the MLP lacks repeat the last one's (z, h), unused by the caller.
    """
    m = load_tile(m_ptr, H1_P, D_P, False)
    z1 = mma(m, tl.trans(keys), tl.zeros((H1_P, BLOCK_T), tl.float32), DOT_F32,
              INPUT_PRECISION) + u
    _, a1, mu1, rstd1 = _unit_columns(unit_ptr, 0, UNIT_W, H1_P)
    h1 = activate(z1, a1, mu1, rstd1, ACTIVATION)
    z2, h2 = z1, h1
    if NUM_LAYERS >= 2:
        z2, h2 = _deeper_layer_forward(h1, w2_ptr, unit_ptr, 1, H1_P, H2_P, UNIT_W, BLOCK_T,
                                       keys.dtype, ACTIVATION, DOT_F32, INPUT_PRECISION)
    z3, h3 = z2, h2
    if NUM_LAYERS >= 3:
        z3, h3 = _deeper_layer_forward(h2, w3_ptr, unit_ptr, 2, H2_P, H3_P, UNIT_W, BLOCK_T,
                                       keys.dtype, ACTIVATION, DOT_F32, INPUT_PRECISION)
    return z1, h1, z2, h2, z3, h3, tl.sum(h3 * w_out, axis=0) + b_out


@triton.jit
def _deeper_layer_forward(h_in, wt_ptr, unit_ptr, layer: tl.constexpr, IN_P: tl.constexpr,
                          OUT_P: tl.constexpr, UNIT_W: tl.constexpr, BLOCK_T: tl.constexpr,
                          DOT_DTYPE: tl.constexpr, ACTIVATION: tl.constexpr,
                          DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A hidden layer after the first, transposed: (z, h) [OUT_P, BLOCK_T] from
    h_in [IN_P, BLOCK_T], with W reloaded from its float32 W^T [IN_P, OUT_P]
    and rounded to the dot dtype as the forward kernel uses it."""
    w = load_tile(wt_ptr, IN_P, OUT_P, True).to(DOT_DTYPE)
    bias, a, mu, rstd = _unit_columns(unit_ptr, layer, UNIT_W, OUT_P)
    z = mma(w, h_in.to(DOT_DTYPE), tl.zeros((OUT_P, BLOCK_T), tl.float32), DOT_F32,
             INPUT_PRECISION) + bias
    return z, activate(z, a, mu, rstd, ACTIVATION)


@triton.jit
def _unit_columns(unit_ptr, layer: tl.constexpr, UNIT_W: tl.constexpr, HP: tl.constexpr):
    """A layer's (bias, a, mu, rstd) as [HP, 1] columns."""
    bias, a, mu, rstd = unit_params(unit_ptr, layer, 0, UNIT_W, HP)
    return bias[:, None], a[:, None], mu[:, None], rstd[:, None]


@triton.jit
def _add_to_tile(ptr, tile, RP: tl.constexpr, SP: tl.constexpr, STRIDE: tl.constexpr):
    """ptr[RP, SP] += tile, rows STRIDE apart: a program's private partial, so no
    race and no atomics."""
    offs = tl.arange(0, RP)[:, None] * STRIDE + tl.arange(0, SP)[None, :]
    tl.store(ptr + offs, tl.load(ptr + offs) + tile)


@triton.jit
def _zero_unit_grads(HP: tl.constexpr):
    """Zero accumulators for one layer's (bias, a, mu, var) gradients."""
    zero = tl.zeros((HP,), tl.float32)
    return zero, zero, zero, zero


@triton.jit
def _add_to_vector(ptr, vector, N: tl.constexpr):
    """ptr[N] += vector, as _add_to_tile."""
    offs = tl.arange(0, N)
    tl.store(ptr + offs, tl.load(ptr + offs) + vector)


@triton.jit
def _add_unit_grads(ptr, layer: tl.constexpr, db, da, dmu, dvar, UNIT_W: tl.constexpr,
                    HP: tl.constexpr):
    """One layer's (bias, a, mu, var) gradients added to a [L, 4, UNIT_W] partial."""
    base = ptr + layer * 4 * UNIT_W
    _add_to_vector(base, db, HP)
    _add_to_vector(base + UNIT_W, da, HP)
    _add_to_vector(base + 2 * UNIT_W, dmu, HP)
    _add_to_vector(base + 3 * UNIT_W, dvar, HP)


@triton.jit
def din_backward_kernel(
    q_ptr, u_ptr, k_ptr, v_ptr, len_ptr, mask_ptr,
    wp_ptr, wa_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr,
    dout_ptr, gs_ptr,
    dq_ptr, dk_ptr, dv_ptr, g_ptr, m_scratch_ptr,
    part_k_ptr, part_qk_ptr, part_w2_ptr, part_w3_ptr, part_unit_ptr, part_out_ptr,
    B, C, T, D, DV, scale,
    ACTIVATION: tl.constexpr, SOFTMAX: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
    MULTI_CANDIDATE: tl.constexpr, INPUT_GRADS: tl.constexpr, FIRST_WEIGHTS: tl.constexpr,
    DEEPER_WEIGHTS: tl.constexpr, FIRST_D0: tl.constexpr, FIRST_DC: tl.constexpr,
    NUM_LAYERS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GRAD_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, D_P: tl.constexpr,
    DV_P: tl.constexpr, H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
    UNIT_W: tl.constexpr,
):
    """Grid (P,): program pid owns rows pid, pid + P, ...

    Inputs as din_forward_kernel's (contiguous; the folded parameters padded
    to the tile widths, with D_P rows; but wp and wa are W_p and W_k - W_d,
    [H1_P, D_P], rows of units; w2 and w3 are W_i^T in float32), plus
    dout [B, C, DV] = d loss / d pooled and gs [B, C, T] = d loss / d w; m_scratch
    [P, H1_P, D_P] in the inputs' dtype, each program's slot for its
    candidate's M.

    Softmax takes a first pass over the row's tiles for its max, normalizer
    and delta = sum_t w_t dw_t, all from this kernel's own recomputed scores:
    then sum_t ds_t = 0 holds to float32 rounding, where a delta from the
    forward's half-precision output would leave a bias in every sum of ds
    (the output bias's gradient, and the small gradients that cancel).
    Outputs: dq [B, C, D_P] float32 (the W_p term only), dk [B, T, D] and
    dv [B, T, DV] (float32 when C > 1: the candidates add up in place),
    G [B, C, H1_P] float32; per program float32 partials, padded: part_k and
    part_qk [P, H1_P, D_P] (sum of dz1 k^T and of dz1 (q*k)^T), part_w2
    [P, H1_P, H2_P] and part_w3 [P, H2_P, H3_P] (W_2^T, W_3^T), part_unit
    [P, L, 4, UNIT_W] (bias, a, mu, var), part_out [P, H_L_P + 1] (W_out, then
    b_out). Partials start at zero. INPUT_GRADS, FIRST_WEIGHTS and
    DEEPER_WEIGHTS select which of them this launch writes (PARTS); a
    FIRST_WEIGHTS launch covers the key columns FIRST_D0 + [0, FIRST_DC) of P
    (and dq's W_p term), and the one with FIRST_D0 = 0 also G.

    The MLP runs transposed, units along rows and positions along columns
    ([H, BLOCK_T] tiles): the loop-invariant matrices (M, M^T, W_i, W_i^T)
    are then the left operands of the dots, which the warps split by rows
    (see BackwardSpec.blocks), rather than right operands every warp would
    hold whole.
    """
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dot_dtype = k_ptr.dtype.element_ty
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    offs_h1 = tl.arange(0, H1_P)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    m_ptr = m_scratch_ptr + pid * H1_P * D_P
    if NUM_LAYERS == 1:
        HL_P: tl.constexpr = H1_P
    elif NUM_LAYERS == 2:
        HL_P: tl.constexpr = H2_P
    else:
        HL_P: tl.constexpr = H3_P
    offs_hl = tl.arange(0, HL_P)
    w_out = tl.load(wout_ptr + offs_hl)[:, None]
    b_out = tl.load(bout_ptr)

    for b in range(pid, B, programs):
        b64 = tl.cast(b, tl.int64)
        if HAS_LENGTHS:
            t_stop = tl.minimum(tl.maximum(tl.load(len_ptr + b64).to(tl.int32), 0), T)
        else:
            t_stop = T
        if INPUT_GRADS:
            # Past the length every gradient is zero: written once, never computed.
            for t0 in range(t_stop, T, BLOCK_T):
                offs_t = t0 + tl.arange(0, BLOCK_T)
                rows = b64 * T + offs_t
                tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :],
                         tl.zeros((BLOCK_T, D_P), tl.float32),
                         mask=(offs_t < T)[:, None] & d_ok[None, :])
                if not VALUES_ARE_KEYS:
                    tl.store(dv_ptr + rows[:, None] * DV + offs_dv[None, :],
                             tl.zeros((BLOCK_T, DV_P), tl.float32),
                             mask=(offs_t < T)[:, None] & dv_ok[None, :])

        # The row's sums of the weight gradients (over its candidates and
        # positions), added to this program's partials once the row is done.
        acc_b1, acc_a1, acc_mu1, acc_var1 = _zero_unit_grads(H1_P)
        if INPUT_GRADS:
            acc_wout = tl.zeros((HL_P,), tl.float32)
            acc_bout = tl.zeros((1,), tl.float32)
        # Placeholders where a pass skips a layer's sums (never read).
        acc_w2, acc_b2, acc_a2, acc_mu2, acc_var2 = b_out, b_out, b_out, b_out, b_out
        acc_w3, acc_b3, acc_a3, acc_mu3, acc_var3 = b_out, b_out, b_out, b_out, b_out
        if NUM_LAYERS >= 2:
            if DEEPER_WEIGHTS:
                acc_w2 = tl.zeros((H1_P, H2_P), tl.float32)
                acc_b2, acc_a2, acc_mu2, acc_var2 = _zero_unit_grads(H2_P)
        if NUM_LAYERS >= 3:
            if DEEPER_WEIGHTS:
                acc_w3 = tl.zeros((H2_P, H3_P), tl.float32)
                acc_b3, acc_a3, acc_mu3, acc_var3 = _zero_unit_grads(H3_P)
        for c in range(0, C):
            bc = b64 * C + c
            q = tl.load(q_ptr + bc * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + bc * H1_P + offs_h1)[:, None]
            # The candidate's fold M = (W_k - W_d) + W_p * q, [H1, D], staged in
            # this program's scratch slot and reloaded per tile (cache hits):
            # held in registers across the loops, it would spill.
            m = (load_tile(wa_ptr, H1_P, D_P, False).to(tl.float32)
                 + load_tile(wp_ptr, H1_P, D_P, False).to(tl.float32) * q[None, :])
            tl.debug_barrier()      # the previous candidate's reads are done
            store_tile(m_ptr, m.to(dot_dtype), H1_P, D_P)
            tl.debug_barrier()      # every thread sees the whole tile
            dout = tl.load(dout_ptr + bc * DV + offs_dv, mask=dv_ok, other=0.0).to(tl.float32)
            if SOFTMAX:
                # The normalizer and delta = sum_t w_t dw_t, online as in the
                # forward, with this pass's own max: the weights below are then
                # exp(x - max) of the very x computed here, never above 1, at
                # any scale (a max taken from the forward's differently rounded
                # scores can sit below them, by far more than exp's range
                # when |scale| is large).
                row_max = tl.full((), float("-inf"), tl.float32)
                row_sum = 0.0
                delta = 0.0
                for t0 in range(0, t_stop, BLOCK_T):
                    offs_t, t_ok, valid, keys, dw = _tile_inputs(
                        k_ptr, v_ptr, mask_ptr, gs_ptr, b64, bc, t0, t_stop, T, D, DV, dout,
                        HAS_MASK, HAS_GRAD_SCORES, VALUES_ARE_KEYS, BLOCK_T, D_P, DV_P)
                    s = _tile_forward(keys, m_ptr, u, w2_ptr, w3_ptr, unit_ptr, w_out, b_out,
                                      NUM_LAYERS, ACTIVATION, BLOCK_T, D_P, H1_P, H2_P, H3_P,
                                      UNIT_W, DOT_F32, INPUT_PRECISION)[6]
                    x = tl.where(valid, scale * s, float("-inf"))
                    new_max = tl.maximum(row_max, tl.max(x, axis=0))
                    base = tl.where(new_max == float("-inf"), 0.0, new_max)
                    e = tl.exp(x - base)
                    rescale = tl.exp(row_max - base)
                    row_sum = row_sum * rescale + tl.sum(e, axis=0)
                    delta = delta * rescale + tl.sum(e * dw, axis=0)
                    row_max = new_max
                row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
                inv_sum = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)
                delta = delta * inv_sum
            if FIRST_WEIGHTS:
                # P = sum dz1 k^T over this launch's key columns FIRST_D0 + [0, FIRST_DC).
                acc_p = tl.zeros((H1_P, FIRST_DC), tl.float32)
                offs_p = FIRST_D0 + tl.arange(0, FIRST_DC)
                acc_g = tl.zeros((H1_P,), tl.float32)                      # G = sum dz1

            for t0 in range(0, t_stop, BLOCK_T):
                offs_t, t_ok, valid, keys, dw = _tile_inputs(
                    k_ptr, v_ptr, mask_ptr, gs_ptr, b64, bc, t0, t_stop, T, D, DV, dout,
                    HAS_MASK, HAS_GRAD_SCORES, VALUES_ARE_KEYS, BLOCK_T, D_P, DV_P)
                rows = b64 * T + offs_t
                # Forward recompute of the tile, transposed: [H, BLOCK_T].
                z1, h1, z2, h2, z3, h_last, s = _tile_forward(
                    keys, m_ptr, u, w2_ptr, w3_ptr, unit_ptr, w_out, b_out, NUM_LAYERS,
                    ACTIVATION, BLOCK_T, D_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32,
                    INPUT_PRECISION)

                # Pooling and normalization backward: ds = d loss / d s.
                if SOFTMAX:
                    w = tl.exp(tl.where(valid, scale * s - row_max, float("-inf"))) * inv_sum
                    ds = scale * w * (dw - delta)
                else:
                    w = tl.where(valid, scale * s, 0.0)
                    ds = tl.where(valid, scale * dw, 0.0)

                # MLP backward, output layer first.
                if INPUT_GRADS:
                    acc_wout += tl.sum(h_last * ds[None, :], axis=1)
                    acc_bout += tl.sum(ds, axis=0)
                dh = w_out * ds[None, :]
                if NUM_LAYERS >= 3:
                    dh, acc_w3, acc_b3, acc_a3, acc_mu3, acc_var3 = _deeper_layer_backward(
                        z3, dh, h2, w3_ptr, unit_ptr, 2, acc_w3, acc_b3, acc_a3, acc_mu3,
                        acc_var3, H2_P, H3_P, UNIT_W, BLOCK_T, ACTIVATION, DEEPER_WEIGHTS,
                        True, DOT_F32, GRAD_PRECISION)
                if NUM_LAYERS >= 2:
                    dh, acc_w2, acc_b2, acc_a2, acc_mu2, acc_var2 = _deeper_layer_backward(
                        z2, dh, h1, w2_ptr, unit_ptr, 1, acc_w2, acc_b2, acc_a2, acc_mu2,
                        acc_var2, H1_P, H2_P, UNIT_W, BLOCK_T, ACTIVATION, DEEPER_WEIGHTS,
                        INPUT_GRADS or FIRST_WEIGHTS, DOT_F32, GRAD_PRECISION)
                if INPUT_GRADS or FIRST_WEIGHTS:
                    dz1, da1, dmu1, dvar1 = _unit_backward(z1, dh, unit_ptr, 0, UNIT_W, H1_P,
                                                           ACTIVATION)
                if FIRST_WEIGHTS:
                    keys_p = keys
                    if FIRST_DC < D_P:
                        keys_p = tl.load(k_ptr + rows[:, None] * D + offs_p[None, :],
                                         mask=valid[:, None] & (offs_p < D)[None, :], other=0.0)
                    acc_p = mma(dz1.to(dot_dtype), keys_p, acc_p, DOT_F32, INPUT_PRECISION)
                    acc_g += tl.sum(dz1, axis=1)
                if INPUT_GRADS:
                    acc_a1 += da1
                    acc_mu1 += dmu1
                    acc_var1 += dvar1
                    m_t = load_tile(m_ptr, H1_P, D_P, True)              # M^T [D, H1]
                    dk = tl.trans(mma(m_t, dz1.to(dot_dtype),
                                       tl.zeros((D_P, BLOCK_T), tl.float32), DOT_F32,
                                       INPUT_PRECISION))                 # [BLOCK_T, D]
                    # A row's key/value gradients sum over its candidates: the
                    # first candidate writes, the others add (same program).
                    dv = w[:, None] * dout[None, :]
                    if VALUES_ARE_KEYS:
                        dk += dv
                    else:
                        dv_ptrs = dv_ptr + rows[:, None] * DV + offs_dv[None, :]
                        dv_mask = t_ok[:, None] & dv_ok[None, :]
                        if MULTI_CANDIDATE:
                            dv += tl.load(dv_ptrs, mask=dv_mask & (c > 0),
                                          other=0.0).to(tl.float32)
                        tl.store(dv_ptrs, dv, mask=dv_mask)
                    dk_ptrs = dk_ptr + rows[:, None] * D + offs_d[None, :]
                    dk_mask = t_ok[:, None] & d_ok[None, :]
                    if MULTI_CANDIDATE:
                        dk += tl.load(dk_ptrs, mask=dk_mask & (c > 0), other=0.0).to(tl.float32)
                    tl.store(dk_ptrs, dk, mask=dk_mask)

            # This program's partials, indexed by b % P (== pid): addresses
            # computed from the loop variable are not hoisted out of the
            # loops, where they would be held in registers (or spilled).
            slot = b % programs
            if FIRST_WEIGHTS:
                # Per (b, c): G for the host (dW_q, dq's fold term) and the
                # first bias (from the launch with the first key columns), the
                # query's W_p term and the P partials (this launch's columns).
                if FIRST_D0 == 0:
                    tl.store(g_ptr + bc * H1_P + offs_h1, acc_g)
                    acc_b1 += acc_g
                wp = tl.load(wp_ptr + offs_h1[:, None] * D_P + offs_p[None, :]).to(tl.float32)
                tl.store(dq_ptr + bc * D_P + offs_p, tl.sum(wp * acc_p, axis=0))
                q_p = tl.load(q_ptr + bc * D + offs_p, mask=offs_p < D, other=0.0).to(tl.float32)
                part = slot * H1_P * D_P + FIRST_D0
                _add_to_tile(part_k_ptr + part, acc_p, H1_P, FIRST_DC, D_P)
                _add_to_tile(part_qk_ptr + part, acc_p * q_p[None, :], H1_P, FIRST_DC, D_P)

        slot = b % programs
        part_unit = part_unit_ptr + slot * NUM_LAYERS * 4 * UNIT_W
        # The first layer's bias (from G) and (a, mu, var) come from two
        # launches when split: each adds its own, the other's stay zero.
        if FIRST_WEIGHTS or INPUT_GRADS:
            _add_unit_grads(part_unit, 0, acc_b1, acc_a1, acc_mu1, acc_var1, UNIT_W, H1_P)
        if INPUT_GRADS:
            _add_to_vector(part_out_ptr + slot * (HL_P + 1), acc_wout, HL_P)
            _add_to_vector(part_out_ptr + slot * (HL_P + 1) + HL_P, acc_bout, 1)
        if NUM_LAYERS >= 2:
            if DEEPER_WEIGHTS:
                _add_to_tile(part_w2_ptr + slot * H1_P * H2_P, acc_w2, H1_P, H2_P, H2_P)
                _add_unit_grads(part_unit, 1, acc_b2, acc_a2, acc_mu2, acc_var2, UNIT_W, H2_P)
        if NUM_LAYERS >= 3:
            if DEEPER_WEIGHTS:
                _add_to_tile(part_w3_ptr + slot * H2_P * H3_P, acc_w3, H2_P, H3_P, H3_P)
                _add_unit_grads(part_unit, 2, acc_b3, acc_a3, acc_mu3, acc_var3, UNIT_W, H3_P)


# ---------------------------------------------------------------------------
# Host side: specialization, launch, the reduction of the partials.
# ---------------------------------------------------------------------------

# A launch's share of the gradients: (INPUT_GRADS: dk, dv, the output layer's
# and the first layer's (a, mu, var); FIRST_WEIGHTS: the first layer's P and
# G (its bias, dW_q) and dq's W_p term; DEEPER_WEIGHTS: the later layers' W_i
# and unit vectors).
PARTS = {
    "all": (True, True, True),
    "inputs": (True, False, False),
    "first": (False, True, False),
    "deeper": (False, False, True),
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
    part: str = "all"       # which gradients this launch computes: a key of PARTS
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

    def constexprs(self) -> dict:
        widths = [padded(h) for h in self.hidden] + [16] * (MAX_HIDDEN_LAYERS - len(self.hidden))
        # TF32 for float32 inputs (the GPU accuracy bound allows it): with IEEE
        # float32 dots ptxas keeps 32 registers and spills about 10 KB per thread.
        # Half inputs: dz stays float32 (GRAD_PRECISION), in TF32 dots.
        precision = "tf32" if self.dtype == torch.float32 else "ieee"
        return dict(
            ACTIVATION=self.activation, SOFTMAX=self.softmax, HAS_LENGTHS=self.has_lengths,
            HAS_MASK=self.has_mask, HAS_GRAD_SCORES=self.has_grad_scores,
            VALUES_ARE_KEYS=self.values_are_keys, MULTI_CANDIDATE=self.candidates > 1,
            NUM_LAYERS=len(self.hidden),
            DOT_F32=self.interpret, INPUT_PRECISION=precision,
            GRAD_PRECISION="tf32",
            BLOCK_T=self.blocks()[0],
            D_P=padded(self.embed_dim), DV_P=padded(self.value_dim),
            H1_P=widths[0], H2_P=widths[1], H3_P=widths[2],
            UNIT_W=max(widths[:len(self.hidden)]),
            **dict(zip(("INPUT_GRADS", "FIRST_WEIGHTS", "DEEPER_WEIGHTS"), PARTS[self.part])),
            FIRST_D0=self.first_d0, FIRST_DC=self.first_dc or padded(self.embed_dim),
        )

    def signature(self) -> dict:
        """Argument types for triton.compile (the AOT compile report)."""
        io = "*" + TRITON_DTYPES[self.dtype]
        grad = io if self.candidates == 1 else "*fp32"
        pointers = dict(
            q_ptr=io, u_ptr="*fp32", k_ptr=io, v_ptr=io, len_ptr="*i64", mask_ptr="*u8",
            wp_ptr=io, wa_ptr=io, w2_ptr="*fp32", w3_ptr="*fp32", unit_ptr="*fp32", wout_ptr="*fp32",
            bout_ptr="*fp32", dout_ptr=io, gs_ptr=io,
            dq_ptr="*fp32", dk_ptr=grad, dv_ptr=grad, g_ptr="*fp32", m_scratch_ptr=io,
            **{name: "*fp32" for name in ("part_k_ptr", "part_qk_ptr", "part_w2_ptr",
                                          "part_w3_ptr", "part_unit_ptr", "part_out_ptr")})
        ints = "B C T D DV".split()
        return {**pointers, **{name: "i32" for name in ints}, "scale": "fp32",
                **{name: "constexpr" for name in self.constexprs()}}


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


def _launch_part(part: BackwardSpec, programs: int, arguments: tuple) -> None:
    wrap_triton(din_backward_kernel)[(programs,)](*arguments, num_warps=part.blocks()[1],
                                                  num_stages=NUM_STAGES, **part.constexprs())


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
            _launch_part(part, programs, (
                query, folded.u, keys, values, lengths, mask,
                w_p, w_a, deeper[0], deeper[1], folded.unit, folded.w_out, folded.b_out,
                grad_pooled, grad_scores,
                dq_part, dk, dv if dv is not None else dk, g, m_scratch,
                part_k, part_qk, part_w2, part_w3, part_unit, part_out,
                batch, candidates, length, embed_dim, value_dim, problem.scale))

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
