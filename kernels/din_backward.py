"""The fused backward of the DIN activation unit + attention pooling.

FlashAttention's method: nothing of the forward is stored but the pooled
output and, for softmax, the per-(b, c) max and sum of the scaled scores. The
kernel recomputes the MLP tile by tile from the keys and runs the chain rule
on the spot, so no [B, C, T, H] or [B, C, T, 4D] tensor ever reaches memory.

One program owns whole rows (a persistent grid: rows pid, pid + P, ...), so
the key and value gradients of a row, summed over its candidates, are written
by one program only; the weight gradients, summed over every (b, c, t), are
accumulated per program in float32 and reduced in a fixed order on the host.
No atomics: two backward passes give bitwise-identical gradients.

The first layer goes through the fold z1 = u + M k with u = (W_q + W_d) q + b_1
and M = (W_k - W_d) + W_p * q. Per (b, c) the kernel accumulates
P = sum_t dz1_t k_t^T ([H_1, D]) and G = sum_t dz1_t ([H_1]); everything else
of the first layer follows from them:
    dW_q = sum G q^T,  dW_k = sum P,  dW_d = dW_q - dW_k,  dW_p = sum P * q,
    db_1 = sum G,      dq = (W_q + W_d)^T G + colsum(W_p * P),  dk_t = M^T dz1_t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from din_fast.problem import DINProblem, split_first_layer

from .din_forward import interpreting, padded

ACTIVATION_CODES = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
MAX_HIDDEN_LAYERS = 3
MASK_NONE, MASK_LENGTHS, MASK_BOOL = 0, 1, 2


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter's low-precision tl.dot multiplies raw bit patterns, so
    # under TRITON_INTERPRET=1 the operands go up to float32; compiled code
    # keeps the real bf16/fp16 tensor-core dot.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _activate(z, a, mu, rstd, ACT: tl.constexpr):
    if ACT == 0:
        return tl.sigmoid(z)
    elif ACT == 1:
        return tl.maximum(z, 0.0)
    elif ACT == 2:
        return tl.where(z > 0, z, a * z)
    else:
        p = tl.sigmoid((z - mu) * rstd)
        return z * (a + p * (1.0 - a))


@triton.jit
def _activation_backward(z, dh, a, mu, rstd, ACT: tl.constexpr):
    """dz, and per element the gradient terms of the unit parameters (a, mu, var)."""
    zero = tl.zeros_like(z)
    if ACT == 0:
        p = tl.sigmoid(z)
        return dh * p * (1.0 - p), zero, zero, zero
    elif ACT == 1:
        return tl.where(z > 0, dh, 0.0), zero, zero, zero
    elif ACT == 2:
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
def _unit_params(p_ptr, H, HP: tl.constexpr, dice_eps):
    """Rows [1, HP] of a layer's (a, mu, 1/sqrt(var + eps)), stored as a [3, H] tensor."""
    offs = tl.arange(0, HP)
    inside = offs < H
    a = tl.load(p_ptr + offs, mask=inside, other=0.0)
    mu = tl.load(p_ptr + H + offs, mask=inside, other=0.0)
    var = tl.load(p_ptr + 2 * H + offs, mask=inside, other=1.0)
    return a[None, :], mu[None, :], (1.0 / tl.sqrt(var + dice_eps))[None, :]


@triton.jit
def _load_matrix(ptr, R, S, RP: tl.constexpr, SP: tl.constexpr):
    """A row-major [R, S] float32 matrix as an [RP, SP] tile, zero padded."""
    r = tl.arange(0, RP)[:, None]
    s = tl.arange(0, SP)[None, :]
    return tl.load(ptr + r * S + s, mask=(r < R) & (s < S), other=0.0)


@triton.jit
def _add_to_matrix(ptr, tile, R, S, RP: tl.constexpr, SP: tl.constexpr):
    """ptr[:R, :S] += tile: a program's private partial, so no race and no atomics."""
    r = tl.arange(0, RP)[:, None]
    s = tl.arange(0, SP)[None, :]
    inside = (r < R) & (s < S)
    tl.store(ptr + r * S + s, tl.load(ptr + r * S + s, mask=inside, other=0.0) + tile, mask=inside)


