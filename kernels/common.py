"""What the forward and backward kernels share: device-side helpers (the
dots, the activations, the unit parameters, weight tiles) and host-side
choices (tile budget, padding, the folded parameters, where a launch runs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from din_fast.problem import split_first_layer
from . import MAX_HIDDEN_LAYERS, interpreting  # noqa: F401 (re-exported for the launchers)

@triton.jit
def mma(a, b, acc, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b, in b's dtype on the GPU.

    Under TRITON_INTERPRET=1 (DOT_F32) both operands go to float32 first: the
    interpreter's bfloat16 dot multiplies raw bit patterns. The values are
    still the low-precision ones, so the interpreter sees the GPU's rounding.
    """
    if DOT_F32:
        return tl.dot(a.to(b.dtype).to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def program_candidates(C, BLOCK_C: tl.constexpr):
    """(b, offs_c, c_ok): the history row (int64) and the block of BLOCK_C
    candidates of this program, axis 0 of a grid (B * cdiv(C, BLOCK_C), ...)."""
    pid = tl.program_id(0)
    c_blocks = tl.cdiv(C, BLOCK_C)
    b = (pid // c_blocks).to(tl.int64)
    offs_c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    return b, offs_c, offs_c < C


@triton.jit
def split_positions(T, t_per_split):
    """(t_lo, t_hi): the positions this program owns, axis 1 of the grid
    numbering the splits of a row (flash-decoding)."""
    t_lo = tl.program_id(1) * t_per_split
    return t_lo, tl.minimum(t_lo + t_per_split, T)


@triton.jit
def length_stop(len_ptr, b, t_hi, T):
    """Where the valid prefix of padded row b ends within positions up to
    t_hi: its length, clamped into [0, T] so nothing reads past the row."""
    n = tl.load(len_ptr + b).to(tl.int32)
    return tl.minimum(t_hi, tl.maximum(tl.minimum(n, T), 0))


@triton.jit
def tile_positions(t0, t_stop, mask_ptr, b, stride_mb, HAS_MASK: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """(offs_t, t_valid): the tile's positions from t0, and which are valid:
    before t_stop and, with HAS_MASK, set in row b of the mask."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_valid = offs_t < t_stop
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * stride_mb + offs_t, mask=t_valid, other=0)
        t_valid = t_valid & (keep != 0)
    return offs_t, t_valid


@triton.jit
def unit_params(unit_ptr, layer: tl.constexpr, start, UNIT_W: tl.constexpr,
                 WIDTH: tl.constexpr):
    """Layer `layer`'s per-unit (bias, a, mu, rstd) of units start..start+WIDTH."""
    base = unit_ptr + layer * 4 * UNIT_W + start + tl.arange(0, WIDTH)
    bias = tl.load(base)
    a = tl.load(base + UNIT_W)
    mu = tl.load(base + 2 * UNIT_W)
    rstd = tl.load(base + 3 * UNIT_W)
    return bias, a, mu, rstd


@triton.jit
def activate(x, a, mu, rstd, ACTIVATION: tl.constexpr):
    """The hidden layers' activations on a tile; dice in its inference form. a, mu
    and rstd come already shaped to broadcast against x: [1, H] when units run
    along columns (the forward), [H, 1] when along rows (the backward)."""
    if ACTIVATION == "sigmoid":
        return tl.sigmoid(x)
    elif ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "prelu":
        return tl.where(x > 0, x, a * x)
    else:
        p = tl.sigmoid((x - mu) * rstd)
        return x * (a + p * (1.0 - a))


@triton.jit
def load_tile(ptr, RP: tl.constexpr, SP: tl.constexpr, TRANSPOSE: tl.constexpr):
    """A zero-padded row-major [RP, SP] matrix (its [SP, RP] transpose with TRANSPOSE)."""
    if TRANSPOSE:
        return tl.load(ptr + tl.arange(0, RP)[None, :] * SP + tl.arange(0, SP)[:, None])
    else:
        return tl.load(ptr + tl.arange(0, RP)[:, None] * SP + tl.arange(0, SP)[None, :])


@triton.jit
def store_tile(ptr, tile, RP: tl.constexpr, SP: tl.constexpr):
    """ptr[RP, SP] = tile, row-major."""
    tl.store(ptr + tl.arange(0, RP)[:, None] * SP + tl.arange(0, SP)[None, :], tile)


# Elements of the widest [pairs, units] tile one program holds in 16-bit
# inputs (float32: half, ForwardSpec.blocks). python -m din_fast.kernels.aot
# compiles every specialization of the grid with the warp count its launcher
# takes (ForwardSpec.num_warps) and checks it spill-free. Software pipelining
# (num_stages > 1) costs more registers than it saves here.
TILE_BUDGET = 4096
NUM_STAGES = 1
TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def launch_device(device: torch.device):
    """The context every launch runs in: Triton launches on the current CUDA
    device and its current stream, so that must be the tensors' device (a
    model on cuda:1 without torch.cuda.set_device), not whatever is current."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def cuda_matmul_tf32() -> bool:
    """Whether float32 matmuls may use TF32 on CUDA, as the user set it with
    either of PyTorch's APIs. The new one (fp32_precision) where it exists:
    reading the legacy allow_tf32 raises once a program has used the new one."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def padded(n: int) -> int:
    """A tile width for n: a power of two, at least 16 (the tl.dot minimum)."""
    return max(16, triton.next_power_of_2(n))


@dataclass
class FoldedParameters:
    """The MLP's parameters as the kernels read them, zero-padded to tile widths.

    H_i_P = padded(H_i), D_P = D rounded up to BLOCK_D; the padding is exact
    (padded units meet zero weights).
    """

    u: torch.Tensor          # [B, C, H1_P] float32: q (W_q + W_d)^T + b_1
    w_p: torch.Tensor        # [D_P, H1_P] W_p^T, in the inputs' dtype
    w_a: torch.Tensor        # [D_P, H1_P] (W_k - W_d)^T, in the inputs' dtype
    deeper: list             # W_i^T [H_{i-1}_P, H_i_P] for i >= 2, in the inputs' dtype
    unit: torch.Tensor       # [L, 4, max H_i_P] float32: bias, a, mu, 1/sqrt(var + eps)
    w_out: torch.Tensor      # [H_L_P] float32
    b_out: torch.Tensor      # [1] float32


def pad_to(tensor: torch.Tensor, shape, dtype) -> torch.Tensor:
    """tensor in the top-left corner of a zero tensor of `shape`."""
    out = tensor.new_zeros(shape, dtype=dtype)
    out[tuple(slice(0, n) for n in tensor.shape)] = tensor.to(dtype)
    return out


def fold_parameters(problem, block_d: int) -> FoldedParameters:
    """For a DINProblem or a JaggedDINProblem: reads the query and the parameters."""
    dtype = problem.query.dtype
    f32 = torch.float32
    hidden = problem.hidden_units
    widths = [padded(h) for h in hidden]
    # At least one block of rows: D = 0 still gives the kernels a tile to load.
    rows = max(1, triton.cdiv(problem.query.shape[2], block_d)) * block_d
    w_q, w_k, w_d, w_p = (w.to(f32) for w in split_first_layer(problem.weights[0]))
    u = problem.query.to(f32) @ pad_to((w_q + w_d).t(), (w_q.shape[1], widths[0]), f32) \
        + pad_to(problem.biases[0], (widths[0],), f32)
    unit = torch.zeros(len(hidden), 4, max(widths), dtype=f32, device=problem.query.device)
    for i, (width, bias, params) in enumerate(zip(hidden, problem.biases, problem.act_params)):
        unit[i, 0, :width] = bias.to(f32)
        if problem.activation in ("prelu", "dice"):
            unit[i, 1, :width] = params[0].to(f32)
        if problem.activation == "dice":
            unit[i, 2, :width] = params[1].to(f32)
            unit[i, 3, :width] = torch.rsqrt(params[2].to(f32) + problem.dice_eps)
    return FoldedParameters(
        u=u.contiguous(),
        w_p=pad_to(w_p.t(), (rows, widths[0]), dtype),
        w_a=pad_to((w_k - w_d).t(), (rows, widths[0]), dtype),
        deeper=[pad_to(w.t(), (n_in, n_out), dtype)
                for w, n_in, n_out in zip(problem.weights[1:-1], widths, widths[1:])],
        unit=unit,
        w_out=pad_to(problem.weights[-1].reshape(-1), (widths[-1],), f32),
        b_out=problem.biases[-1].to(f32).reshape(1).contiguous(),
    )


def device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor
