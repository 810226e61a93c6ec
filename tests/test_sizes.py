"""Sizes (SPEC section 4): B, T, C and Dv of 0 give correctly shaped empty or
zero results and gradients on every backend; what a backend cannot take (D =
0 on triton) is a ValueError from that backend and a fallback under "auto",
never a crash inside a launcher."""

import pytest
import torch

import din_fast
from din_fast.problem import validate
from din_fast.triton_backend import unsupported_reason
from helpers import (DEVICE, backend_dtype, call_din_attention, leaf_copy, make_case, map_tensors,
                     on_device, outputs_and_grads, tolerance)

BACKENDS = ("torch", "reference", "triton", "auto")
# (batch, candidates, length, value_dim); candidates None is a 2-D query.
EMPTY = [(0, 2, 4, None), (3, 2, 0, None), (3, 0, 4, None), (3, 2, 4, 0), (0, None, 0, None),
         (3, None, 0, 2), (0, 0, 0, 0), (2, 0, 0, 3), (1, None, 1, 0)]


def sized_case(batch, candidates, length, value_dim, dtype, dim=3, masking="lengths"):
    return on_device(make_case(batch, candidates, length, dim, (4, 2), activation="dice",
                               normalization="softmax", masking=masking, value_dim=value_dim,
                               dtype=dtype, seed=1))


def check_against_reference(case, backend):
    """Same shapes as the float64 reference, the same values, every gradient
    shaped like its input and finite."""
    mine, leaves = leaf_copy(case)
    got = outputs_and_grads(call_din_attention(mine, backend), leaves)
    exact, exact_leaves = leaf_copy(map_tensors(case, torch.Tensor.double))
    want = outputs_and_grads(call_din_attention(exact, "reference"), exact_leaves)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == case["keys"].dtype
        assert torch.isfinite(g).all()
        bound = tolerance(case["keys"].dtype, gradients=backend == "triton")
        torch.testing.assert_close(g.double(), w, rtol=bound, atol=bound / 10)


@pytest.mark.parametrize("sizes", EMPTY, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masking", ["lengths", "mask", None])
def test_empty_sizes_din_attention(backend, sizes, masking):
    check_against_reference(sized_case(*sizes, backend_dtype(backend), masking=masking), backend)


@pytest.mark.parametrize("sizes", EMPTY, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes_jagged(backend, sizes):
    batch, candidates, length, value_dim = sizes
    case = sized_case(batch, candidates, length, value_dim, backend_dtype(backend))
    valid = torch.arange(length, device=DEVICE) < case["lengths"][:, None]
    offsets = torch.cat([case["lengths"].new_zeros(1), case["lengths"].cumsum(0)])
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths", "values")}
    if case.get("values") is not None:
        kwargs["values"] = case["values"][valid]
    query = case["query"].detach().requires_grad_()
    keys_values = case["keys"][valid].detach().requires_grad_()
    pooled, scores = din_fast.din_attention_jagged(query, keys_values, offsets, length,
                                                   return_scores=True, backend=backend,
                                                   **kwargs)
    padded, _ = call_din_attention(case, "reference")
    assert pooled.shape == padded.shape
    assert scores.shape == (int(valid.sum()),) + tuple(case["query"].shape[1:-1])
    bound = tolerance(pooled.dtype)
    torch.testing.assert_close(pooled, padded.to(pooled.dtype), rtol=bound, atol=bound / 10)
    # The backward of an empty problem runs and gives finite gradients of the inputs' shapes.
    inputs = [query, keys_values]
    grads = torch.autograd.grad(pooled.sum() + scores.sum(), inputs, allow_unused=True,
                                materialize_grads=True)
    for tensor, grad in zip(inputs, grads):
        assert grad.shape == tensor.shape and torch.isfinite(grad).all()


@pytest.mark.parametrize("sizes", EMPTY, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes_module(backend, sizes):
    batch, candidates, length, value_dim = sizes
    case = sized_case(batch, candidates, length, value_dim, backend_dtype(backend))
    layer = din_fast.DINAttention(3, (4,), "prelu", normalization="softmax",
                                  backend=backend).to(DEVICE, backend_dtype(backend))
    pooled = layer(case["query"], case["keys"], case["lengths"], values=case.get("values"))
    pooled.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    value_dim = case["keys"].shape[-1] if value_dim is None else value_dim
    assert pooled.shape == case["query"].shape[:-1] + (value_dim,)
    assert not pooled.any()


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_zero_embedding_size_runs_where_it_can(backend):
    """D = 0: the first layer sees no features, every score is b_1's image."""
    check_against_reference(sized_case(3, 2, 4, None, torch.float64, dim=0), backend)


def test_zero_embedding_size_triton_refuses_and_auto_falls_back():
    case = sized_case(3, 2, 4, None, torch.float32, dim=0)
    with pytest.raises(ValueError, match="embedding size D is 0"):
        call_din_attention(case, "triton")
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
    kwargs.setdefault("dice_eps", 1e-8)
    kwargs.setdefault("mask", None)
    kwargs.setdefault("values", None)
    problem = validate(case["query"], case["keys"], case["lengths"], **kwargs)
    assert unsupported_reason(problem) is not None   # so "auto" takes torch