@triton.jit
def _store_vector(ptr, vec, N, NP: tl.constexpr):
    offs = tl.arange(0, NP)
    tl.store(ptr + offs, vec, mask=offs < N)


@triton.jit
def _store_param_grads(ptr, ga, gmu, gvar, H, HP: tl.constexpr):
    _store_vector(ptr, ga, H, HP)
    _store_vector(ptr + H, gmu, H, HP)
    _store_vector(ptr + 2 * H, gvar, H, HP)


@triton.jit
def _din_backward_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, mask_ptr,
    wqd_ptr, wkd_ptr, wp_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wout_ptr, bout_ptr,
    p1_ptr, p2_ptr, p3_ptr,
    dout_ptr, gs_ptr, row_max_ptr, row_sum_ptr, delta_ptr,
    dq_ptr, dk_ptr, dv_ptr, g_ptr,
    part_k_ptr, part_qk_ptr, part_w2_ptr, part_b2_ptr, part_w3_ptr, part_b3_ptr,
    part_wout_ptr, part_bout_ptr, part_p1_ptr, part_p2_ptr, part_p3_ptr,
    B, C, T, D, DV, H1, H2, H3, scale, dice_eps,
    NUM_PROGRAMS: tl.constexpr, LAYERS: tl.constexpr, ACT: tl.constexpr,
    SOFTMAX: tl.constexpr, MASK_MODE: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr,
    VALUES_ARE_KEYS: tl.constexpr, BLOCK_T: tl.constexpr, DP: tl.constexpr,
    DVP: tl.constexpr, H1P: tl.constexpr, H2P: tl.constexpr, H3P: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, DP)
    offs_dv = tl.arange(0, DVP)
    offs_h1 = tl.arange(0, H1P)
    offs_tb = tl.arange(0, BLOCK_T)
    d_in = offs_d < D
    dv_in = offs_dv < DV

    dot_dtype = k_ptr.dtype.element_ty
    b1 = tl.load(b1_ptr + offs_h1, mask=offs_h1 < H1, other=0.0)
    a1, mu1, rstd1 = _unit_params(p1_ptr, H1, H1P, dice_eps)
    if LAYERS == 1:
        HL = H1
        HLP: tl.constexpr = H1P
    elif LAYERS == 2:
        HL = H2
        HLP: tl.constexpr = H2P
    else:
        HL = H3
        HLP: tl.constexpr = H3P
    offs_hl = tl.arange(0, HLP)
    wout = tl.load(wout_ptr + offs_hl, mask=offs_hl < HL, other=0.0)
    bout = tl.load(bout_ptr)

    # Per-program weight-gradient partials (the first layer's go through memory,
    # flushed once per (b, c), to keep the register file for the tiles).
    acc_wout = tl.zeros([HLP], dtype=tl.float32)
    acc_bout = tl.zeros([1], dtype=tl.float32)
    acc_p1a = tl.zeros([H1P], dtype=tl.float32)
    acc_p1m = tl.zeros([H1P], dtype=tl.float32)
    acc_p1v = tl.zeros([H1P], dtype=tl.float32)
    if LAYERS >= 2:
        w2 = _load_matrix(w2_ptr, H2, H1, H2P, H1P).to(dot_dtype)
        b2 = tl.load(b2_ptr + tl.arange(0, H2P), mask=tl.arange(0, H2P) < H2, other=0.0)
        a2, mu2, rstd2 = _unit_params(p2_ptr, H2, H2P, dice_eps)
        acc_w2 = tl.zeros([H2P, H1P], dtype=tl.float32)
        acc_b2 = tl.zeros([H2P], dtype=tl.float32)
        acc_p2a = tl.zeros([H2P], dtype=tl.float32)
        acc_p2m = tl.zeros([H2P], dtype=tl.float32)
        acc_p2v = tl.zeros([H2P], dtype=tl.float32)
    if LAYERS >= 3:
        w3 = _load_matrix(w3_ptr, H3, H2, H3P, H2P).to(dot_dtype)
        b3 = tl.load(b3_ptr + tl.arange(0, H3P), mask=tl.arange(0, H3P) < H3, other=0.0)
        a3, mu3, rstd3 = _unit_params(p3_ptr, H3, H3P, dice_eps)
        acc_w3 = tl.zeros([H3P, H2P], dtype=tl.float32)
        acc_b3 = tl.zeros([H3P], dtype=tl.float32)
        acc_p3a = tl.zeros([H3P], dtype=tl.float32)
        acc_p3m = tl.zeros([H3P], dtype=tl.float32)
        acc_p3v = tl.zeros([H3P], dtype=tl.float32)

    for b in range(pid, B, NUM_PROGRAMS):
        b64 = tl.cast(b, tl.int64)
        if MASK_MODE == 1:
            length = tl.minimum(tl.maximum(tl.load(len_ptr + b64), 0), T)
        for c in range(0, C):
            bc = b64 * C + c
            q = tl.load(q_ptr + bc * D + offs_d, mask=d_in, other=0.0).to(tl.float32)
            # The fold, per candidate; the [H1, D] weight blocks (folded by the
            # host: W_q + W_d, W_k - W_d, W_p) come from cache, not registers.
            wqd = _load_matrix(wqd_ptr, H1, D, H1P, DP)
            u = tl.sum(wqd * q[None, :], axis=1) + b1                      # [H1P]
            m = (_load_matrix(wkd_ptr, H1, D, H1P, DP)
                 + _load_matrix(wp_ptr, H1, D, H1P, DP) * q[None, :]).to(dot_dtype)
            dout = tl.load(dout_ptr + bc * DV + offs_dv, mask=dv_in, other=0.0).to(tl.float32)
            if SOFTMAX:
                row_max = tl.load(row_max_ptr + bc)
                row_sum = tl.load(row_sum_ptr + bc)
                inv_sum = tl.where(row_sum > 0, 1.0 / tl.where(row_sum > 0, row_sum, 1.0), 0.0)
                delta = tl.load(delta_ptr + bc)
            acc_p = tl.zeros([H1P, DP], dtype=tl.float32)                  # P = sum_t dz1 k^T
            acc_g = tl.zeros([H1P], dtype=tl.float32)                      # G = sum_t dz1
            for t0 in range(0, T, BLOCK_T):
                offs_t = t0 + offs_tb
                in_range = offs_t < T
                if MASK_MODE == 0:
                    valid = in_range
                elif MASK_MODE == 1:
                    valid = offs_t < length
                else:
                    valid = tl.load(mask_ptr + b64 * T + offs_t, mask=in_range, other=0) != 0
                row_t = b64 * T + offs_t
                keys = tl.load(k_ptr + row_t[:, None] * D + offs_d[None, :],
                               mask=in_range[:, None] & d_in[None, :], other=0.0)

                # Forward recompute of this tile.
                z1 = _mm(keys, tl.trans(m), PRECISION, UPCAST) + u[None, :]
                h1 = _activate(z1, a1, mu1, rstd1, ACT)
                if LAYERS >= 2:
                    z2 = _mm(h1.to(dot_dtype), tl.trans(w2), PRECISION, UPCAST) \
                        + b2[None, :]
                    h2 = _activate(z2, a2, mu2, rstd2, ACT)
                if LAYERS >= 3:
                    z3 = _mm(h2.to(dot_dtype), tl.trans(w3), PRECISION, UPCAST) \
                        + b3[None, :]
                    h3 = _activate(z3, a3, mu3, rstd3, ACT)
                if LAYERS == 1:
                    h_last = h1
                elif LAYERS == 2:
                    h_last = h2
                else:
                    h_last = h3
                s = tl.sum(h_last * wout[None, :], axis=1) + bout          # [BLOCK_T]

                # Pooling and normalization backward: ds = d loss / d s.
                vals = tl.load(v_ptr + row_t[:, None] * DV + offs_dv[None, :],
                               mask=in_range[:, None] & dv_in[None, :], other=0.0).to(tl.float32)
                dw = tl.sum(vals * dout[None, :], axis=1)
                if HAS_GRAD_SCORES:
                    dw += tl.load(gs_ptr + bc * T + offs_t, mask=in_range, other=0.0).to(tl.float32)
                if SOFTMAX:
                    logits = tl.where(valid, scale * s - row_max, float("-inf"))
                    w = tl.exp(logits) * inv_sum
                    ds = scale * w * (dw - delta)
                else:
                    w = tl.where(valid, scale * s, 0.0)
                    ds = tl.where(valid, scale * dw, 0.0)
                dv_tile = w[:, None] * dout[None, :]                          # [BLOCK_T, DVP]

                # MLP backward, output layer first.
                acc_wout += tl.sum(ds[:, None] * h_last, axis=0)
                acc_bout += tl.sum(ds, axis=0)
                dh = ds[:, None] * wout[None, :]
                if LAYERS >= 3:
                    dz3, ta, tm, tv = _activation_backward(z3, dh, a3, mu3, rstd3, ACT)
                    acc_p3a += tl.sum(ta, axis=0)
                    acc_p3m += tl.sum(tm, axis=0)
                    acc_p3v += tl.sum(tv, axis=0)
                    acc_b3 += tl.sum(dz3, axis=0)
                    dz3_lp = dz3.to(dot_dtype)
                    acc_w3 += _mm(tl.trans(dz3_lp), h2.to(dot_dtype), PRECISION, UPCAST)
                    dh = _mm(dz3_lp, w3, PRECISION, UPCAST)
                if LAYERS >= 2:
                    dz2, ta, tm, tv = _activation_backward(z2, dh, a2, mu2, rstd2, ACT)
                    acc_p2a += tl.sum(ta, axis=0)
                    acc_p2m += tl.sum(tm, axis=0)
                    acc_p2v += tl.sum(tv, axis=0)
                    acc_b2 += tl.sum(dz2, axis=0)
                    dz2_lp = dz2.to(dot_dtype)
                    acc_w2 += _mm(tl.trans(dz2_lp), h1.to(dot_dtype), PRECISION, UPCAST)
                    dh = _mm(dz2_lp, w2, PRECISION, UPCAST)
                dz1, ta, tm, tv = _activation_backward(z1, dh, a1, mu1, rstd1, ACT)
                acc_p1a += tl.sum(ta, axis=0)
                acc_p1m += tl.sum(tm, axis=0)
                acc_p1v += tl.sum(tv, axis=0)
                acc_g += tl.sum(dz1, axis=0)
                dz1_lp = dz1.to(dot_dtype)
                acc_p += _mm(tl.trans(dz1_lp), keys, PRECISION, UPCAST)
                dk_tile = _mm(dz1_lp, m, PRECISION, UPCAST)                  # [BLOCK_T, DP]

                # The row's key/value gradients sum over its candidates: the
                # first candidate writes, the others add (same program).
                if VALUES_ARE_KEYS:
                    dk_tile += dv_tile
                else:
                    dv_ptrs = dv_ptr + row_t[:, None] * DV + offs_dv[None, :]
                    dv_mask = in_range[:, None] & dv_in[None, :]
                    dv_prev = tl.load(dv_ptrs, mask=dv_mask & (c > 0), other=0.0).to(tl.float32)
                    tl.store(dv_ptrs, dv_prev + dv_tile, mask=dv_mask)
                dk_ptrs = dk_ptr + row_t[:, None] * D + offs_d[None, :]
                dk_mask = in_range[:, None] & d_in[None, :]
                dk_prev = tl.load(dk_ptrs, mask=dk_mask & (c > 0), other=0.0).to(tl.float32)
                tl.store(dk_ptrs, dk_prev + dk_tile, mask=dk_mask)

            # Per (b, c): the query's W_p term, G for the host, the P partials.
            wp = _load_matrix(wp_ptr, H1, D, H1P, DP)
            tl.store(dq_ptr + bc * D + offs_d, tl.sum(wp * acc_p, axis=0), mask=d_in)
            tl.store(g_ptr + bc * H1 + offs_h1, acc_g, mask=offs_h1 < H1)
            _add_to_matrix(part_k_ptr + pid * H1 * D, acc_p, H1, D, H1P, DP)
            _add_to_matrix(part_qk_ptr + pid * H1 * D, acc_p * q[None, :], H1, D, H1P, DP)

    _store_vector(part_wout_ptr + pid * HL, acc_wout, HL, HLP)
    tl.store(part_bout_ptr + pid + tl.arange(0, 1), acc_bout)
    _store_param_grads(part_p1_ptr + pid * 3 * H1, acc_p1a, acc_p1m, acc_p1v, H1, H1P)
    if LAYERS >= 2:
        _add_to_matrix(part_w2_ptr + pid * H2 * H1, acc_w2, H2, H1, H2P, H1P)
        _store_vector(part_b2_ptr + pid * H2, acc_b2, H2, H2P)
        _store_param_grads(part_p2_ptr + pid * 3 * H2, acc_p2a, acc_p2m, acc_p2v, H2, H2P)
    if LAYERS >= 3:
        _add_to_matrix(part_w3_ptr + pid * H3 * H2, acc_w3, H3, H2, H3P, H2P)
        _store_vector(part_b3_ptr + pid * H3, acc_b3, H3, H3P)
        _store_param_grads(part_p3_ptr + pid * 3 * H3, acc_p3a, acc_p3m, acc_p3v, H3, H3P)


