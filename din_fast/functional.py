"""din_attention: the public functional API and the backend dispatch."""

from __future__ import annotations

import contextlib
import os

import torch

from .ops import run_attention_op
from .problem import (BACKENDS, DEFAULT_DICE_EPS, DINProblem, JaggedDINProblem, validate,
                      validate_jagged)
from .reference import reference_din_attention
from .torch_backend import (differentiable_din_attention, torch_din_attention,
                            torch_din_attention_jagged)
from .triton_backend import (triton_din_attention, triton_din_attention_jagged,
                             triton_unsupported_reason)

BACKEND_ENV = "DIN_FAST_BACKEND"


def resolve_backend(backend: str, problem) -> str:
    """The concrete backend for a call (a DINProblem or a JaggedDINProblem):
    "auto" becomes triton (CUDA tensors, a configuration the kernels support)
    or torch."""
    if backend not in BACKENDS:
        raise ValueError(f"din_attention: `backend` must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV)
        if override:
            if override not in BACKENDS:
                raise ValueError(f"din_attention: environment variable {BACKEND_ENV} must be one "
                                 f"of {BACKENDS}; got {override!r}")
            backend = override
    if backend == "auto":
        if problem.query.is_cuda and triton_unsupported_reason(problem) is None:
            return "triton"
        return "torch"
    return backend


def din_attention(query, keys, lengths=None, *, weights, biases, activation="sigmoid",
                  activation_params=None, mask=None, normalization=None, scale=1.0,
                  values=None, return_scores=False, backend="auto",
                  dice_eps=DEFAULT_DICE_EPS):
    """DIN local activation unit + attention pooling (SPEC section 1).

    Returns the pooled history [B, Dv] (or [B, C, Dv] for a 3-D query) in the
    keys' dtype, and with ``return_scores`` also the weights w [B, T] / [B, C, T].
    Under torch.autocast the query, keys and values are cast to the autocast
    dtype first; the parameters keep theirs and accumulation stays float32.
    """
    problem = validate(query, keys, lengths, weights=weights, biases=biases,
                       activation=activation, activation_params=activation_params, mask=mask,
                       normalization=normalization, scale=scale, values=values,
                       dice_eps=dice_eps)
    pooled, scores = run_problem(problem, resolve_backend(backend, problem),
                                 need_scores=return_scores)
    return (pooled, scores) if return_scores else pooled


def _autocast_off(device: torch.device):
    """The backends choose their own precision (float32 accumulation): autocast
    must not lower their matmuls behind their back."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def run_problem(problem: DINProblem, backend: str, dice_gate=None, need_scores=True):
    """Run a validated problem on a concrete backend; outputs in the keys' dtype.

    ``dice_gate`` (torch backend only) replaces Dice's normalization, see
    torch_backend.torch_din_attention. Without ``need_scores`` a backend may
    return None for the scores (the triton kernel then writes none). The triton
    backend always runs as the custom op (din_fast.ops: the fused forward and
    backward). The torch backend runs its packed path eagerly; under
    torch.compile (whose graphs cannot hold its data-dependent packing) it
    runs as the custom op, or with a ``dice_gate`` through autograd on every
    position with the padding masked, as it does under torch.func transforms
    and forward-mode AD (differentiable_din_attention).
    """
    with _autocast_off(problem.keys.device):
        if backend == "reference":
            pooled, scores = reference_din_attention(problem)
        elif backend == "triton":
            _require_triton(problem, "din_attention")
            pooled, scores = triton_din_attention(problem, need_scores)
        elif problem.differentiated_forward() or (dice_gate is not None
                                                  and torch.compiler.is_compiling()):
            pooled, scores = differentiable_din_attention(problem, dice_gate)
        elif dice_gate is not None or not torch.compiler.is_compiling():
            pooled, scores = torch_din_attention(problem, dice_gate)
        else:
            pooled, scores = run_attention_op(problem, backend, need_scores)
    return problem.shape_output(pooled, scores)


def _require_triton(problem, function: str):
    reason = triton_unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"{function}: backend='triton' cannot run this call: {reason}")


def din_attention_jagged(query, keys_values, offsets, max_len, *, weights, biases,
                         activation="sigmoid", activation_params=None, normalization=None,
                         scale=1.0, values=None, return_scores=False, backend="auto",
                         dice_eps=DEFAULT_DICE_EPS):
    """din_attention on jagged histories (TorchRec's / FBGEMM's layout).

    Row b's history is ``keys_values[offsets[b]:offsets[b + 1]]`` ([L, D] in all,
    ``offsets`` [B + 1] int64, non-decreasing, from 0 to L, no segment longer
    than ``max_len``); ``values`` [L, Dv] likewise. Equal to din_attention on
    the same histories padded to max_len with their lengths, without building
    the padding. Returns the pooled history [B, Dv] or [B, C, Dv], and with
    ``return_scores`` also the weights as jagged values, [L] or [L, C].

    ``backend`` as in din_attention: "triton" runs the fused forward kernel on
    the jagged values in place (its backward recomputes through the torch
    jagged path; a fused jagged backward is future work).
    """
    problem = validate_jagged(query, keys_values, offsets, max_len, weights=weights,
                              biases=biases, activation=activation,
                              activation_params=activation_params, normalization=normalization,
                              scale=scale, values=values, dice_eps=dice_eps)
    pooled, scores = run_jagged_problem(problem, resolve_backend(backend, problem),
                                        need_scores=return_scores)
    return (pooled, scores) if return_scores else pooled


def run_jagged_problem(problem: JaggedDINProblem, backend: str, need_scores=True):
    """Run a validated jagged problem; outputs in the keys' dtype. Without
    ``need_scores`` the triton backend returns None for the scores.

    backend="triton" runs the custom op din_fast::attention_jagged_forward:
    the fused forward on the jagged values in place, its backward the torch
    backend's, recomputing (triton_backend). backend="torch" runs through
    autograd, eagerly and under torch.compile alike (nothing in it has a
    data-dependent size: every size follows from L, B and C).
    """
    with _autocast_off(problem.keys_values.device):
        if backend == "torch":
            pooled, scores = torch_din_attention_jagged(problem)
        elif backend == "reference":
            pooled, scores = _reference_jagged(problem)
        else:
            _require_triton(problem, "din_attention_jagged")
            pooled, scores = triton_din_attention_jagged(problem, need_scores)
    return problem.shape_output(pooled, scores)


def _reference_jagged(problem: JaggedDINProblem):
    """The oracle on jagged input: pad to max_len, run the reference, unpad the weights."""
    rows = problem.row_ids()
    cols = torch.arange(rows.shape[0], device=rows.device) - problem.offsets[rows]
    batch = problem.offsets.shape[0] - 1
    # max_len is only a bound (it may be huge): pad to the longest row there is.
    lengths = problem.lengths()
    length = int(lengths.max()) if batch else 0

    def pad(jagged):
        dense = jagged.new_zeros(batch, length, jagged.shape[1])
        return dense.index_put((rows, cols), jagged)

    padded = DINProblem(
        query=problem.query, keys=pad(problem.keys_values),
        values=None if problem.values is None else pad(problem.values),
        lengths=lengths, mask=None, weights=problem.weights, biases=problem.biases,
        activation=problem.activation, act_params=problem.act_params,
        normalization=problem.normalization, scale=problem.scale, dice_eps=problem.dice_eps,
        squeeze_candidates=problem.squeeze_candidates,
    )
    pooled, weights = reference_din_attention(padded)
    return pooled, weights[rows, :, cols]
