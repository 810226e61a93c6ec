"""The fused backward's steps, shared by its kernels (din_backward).

Every backward kernel walks the rows the same way: per row its length, per
candidate the fold M staged and (softmax) the row's statistics, per tile of
positions the forward recomputed and d loss / d s, then the chain rule down
the MLP. The kernels differ only in which gradients they keep; these helpers
are the walk, each kernel the choice.

Three Triton tuples carry what every step reads, so the calls stay short:

    history = (k_ptr, v_ptr, mask_ptr, gs_ptr, T, D, DV)
        the rows' keys, values, mask and d loss / d w;
    mlp = (m_ptr, w2_ptr, w3_ptr, unit_ptr, w_out, b_out)
        the MLP as the recompute reads it: the candidate's fold M staged at
        m_ptr, W_i^T in float32, the unit parameters, the output layer loaded;
    cand = (b64, bc, t_stop, u, dout, scale, row_max, inv_sum, delta)
        one (row, candidate): its indices, valid prefix, first-layer term u,
        d loss / d pooled, and the softmax statistics (unused without softmax).

The MLP runs transposed, units along rows and positions along columns
([H, BLOCK_T] tiles): the loop-invariant matrices (M, M^T, W_i, W_i^T) are
then the left operands of the dots, which the warps split by rows (see
BackwardSpec.blocks), rather than right operands every warp would hold whole.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import activate, load_tile, mma, store_tile, unit_params


# ---------------------------------------------------------------------------
# The activations and hidden layers, one tile.
# ---------------------------------------------------------------------------

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
def _unit_columns(unit_ptr, layer: tl.constexpr, UNIT_W: tl.constexpr, HP: tl.constexpr):
    """A layer's (bias, a, mu, rstd) as [HP, 1] columns."""
    bias, a, mu, rstd = unit_params(unit_ptr, layer, 0, UNIT_W, HP)
    return bias[:, None], a[:, None], mu[:, None], rstd[:, None]


