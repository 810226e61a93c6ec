"""The fused forward kernel against the float64 reference (interpreter on CPU, or CUDA)."""

import copy
import dataclasses

import pytest
import torch

import din_fast
from din_fast.functional import run_problem
from din_fast.kernels import din_forward as fwd
from din_fast.triton_backend import triton_unsupported_reason
from din_cases import DEVICE, TOLERANCE, make_problem, reference64, relative_error


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output buffer starts as NaN, so an element the kernel skips fails."""
    def allocate(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(fwd, "allocate", allocate)


def check(problem, need_scores=True, num_splits=None):
    pooled, scores, row_max, row_sum = fwd.din_forward(problem, need_scores, num_splits)
    ref_pooled, ref_w = reference64(problem)
    tol = TOLERANCE[problem.keys.dtype]
    assert pooled.dtype == problem.keys.dtype
    assert pooled.shape == ref_pooled.shape
    assert relative_error(pooled, ref_pooled) <= tol
    if need_scores:
        assert relative_error(scores, ref_w) <= tol
    else:
        assert scores is None
    if problem.normalization == "softmax":
        check_row_stats(problem, row_max, row_sum, tol)
    return pooled, scores


def check_row_stats(problem, row_max, row_sum, tol):
    """The statistics the backward relies on (din_forward's docstring), from the
    reference's scale*s (normalization=None gives it where valid)."""
    _, scaled = reference64(dataclasses.replace(problem, normalization=None))
    valid = problem.valid_mask()[:, None, :].expand_as(scaled)
    masked = torch.where(valid, scaled, torch.full_like(scaled, float("-inf")))
    want_max = masked.amax(-1)
    want_max = torch.where(torch.isfinite(want_max), want_max, torch.zeros_like(want_max))
    want_sum = torch.where(valid, torch.exp(scaled - want_max[..., None]),
                           torch.zeros_like(scaled)).sum(-1)
    assert torch.allclose(row_max.double(), want_max, rtol=tol, atol=tol)
    assert torch.allclose(row_sum.double(), want_sum, rtol=tol, atol=tol)


CASES = {
    "sigmoid-none-lengths": dict(),
    "softmax-empty-rows": dict(batch=5, candidates=2, length=13, dim=8, hidden=(12,),
                               normalization="softmax", empty_rows=(0, 3)),
    "relu-mask-3-layers-values": dict(candidates=3, hidden=(9, 5, 3), activation="relu",
                                      normalization="softmax", valid="mask", value_dim=6,
                                      empty_rows=(1,)),
    "prelu-all-valid-many-candidates": dict(batch=2, candidates=17, dim=3, hidden=(5,),
                                            activation="prelu", valid=None, length=19),
    "dice-softmax-t1": dict(batch=7, length=1, hidden=(11, 6), activation="dice",
                            normalization="softmax", scale=0.125),
    "dice-none-mask-wide": dict(batch=2, candidates=5, length=40, dim=20, hidden=(33, 17),
                                activation="dice", valid="mask", value_dim=35, scale=1.0),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_forward_matches_reference(case):
    check(make_problem(**CASES[case]))


def test_forward_without_scores():
    check(make_problem(normalization="softmax", candidates=2), need_scores=False)


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_split_t_matches_reference(normalization):
    problem = make_problem(batch=3, candidates=2, length=150, dim=6, hidden=(9,),
                           normalization=normalization, empty_rows=(1,))
    problem.lengths[2] = 150
    check(problem, num_splits=3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_with_float32_parameters(dtype):
    problem = make_problem(batch=3, candidates=2, length=21, dim=12, hidden=(16, 8),
                           normalization="softmax", dtype=dtype, scale=0.3)
    assert problem.weights[0].dtype == torch.float32
    check(problem)


def test_public_api_2d_query_and_auto():
    problem = make_problem(normalization="softmax")
    kwargs = dict(weights=problem.weights, biases=problem.biases, normalization="softmax",
                  scale=problem.scale)
    query = problem.query[:, 0]
    pooled, scores = din_fast.din_attention(query, problem.keys, problem.lengths,
                                            return_scores=True, backend="triton", **kwargs)
    ref_pooled, ref_w = reference64(problem)
    assert pooled.shape == (3, 5) and scores.shape == (3, 7)
    assert relative_error(pooled, ref_pooled[:, 0]) <= TOLERANCE[torch.float32]
    assert relative_error(scores, ref_w[:, 0]) <= TOLERANCE[torch.float32]
    expected = "triton" if DEVICE == "cuda" else "torch"
    assert din_fast.functional.resolve_backend("auto", problem) == expected


def test_unsupported_configurations_raise():
    deep = make_problem(hidden=(4, 4, 4, 4))
    assert "4 hidden layers" in triton_unsupported_reason(deep)
    with pytest.raises(ValueError, match="backend='triton' cannot run"):
        run_problem(deep, "triton")
    assert din_fast.functional.resolve_backend("auto", deep) == "torch"
    wide = make_problem()
    double = wide.with_float_tensors([t.double() for t in wide.float_tensors()])
    assert "float64" in triton_unsupported_reason(double)


def test_training_step_gradients_match_reference():
    """One training step through DINAttention(backend="triton") against a float64
    reference copy. The softmax makes the output bias's gradient exactly zero,
    so errors are measured against the largest gradient, not each one's own."""
    torch.manual_seed(0)
    layer = din_fast.DINAttention(6, hidden_units=(10, 4), activation="prelu",
                                  normalization="softmax", scale=0.5, backend="triton").to(DEVICE)
    reference = copy.deepcopy(layer).double()
    reference.backend = "reference"
    query = torch.randn(4, 3, 6, device=DEVICE)
    keys = torch.randn(4, 9, 6, device=DEVICE)
    lengths = torch.tensor([9, 0, 4, 1], device=DEVICE)
    target = torch.randn(4, 3, 6, device=DEVICE)

    def grads(module, dtype):
        q = query.to(dtype).detach().requires_grad_()
        k = keys.to(dtype).detach().requires_grad_()
        loss = ((module(q, k, lengths) - target.to(dtype)) ** 2).sum()
        loss.backward()
        return [q.grad, k.grad] + [p.grad for p in module.parameters()]

    got, want = grads(layer, torch.float32), grads(reference, torch.float64)
    largest = max(float(w.norm()) for w in want)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        assert float((g.double() - w).norm()) <= TOLERANCE[torch.float32] * largest