def _unit_param_table(problem: DINProblem, layer: int, device) -> torch.Tensor:
    """A hidden layer's (a, mu, var) as one float32 [3, H] tensor (unused rows: 0, 0, 1)."""
    width = problem.hidden_units[layer]
    table = torch.zeros(3, width, dtype=torch.float32, device=device)
    table[2] = 1.0
    for row, param in enumerate(problem.act_params[layer]):
        table[row] = param.detach().float()
    return table


def _num_programs(batch: int, device: torch.device) -> int:
    """Persistent grid: enough programs to fill the GPU, each owning several rows."""
    if device.type == "cuda":
        return max(1, min(batch, 2 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(batch, 3))


def din_backward(problem: DINProblem, grad_pooled: torch.Tensor, pooled: torch.Tensor,
                 row_max: torch.Tensor, row_sum: torch.Tensor,
                 grad_scores: torch.Tensor | None = None, scores: torch.Tensor | None = None):
    """Gradients of din_attention from the fused backward kernel.

    grad_pooled and pooled are [B, C, Dv]; row_max / row_sum the forward's
    float32 [B, C] softmax statistics (unused for normalization=None);
    grad_scores, when the weights w were returned and used, is d loss / d w
    [B, C, T], with scores = w. Returns (dq [B, C, D], dk [B, T, D],
    dv [B, T, Dv] or None, dweights, dbiases, dact_params) in the dtypes of the
    inputs; dact_params has per layer () / (da,) / (da, dmu, dvar).
    """
    query, keys = problem.query, problem.keys
    batch, candidates, embed_dim = query.shape
    length = keys.shape[1]
    values = problem.value_tensor
    value_dim = values.shape[2]
    hidden = problem.hidden_units
    layers = len(hidden)
    if layers > MAX_HIDDEN_LAYERS:
        raise ValueError(f"din_backward: the fused kernel supports 1 to {MAX_HIDDEN_LAYERS} hidden "
                         f"layers; got {layers}")
    device = keys.device
    f32 = dict(dtype=torch.float32, device=device)
    softmax = problem.normalization == "softmax"

    w_q, w_k, w_d, w_p = (block.detach().float() for block in
                          split_first_layer(problem.weights[0]))
    w_qd = (w_q + w_d).contiguous()
    weights = [w.detach().float().contiguous() for w in problem.weights]
    biases = [b.detach().float().contiguous() for b in problem.biases]
    widths = list(hidden) + [1] * (MAX_HIDDEN_LAYERS - layers)
    params = [_unit_param_table(problem, i, device) for i in range(layers)]

    grad_pooled = grad_pooled.contiguous()
    delta = None
    if softmax:
        # FlashAttention's row term: sum_t w_t (dout . v_t) = dout . pooled.
        delta = (grad_pooled.float() * pooled.float()).sum(-1)
        if grad_scores is not None:
            delta = delta + (grad_scores.float() * scores.float()).sum(-1)
        delta = delta.contiguous()

    programs = _num_programs(batch, device)
    launch = batch > 0 and length > 0
    alloc = torch.empty if launch else torch.zeros
    # dk/dv are summed over candidates in place: float32 unless a single candidate writes.
    grad_dtype = keys.dtype if candidates == 1 else torch.float32
    dq_part = alloc(batch, candidates, embed_dim, **f32)
    dk = alloc(batch, length, embed_dim, dtype=grad_dtype, device=device)
    dv = None if problem.values is None else alloc(batch, length, value_dim,
                                                   dtype=grad_dtype, device=device)
    g = alloc(batch, candidates, hidden[0], **f32)
    part_k = torch.zeros(programs, hidden[0], embed_dim, **f32)
    part_qk = torch.zeros_like(part_k)
    part_w = [torch.zeros(programs, widths[i], widths[i - 1], **f32) for i in (1, 2)]
    part_b = [torch.zeros(programs, widths[i], **f32) for i in (1, 2)]
    part_wout = torch.zeros(programs, hidden[-1], **f32)
    part_bout = torch.zeros(programs, **f32)
    part_params = [torch.zeros(programs, 3, width, **f32) for width in widths]

    def weight_or(i, fallback):
        return weights[i] if i < layers else fallback

    if launch:
        _din_backward_kernel[(programs,)](
            query.contiguous(), keys.contiguous(), values.contiguous(),
            problem.lengths if problem.lengths is not None else g,
            problem.mask.contiguous().view(torch.uint8) if problem.mask is not None else g,
            w_qd, (w_k - w_d).contiguous(), w_p.contiguous(), biases[0],
            weight_or(1, g), biases[1] if layers >= 2 else g,
            weight_or(2, g), biases[2] if layers >= 3 else g,
            weights[-1], biases[-1],
            params[0], params[1] if layers >= 2 else g, params[2] if layers >= 3 else g,
            grad_pooled,
            grad_scores.contiguous() if grad_scores is not None else g,
            row_max.contiguous() if softmax else g, row_sum.contiguous() if softmax else g,
            delta if softmax else g,
            dq_part, dk, dv if dv is not None else dk, g,
            part_k, part_qk, part_w[0], part_b[0], part_w[1], part_b[1],
            part_wout, part_bout, part_params[0], part_params[1], part_params[2],
            batch, candidates, length, embed_dim, value_dim, widths[0], widths[1], widths[2],
            problem.scale, problem.dice_eps,
            NUM_PROGRAMS=programs, LAYERS=layers, ACT=ACTIVATION_CODES[problem.activation],
            SOFTMAX=softmax,
            MASK_MODE=(MASK_BOOL if problem.mask is not None
                       else MASK_LENGTHS if problem.lengths is not None else MASK_NONE),
            HAS_GRAD_SCORES=grad_scores is not None, VALUES_ARE_KEYS=problem.values is None,
            BLOCK_T=16 if length <= 16 else 32, DP=padded(embed_dim), DVP=padded(value_dim),
            H1P=padded(widths[0]), H2P=padded(widths[1]), H3P=padded(widths[2]),
            PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
            UPCAST=interpreting(), num_warps=8,
        )

    # Host epilogue: the first layer from G and the P partials, fixed-order sums.
    g_flat = g.view(-1, hidden[0])
    dw_q = g_flat.t() @ query.reshape(-1, embed_dim).float()
    dw_k = part_k.sum(0)
    dw1 = torch.cat([dw_q, dw_k, dw_q - dw_k, part_qk.sum(0)], dim=1)
    dq = dq_part + g @ w_qd
    dweights = [dw1] + [part_w[i - 1].sum(0) for i in range(1, layers)] \
        + [part_wout.sum(0)[None, :]]
    dbiases = [g_flat.sum(0)] + [part_b[i - 1].sum(0) for i in range(1, layers)] \
        + [part_bout.sum(0, keepdim=True)]
    dact = [tuple(part_params[i].sum(0)[row] for row in range(len(problem.act_params[i])))
            for i in range(layers)]
    return (
        dq.to(query.dtype), dk.to(keys.dtype), None if dv is None else dv.to(keys.dtype),
        [d.to(w.dtype) for d, w in zip(dweights, problem.weights)],
        [d.to(b.dtype) for d, b in zip(dbiases, problem.biases)],
        [tuple(d.to(p.dtype) for d, p in zip(grads, ps))
         for grads, ps in zip(dact, problem.act_params)],
    )