@triton.jit
def unit_backward(z, dh, unit_ptr, layer: tl.constexpr, UNIT_W: tl.constexpr, HP: tl.constexpr,
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
def _deeper_layer_backward(z, dh, h_in, w_ptr, unit_ptr, layer: tl.constexpr, grads,
                           IN_P: tl.constexpr, OUT_P: tl.constexpr, UNIT_W: tl.constexpr,
                           BLOCK_T: tl.constexpr, ACTIVATION: tl.constexpr,
                           WEIGHTS: tl.constexpr, NEED_DH_IN: tl.constexpr,
                           DOT_F32: tl.constexpr, GRAD_PRECISION: tl.constexpr):
    """A hidden layer after the first (z = W h_in + b), transposed: d loss / d h_in
    (with NEED_DH_IN), and with WEIGHTS the layer's sums `grads` (zero_layer_grads)
    updated; without, `grads` passes through untouched."""
    dz, da, dmu, dvar = unit_backward(z, dh, unit_ptr, layer, UNIT_W, OUT_P, ACTIVATION)
    # dz stays float32 (in TF32 dots): rounded to half precision here, the
    # error would compound down the layers into the gradients that cancel.
    # The W sum is W's gradient transposed, [IN_P, OUT_P]: h_in (the wider
    # side) is then the left operand, split across the warps, and only dz^T
    # is held whole by each warp.
    if WEIGHTS:
        acc_w, acc_b, acc_a, acc_mu, acc_var = grads
        grads = (mma(h_in, tl.trans(dz), acc_w, DOT_F32, GRAD_PRECISION),
                 acc_b + tl.sum(dz, axis=1), acc_a + da, acc_mu + dmu, acc_var + dvar)
    dh_in = dh
    if NEED_DH_IN:
        # W^T in float32 straight from memory: a TF32 operand the tensor
        # cores read from shared memory, not a converted copy in registers.
        dh_in = mma(load_tile(w_ptr, IN_P, OUT_P, False), dz,
                     tl.zeros((IN_P, BLOCK_T), tl.float32), DOT_F32, GRAD_PRECISION)
    return dh_in, grads


@triton.jit
def zero_unit_grads(HP: tl.constexpr):
    """One layer's (bias, a, mu, var) sums, zero."""
    zero = tl.zeros((HP,), tl.float32)
    return zero, zero, zero, zero


@triton.jit
def zero_layer_grads(IN_P: tl.constexpr, OUT_P: tl.constexpr):
    """A deeper layer's sums, zero: (W^T [IN_P, OUT_P], bias, a, mu, var [OUT_P])."""
    zero = tl.zeros((OUT_P,), tl.float32)
    return tl.zeros((IN_P, OUT_P), tl.float32), zero, zero, zero, zero


@triton.jit
def hidden_layers_backward(tile, mlp, grads2, grads3, WEIGHTS: tl.constexpr,
                           NEED_DH1: tl.constexpr, NUM_LAYERS: tl.constexpr,
                           ACTIVATION: tl.constexpr, BLOCK_T: tl.constexpr,
                           H1_P: tl.constexpr, H2_P: tl.constexpr, H3_P: tl.constexpr,
                           UNIT_W: tl.constexpr, DOT_F32: tl.constexpr,
                           GRAD_PRECISION: tl.constexpr):
    """From d loss / d s down to d loss / d h1 (with NEED_DH1; else the last
    layer's dh, unused), through the layers after the first: (dh, grads2,
    grads3), the layers' sums updated with WEIGHTS (() for a layer the MLP
    lacks, or when WEIGHTS is off)."""
    _, _, _, _, ds, _, h1, z2, h2, z3, _, _ = tile
    _, w2_ptr, w3_ptr, unit_ptr, w_out, _ = mlp
    dh = w_out * ds[None, :]
    if NUM_LAYERS >= 3:
        dh, grads3 = _deeper_layer_backward(z3, dh, h2, w3_ptr, unit_ptr, 2, grads3, H2_P, H3_P,
                                            UNIT_W, BLOCK_T, ACTIVATION, WEIGHTS, True,
                                            DOT_F32, GRAD_PRECISION)
    if NUM_LAYERS >= 2:
        dh, grads2 = _deeper_layer_backward(z2, dh, h1, w2_ptr, unit_ptr, 1, grads2, H1_P, H2_P,
                                            UNIT_W, BLOCK_T, ACTIVATION, WEIGHTS, NEED_DH1,
                                            DOT_F32, GRAD_PRECISION)
    return dh, grads2, grads3


# ---------------------------------------------------------------------------
# The walk: rows, candidates, tiles.
# ---------------------------------------------------------------------------

@triton.jit
def program_mlp(m_scratch_ptr, w2_ptr, w3_ptr, unit_ptr, wout_ptr, bout_ptr, D_P: tl.constexpr,
                H1_P: tl.constexpr, HL_P: tl.constexpr):
    """The `mlp` tuple of this program: its M slot in the scratch, and the output
    layer (w_out as a [HL_P, 1] column, b_out) loaded once."""
    m_ptr = m_scratch_ptr + tl.program_id(0) * H1_P * D_P
    w_out = tl.load(wout_ptr + tl.arange(0, HL_P))[:, None]
    return m_ptr, w2_ptr, w3_ptr, unit_ptr, w_out, tl.load(bout_ptr)


@triton.jit
def start_row(len_ptr, b, T, HAS_LENGTHS: tl.constexpr):
    """Row b's index in int64 (offsets past 2**31 elements) and its valid
    prefix: its length clamped to [0, T], so nothing reads outside the tensors
    whatever the lengths hold."""
    b64 = tl.cast(b, tl.int64)
    if HAS_LENGTHS:
        return b64, tl.minimum(tl.maximum(tl.load(len_ptr + b64).to(tl.int32), 0), T)
    else:
        return b64, T


@triton.jit
def _tile_inputs(history, cand, t0, HAS_MASK: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
                 VALUES_ARE_KEYS: tl.constexpr, BLOCK_T: tl.constexpr, D_P: tl.constexpr,
                 DV_P: tl.constexpr):
    """A tile of positions: (offsets, in range, valid, key tile [BLOCK_T, D_P], and
    dw = d loss / d w = dout . v_t (+ gs_t)).

    Invalid positions load as zeros, never as what the padding holds: their
    gradients are multiplied by zero, and 0 * NaN is NaN."""
    k_ptr, v_ptr, mask_ptr, gs_ptr, T, D, DV = history
    b64, bc, t_stop, _, dout, _, _, _, _ = cand
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
def _tile_forward(keys, u, mlp, NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr,
                  BLOCK_T: tl.constexpr, D_P: tl.constexpr, H1_P: tl.constexpr,
                  H2_P: tl.constexpr, H3_P: tl.constexpr, UNIT_W: tl.constexpr,
                  DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The MLP on a key tile, transposed ([H, BLOCK_T]): (z1, h1, z2, h2, z3, h3, s).

    Layers the MLP lacks repeat the last one's (z, h), unused by the caller.
    """
    m_ptr, w2_ptr, w3_ptr, unit_ptr, w_out, b_out = mlp
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
def start_candidate(q_ptr, u_ptr, wa_ptr, wp_ptr, dout_ptr, history, mlp, b64, bc, t_stop,
                    scale, SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr,
                    HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
                    NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_T: tl.constexpr,
                    D_P: tl.constexpr, DV_P: tl.constexpr, H1_P: tl.constexpr,
                    H2_P: tl.constexpr, H3_P: tl.constexpr, UNIT_W: tl.constexpr,
                    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Everything of one (row, candidate) its tiles read: its fold M staged at
    mlp's m_ptr, and the `cand` tuple (see the module docstring).

    Softmax takes a first pass over the row's tiles for its max, normalizer
    and delta = sum_t w_t dw_t, all from this recompute's own scores: then
    sum_t ds_t = 0 holds to float32 rounding, where a delta from the
    forward's half-precision output would leave a bias in every sum of ds
    (the output bias's gradient, and the small gradients that cancel).
    """
    _, _, _, _, _, D, DV = history
    m_ptr = mlp[0]
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    q = tl.load(q_ptr + bc * D + offs_d, mask=offs_d < D, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + bc * H1_P + tl.arange(0, H1_P))[:, None]
    # The candidate's fold M = (W_k - W_d) + W_p * q, [H1, D], staged in
    # this program's scratch slot and reloaded per tile (cache hits):
    # held in registers across the loops, it would spill.
    m = (load_tile(wa_ptr, H1_P, D_P, False).to(tl.float32)
         + load_tile(wp_ptr, H1_P, D_P, False).to(tl.float32) * q[None, :])
    tl.debug_barrier()      # the previous candidate's reads are done
    store_tile(m_ptr, m.to(m_ptr.dtype.element_ty), H1_P, D_P)
    tl.debug_barrier()      # every thread sees the whole tile
    dout = tl.load(dout_ptr + bc * DV + offs_dv, mask=offs_dv < DV, other=0.0).to(tl.float32)
    row_max = tl.full((), float("-inf"), tl.float32)
    inv_sum = 1.0
    delta = 0.0
    if SOFTMAX:
        # The normalizer and delta online as in the forward, with this pass's
        # own max: the weights the tiles rebuild are then exp(x - max) of the
        # very x computed there, never above 1, at any scale (a max taken from
        # the forward's differently rounded scores can sit below them, by far
        # more than exp's range when |scale| is large).
        row_sum = 0.0
        cand = (b64, bc, t_stop, u, dout, scale, row_max, inv_sum, delta)
        for t0 in range(0, t_stop, BLOCK_T):
            inputs = _tile_inputs(history, cand, t0, HAS_MASK, HAS_GRAD_SCORES,
                                  VALUES_ARE_KEYS, BLOCK_T, D_P, DV_P)
            valid, keys, dw = inputs[2], inputs[3], inputs[4]
            s = _tile_forward(keys, u, mlp, NUM_LAYERS, ACTIVATION, BLOCK_T, D_P, H1_P, H2_P,
                              H3_P, UNIT_W, DOT_F32, INPUT_PRECISION)[6]
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
    return (b64, bc, t_stop, u, dout, scale, row_max, inv_sum, delta)


@triton.jit
def recompute_tile(t0, history, mlp, cand, SOFTMAX: tl.constexpr, HAS_MASK: tl.constexpr,
                   HAS_GRAD_SCORES: tl.constexpr, VALUES_ARE_KEYS: tl.constexpr,
                   NUM_LAYERS: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_T: tl.constexpr,
                   D_P: tl.constexpr, DV_P: tl.constexpr, H1_P: tl.constexpr,
                   H2_P: tl.constexpr, H3_P: tl.constexpr, UNIT_W: tl.constexpr,
                   DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The tile of positions t0 + [0, BLOCK_T), forward recomputed and its
    pooling and normalization run backward: the `tile` tuple
    (offs_t, t_ok, valid, keys, ds, z1, h1, z2, h2, z3, w, h_last), ds =
    d loss / d s, w the attention weights, h_last the last hidden layer."""
    _, _, _, u, _, scale, row_max, inv_sum, delta = cand
    offs_t, t_ok, valid, keys, dw = _tile_inputs(history, cand, t0, HAS_MASK, HAS_GRAD_SCORES,
                                                 VALUES_ARE_KEYS, BLOCK_T, D_P, DV_P)
    # Forward recompute of the tile, transposed: [H, BLOCK_T].
    z1, h1, z2, h2, z3, h_last, s = _tile_forward(keys, u, mlp, NUM_LAYERS, ACTIVATION, BLOCK_T,
                                                  D_P, H1_P, H2_P, H3_P, UNIT_W, DOT_F32,
                                                  INPUT_PRECISION)
    if SOFTMAX:
        w = tl.exp(tl.where(valid, scale * s - row_max, float("-inf"))) * inv_sum
        ds = scale * w * (dw - delta)
    else:
        w = tl.where(valid, scale * s, 0.0)
        ds = tl.where(valid, scale * dw, 0.0)
    return offs_t, t_ok, valid, keys, ds, z1, h1, z2, h2, z3, w, h_last


# ---------------------------------------------------------------------------
# What the kernels keep.
# ---------------------------------------------------------------------------

@triton.jit
def zero_past_length(dk_ptr, dv_ptr, b64, t_stop, T, D, DV, VALUES_ARE_KEYS: tl.constexpr,
                     BLOCK_T: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr):
    """Past the length every key and value gradient is zero: written once,
    never computed."""
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    for t0 in range(t_stop, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        rows = b64 * T + offs_t
        tl.store(dk_ptr + rows[:, None] * D + offs_d[None, :],
                 tl.zeros((BLOCK_T, D_P), tl.float32),
                 mask=(offs_t < T)[:, None] & (offs_d < D)[None, :])
        if not VALUES_ARE_KEYS:
            tl.store(dv_ptr + rows[:, None] * DV + offs_dv[None, :],
                     tl.zeros((BLOCK_T, DV_P), tl.float32),
                     mask=(offs_t < T)[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def store_key_value_grads(dk_ptr, dv_ptr, dz1, tile, history, mlp, cand, c,
                          VALUES_ARE_KEYS: tl.constexpr, MULTI_CANDIDATE: tl.constexpr,
                          BLOCK_T: tl.constexpr, D_P: tl.constexpr, DV_P: tl.constexpr,
                          H1_P: tl.constexpr, DOT_F32: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr):
    """dk_t = M^T dz1_t (+ the pooling's term when the values are the keys) and
    dv_t = w_t dout on the tile's positions. A row's key and value gradients
    sum over its candidates: the first (c = 0) writes, the others add (the
    same program owns the row)."""
    offs_t, t_ok, _, _, _, _, _, _, _, _, w, _ = tile
    _, v_ptr, _, _, T, D, DV = history
    b64, _, _, _, dout, _, _, _, _ = cand
    m_ptr = mlp[0]
    offs_d = tl.arange(0, D_P)
    offs_dv = tl.arange(0, DV_P)
    rows = b64 * T + offs_t
    m_t = load_tile(m_ptr, H1_P, D_P, True)              # M^T [D, H1]
    dk = tl.trans(mma(m_t, dz1.to(m_ptr.dtype.element_ty),
                       tl.zeros((D_P, BLOCK_T), tl.float32), DOT_F32,
                       INPUT_PRECISION))                 # [BLOCK_T, D]
    dv = w[:, None] * dout[None, :]
    if VALUES_ARE_KEYS:
        dk += dv
    else:
        dv_ptrs = dv_ptr + rows[:, None] * DV + offs_dv[None, :]
        dv_mask = t_ok[:, None] & (offs_dv < DV)[None, :]
        if MULTI_CANDIDATE:
            dv += tl.load(dv_ptrs, mask=dv_mask & (c > 0),
                          other=0.0).to(tl.float32)
        tl.store(dv_ptrs, dv, mask=dv_mask)
    dk_ptrs = dk_ptr + rows[:, None] * D + offs_d[None, :]
    dk_mask = t_ok[:, None] & (offs_d < D)[None, :]
    if MULTI_CANDIDATE:
        dk += tl.load(dk_ptrs, mask=dk_mask & (c > 0), other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk, mask=dk_mask)



@triton.jit
def first_layer_tile(acc_p, acc_g, dz1, tile, history, cand, FIRST_D0: tl.constexpr,
                     FIRST_DC: tl.constexpr, D_P: tl.constexpr, DOT_F32: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    """The first layer's sums over one tile: P += dz1 k^T on the key columns
    FIRST_D0 + [0, FIRST_DC) ([H1_P, FIRST_DC]), G += sum_t dz1."""
    offs_t, _, valid, keys, _, _, _, _, _, _, _, _ = tile
    k_ptr, _, _, _, T, D, _ = history
    b64 = cand[0]
    if FIRST_DC < D_P:
        offs_p = FIRST_D0 + tl.arange(0, FIRST_DC)
        rows = b64 * T + offs_t
        keys = tl.load(k_ptr + rows[:, None] * D + offs_p[None, :],
                       mask=valid[:, None] & (offs_p < D)[None, :], other=0.0)
    return (mma(dz1.to(keys.dtype), keys, acc_p, DOT_F32, INPUT_PRECISION),
            acc_g + tl.sum(dz1, axis=1))


@triton.jit
def store_first_layer_sums(q_ptr, wp_ptr, dq_ptr, g_ptr, part_k_ptr, part_qk_ptr, acc_p, acc_g,
                           history, cand, slot, FIRST_D0: tl.constexpr, FIRST_DC: tl.constexpr,
                           D_P: tl.constexpr, H1_P: tl.constexpr):
    """One (row, candidate)'s first-layer sums out: G for the host (dW_q, dq's
    fold term; from the launch with the first key columns), the query's W_p
    term on this launch's columns, and the P partials sum P and sum P * q
    added to the program's slot."""
    D = history[5]
    bc = cand[1]
    offs_h1 = tl.arange(0, H1_P)
    offs_p = FIRST_D0 + tl.arange(0, FIRST_DC)
    if FIRST_D0 == 0:
        tl.store(g_ptr + bc * H1_P + offs_h1, acc_g)
    wp = tl.load(wp_ptr + offs_h1[:, None] * D_P + offs_p[None, :]).to(tl.float32)
    tl.store(dq_ptr + bc * D_P + offs_p, tl.sum(wp * acc_p, axis=0))
    q_p = tl.load(q_ptr + bc * D + offs_p, mask=offs_p < D, other=0.0).to(tl.float32)
    part = slot * H1_P * D_P + FIRST_D0
    add_to_tile(part_k_ptr + part, acc_p, H1_P, FIRST_DC, D_P)
    add_to_tile(part_qk_ptr + part, acc_p * q_p[None, :], H1_P, FIRST_DC, D_P)


@triton.jit
def add_to_tile(ptr, tile, RP: tl.constexpr, SP: tl.constexpr, STRIDE: tl.constexpr):
    """ptr[RP, SP] += tile, rows STRIDE apart: a program's private partial, so no
    race and no atomics."""
    offs = tl.arange(0, RP)[:, None] * STRIDE + tl.arange(0, SP)[None, :]
    tl.store(ptr + offs, tl.load(ptr + offs) + tile)


@triton.jit
def add_to_vector(ptr, vector, N: tl.constexpr):
    """ptr[N] += vector, as add_to_tile."""
    offs = tl.arange(0, N)
    tl.store(ptr + offs, tl.load(ptr + offs) + vector)


@triton.jit
def add_unit_grads(ptr, layer: tl.constexpr, db, da, dmu, dvar, UNIT_W: tl.constexpr,
                   HP: tl.constexpr):
    """One layer's (bias, a, mu, var) gradients added to a [L, 4, UNIT_W] partial."""
    base = ptr + layer * 4 * UNIT_W
    add_to_vector(base, db, HP)
    add_to_vector(base + UNIT_W, da, HP)
    add_to_vector(base + 2 * UNIT_W, dmu, HP)
    add_to_vector(base + 3 * UNIT_W, dvar, HP)


@triton.jit
def add_layer_grads(part_w_ptr, part_unit_ptr, layer: tl.constexpr, grads, IN_P: tl.constexpr,
                    OUT_P: tl.constexpr, UNIT_W: tl.constexpr):
    """A deeper layer's sums (zero_layer_grads) added to the program's partials:
    W^T at part_w_ptr [IN_P, OUT_P], the unit vectors to part_unit_ptr."""
    acc_w, acc_b, acc_a, acc_mu, acc_var = grads
    add_to_tile(part_w_ptr, acc_w, IN_P, OUT_P, OUT_P)
    add_unit_grads(part_unit_ptr, layer, acc_b, acc_a, acc_mu, acc_var, UNIT_W, OUT_P)


@triton.jit
def output_layer_tile(sums, tile):
    """The output layer's sums over one tile: (W_out += h_last ds, b_out += ds)."""
    _, _, _, _, ds, _, _, _, _, _, _, h_last = tile
    acc_wout, acc_bout = sums
    return acc_wout + tl.sum(h_last * ds[None, :], axis=1), acc_bout + tl.sum(ds, axis=0)


@triton.jit
def add_output_grads(part_out_ptr, slot, sums, HL_P: tl.constexpr):
    """The output layer's sums added to the program's [HL_P + 1] partial (W_out, b_out)."""
    acc_wout, acc_bout = sums
    add_to_vector(part_out_ptr + slot * (HL_P + 1), acc_wout, HL_P)
    add_to_vector(part_out_ptr + slot * (HL_P + 1) + HL_P, acc_bout, 1)
