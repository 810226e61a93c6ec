"""din_attention and din_attention_jagged: the public functional API.

Each call is validated into one canonical problem (din_fast.problem), and
the dispatcher picks an implementation, nothing else: din_fast.reference
(the oracle), din_fast.torch_backend (pure PyTorch) or din_fast.triton_backend
(the fused kernels). Each of those modules is the whole story of its backend.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import reference, torch_backend, triton_backend
from .problem import BACKENDS, DEFAULT_DICE_EPS, validate, validate_jagged

BACKEND_ENV = "DIN_FAST_BACKEND"


def resolve_backend(backend: str, problem) -> str:
    """The concrete backend for a call (a DINProblem or a JaggedDINProblem):
    "auto" (or DIN_FAST_BACKEND in the environment, which overrides it)
    becomes triton for CUDA tensors the kernels support, else torch."""
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
        if problem.query.is_cuda and triton_backend.unsupported_reason(problem) is None:
            return "triton"
        return "torch"
    return backend


def din_attention(query, keys, lengths=None, *, weights, biases, activation="sigmoid",
                  activation_params=None, mask=None, normalization=None, scale=1.0,
                  values=None, return_scores=False, backend="auto",
                  dice_eps=DEFAULT_DICE_EPS):
    """The DIN local activation unit and attention pooling.

    For every row b, candidate c and history position t, an MLP scores
    ``[q, k, q - k, q * k]`` (q = query[b, c], k = keys[b, t]); the scores of
    the valid positions are scaled (and, with ``normalization="softmax"``,
    normalized over the row's valid positions) into weights w, and the
    output is ``sum_t w[b, c, t] * values[b, t]``. Invalid positions never
    reach a result: whatever the padding holds, outputs and gradients are
    those of zero padding. A row with no valid position pools to zeros.

    Args:
        query: the candidate items, [B, D] or [B, C, D] (C candidates per row).
        keys: the behaviour history, [B, T, D], in the query's dtype (float32,
            float16, bfloat16; float64 on the torch and reference backends).
        lengths: [B] int32/int64 in [0, T]: positions t < lengths[b] are valid.
        weights: [W_1, ..., W_L, W_out] in ``torch.nn.Linear`` layout: W_1 is
            [H_1, 4D] with columns in the block order [q | k | q-k | q*k],
            W_i [H_i, H_(i-1)], W_out [1, H_L]. At least one hidden layer.
        biases: [b_1, ..., b_L, b_out], one per weight.
        activation: of every hidden layer: "sigmoid", "relu", "prelu" or "dice".
        activation_params: prelu: [a_1, ..., a_L] ([H_i] or [1] each); dice:
            [(a_i, mu_i, var_i), ...] (Dice's inference form); else None.
        mask: [B, T] bool, True = valid; instead of ``lengths`` (not both).
        normalization: None (the paper's raw scores, ``scale * s``) or
            "softmax" (over the valid positions, as the released DIN code).
        scale: multiplies the scores before the normalization.
        values: [B, T, Dv] pooled instead of the keys.
        return_scores: also return the weights w.
        backend: "auto" (triton for supported CUDA inputs, else torch),
            "triton", "torch" or "reference"; an explicit backend that cannot
            run the call raises ValueError saying why.
        dice_eps: Dice's epsilon in 1 / sqrt(var + eps).

    Returns:
        The pooled history [B, Dv] (or [B, C, Dv] for a 3-D query) in the
        keys' dtype; with ``return_scores`` also w, [B, T] (or [B, C, T]).

    Raises:
        TypeError: an argument of the wrong type or dtype (a non-tensor,
            float lengths, a non-bool mask, query and keys of different
            dtypes, a non-finite or non-real scale).
        ValueError: shapes that do not fit together (rank, D, B, T, the
            layers' widths), lengths and mask both given, lengths outside
            [0, T] (on CPU; on CUDA an asynchronous device assert), tensors on
            different devices, an unknown activation, normalization or
            backend, wrong activation_params, or an explicit backend that
            cannot run the call (the message says why).

    Under ``torch.autocast`` the query, keys and values are cast to the
    autocast dtype first; parameters keep theirs and accumulation is float32.
    Every input that requires grad gets a gradient (``lengths`` and ``mask``
    never do).
    """
    problem = validate(query, keys, lengths, weights=weights, biases=biases,
                       activation=activation, activation_params=activation_params, mask=mask,
                       normalization=normalization, scale=scale, values=values,
                       dice_eps=dice_eps, return_scores=return_scores)
    pooled, scores = run_problem(problem, resolve_backend(backend, problem),
                                 need_scores=return_scores)
    return (pooled, scores) if return_scores else pooled


def din_attention_jagged(query, keys_values, offsets, max_len, *, weights, biases,
                         activation="sigmoid", activation_params=None, normalization=None,
                         scale=1.0, values=None, return_scores=False, backend="auto",
                         dice_eps=DEFAULT_DICE_EPS):
    """din_attention on jagged histories (TorchRec's and FBGEMM's layout).

    Row b's history is ``keys_values[offsets[b]:offsets[b + 1]]``: all
    histories back to back. Equal to din_attention on the same histories
    padded to their lengths, without ever building the padding.

    Args:
        query: the candidate items, [B, D] or [B, C, D] (C candidates per row).
        keys_values: every row's history back to back, [L, D], in the query's
            dtype (float32, float16, bfloat16; float64 on the torch and
            reference backends).
        offsets: [B + 1] int32/int64, from 0 to L, non-decreasing: row b's
            history is positions offsets[b] to offsets[b + 1].
        max_len: a non-negative int, an upper bound on every row's length
            (a new value compiles a new graph under torch.compile).
        weights: the MLP's Linear weights, W_1 [H_1, 4D] first, W_out [1, H_L]
            last (din_attention's layout).
        biases: the MLP's biases, one per weight.
        activation: "sigmoid", "relu", "prelu" or "dice", of the hidden layers.
        activation_params: the PReLU slopes or Dice's (alpha, mean, var) per
            hidden layer, as din_attention takes them; None otherwise.
        normalization: None (raw scores, ``scale * s``) or "softmax" over
            each row's positions.
        scale: multiplies the scores before the normalization.
        values: [L, Dv] jagged like ``keys_values``, pooled instead of it.
        return_scores: also return the weights.
        backend: "auto", "triton", "torch" or "reference", as din_attention's.
        dice_eps: Dice's epsilon in 1 / sqrt(var + eps).

    Returns:
        The pooled history [B, Dv] or [B, C, Dv] in the keys' dtype; with
        ``return_scores`` also the weights as jagged values, [L] or [L, C].

    Raises:
        TypeError: as din_attention, and for offsets that are not int32 or
            int64, or a max_len that is not an int.
        ValueError: as din_attention, and for a negative max_len, offsets that
            are not 1-D [B + 1], do not start at 0 and end at L, decrease, or hold a row
            longer than ``max_len`` (checked on CPU; on CUDA an asynchronous
            device assert).
    """
    problem = validate_jagged(query, keys_values, offsets, max_len, weights=weights,
                              biases=biases, activation=activation,
                              activation_params=activation_params, normalization=normalization,
                              scale=scale, values=values, dice_eps=dice_eps,
                              return_scores=return_scores)
    pooled, scores = run_problem(problem, resolve_backend(backend, problem),
                                        need_scores=return_scores)
    return (pooled, scores) if return_scores else pooled


def _autocast_off(device: torch.device):
    """The backends choose their own precision (float32 accumulation): autocast
    must not lower their matmuls behind their back."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def run_problem(problem, backend: str, dice_gate=None, need_scores=True):
    """Run a validated problem (a DINProblem or a JaggedDINProblem) on a
    concrete backend; outputs in the keys' dtype. ``dice_gate`` (torch
    backend, padded input) replaces Dice's normalization
    (torch_backend.torch_din_attention); without ``need_scores`` a backend may
    return None for the scores."""
    if dice_gate is not None and (backend != "torch" or problem.HISTORY != "keys"):
        raise ValueError(f"run_problem: a `dice_gate` runs on backend='torch' with padded "
                         f"input only; got backend={backend!r}, {type(problem).__name__}")
    with _autocast_off(problem.query.device):
        if backend == "reference":
            pooled, scores = reference.run(problem)
        elif backend == "triton":
            reason = triton_backend.unsupported_reason(problem)
            if reason is not None:
                function = "din_attention" + ("_jagged" if problem.HISTORY != "keys" else "")
                raise ValueError(f"{function}: backend='triton' cannot run this call: {reason}")
            pooled, scores = triton_backend.run(problem, need_scores)
        else:
            pooled, scores = torch_backend.run(problem, dice_gate, need_scores)
    return problem.shape_output(pooled, scores)
