"""din_attention: the public functional API and the backend dispatch."""

from __future__ import annotations

import os

import torch

from .ops import run_attention_op
from .problem import BACKENDS, DEFAULT_DICE_EPS, DINProblem, validate
from .reference import reference_din_attention
from .torch_backend import torch_din_attention
from .triton_backend import triton_din_attention, triton_unsupported_reason

BACKEND_ENV = "DIN_FAST_BACKEND"


def resolve_backend(backend: str, problem: DINProblem) -> str:
    """The concrete backend for a call: "auto" becomes triton (CUDA tensors, a
    configuration the kernels support) or torch."""
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
        if problem.keys.is_cuda and triton_unsupported_reason(problem) is None:
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
    """
    problem = validate(query, keys, lengths, weights=weights, biases=biases,
                       activation=activation, activation_params=activation_params, mask=mask,
                       normalization=normalization, scale=scale, values=values,
                       dice_eps=dice_eps)
    pooled, scores = run_problem(problem, resolve_backend(backend, problem),
                                 need_scores=return_scores)
    return (pooled, scores) if return_scores else pooled


def run_problem(problem: DINProblem, backend: str, dice_batch_stats=None, need_scores=True):
    """Run a validated problem on a concrete backend; outputs in the keys' dtype.

    Without ``need_scores`` a backend may return None for the scores (the
    triton kernel then writes none). The triton backend always runs as the
    custom op (din_fast.ops: the fused forward and backward); the torch backend
    does under torch.compile, where its data-dependent packing could not be
    traced, and runs eagerly otherwise.
    """
    if backend == "reference":
        pooled, scores = reference_din_attention(problem)
    elif backend == "torch" and (dice_batch_stats is not None
                                 or not torch.compiler.is_compiling()):
        pooled, scores = torch_din_attention(problem, dice_batch_stats)
    elif backend == "triton":
        reason = triton_unsupported_reason(problem)
        if reason is not None:
            raise ValueError(f"din_attention: backend='triton' cannot run this call: {reason}")
        pooled, scores = triton_din_attention(problem, need_scores)
    else:
        pooled, scores = run_attention_op(problem, backend, need_scores)
    return problem.shape_output(pooled, scores)
