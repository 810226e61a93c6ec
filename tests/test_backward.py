"""The backward passes against float64 reference gradients.

The fused kernel runs in float32 (in the interpreter on CPU); the torch
backend's hand-written backward runs in float64.
"""

import pytest
import torch

from din_fast.kernels import din_backward as din_backward_module
from din_fast.kernels.din_backward import BackwardSpec, din_backward
from din_fast.torch_backend import torch_din_attention_backward
from grad_cases import GradCase, make_problem, reference_grads, rel_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# SPEC section 3: float32 at most 1e-5 in the interpreter, 5e-3 where dots may use TF32.
TOL = 1e-5 if DEVICE == "cpu" else 5e-3

CASES = [
    GradCase(label="sigmoid-none-lengths-2d", candidates=0),
    GradCase(label="relu-softmax-mask-values", activation="relu", normalization="softmax",
             masking="mask", candidates=3, value_dim=7, hidden=(10,)),
    GradCase(label="prelu-softmax-scores-3layers", activation="prelu", normalization="softmax",
             return_scores=True, hidden=(9, 7, 5), scalar_params=True, candidates=2),
    GradCase(label="dice-none-nomask-scores-T1", activation="dice", masking=None, length=1,
             return_scores=True, candidates=2),
    GradCase(label="dice-softmax-lengths-3layers", activation="dice", normalization="softmax",
             hidden=(6, 5, 3), length=20, embed_dim=3),
    GradCase(label="sigmoid-softmax-scores-values-long", normalization="softmax",
             return_scores=True, value_dim=4, length=37, batch=4, candidates=2, hidden=(17, 3)),
    GradCase(label="prelu-none-mask-scores", activation="prelu", masking="mask",
             return_scores=True, hidden=(20,), embed_dim=16),
]


INPUTS = ("query", "keys", "values")


def kernel_grads(case, ref, device=DEVICE, input_dtype=torch.float32):
    """Run the fused backward on copies of the reference's inputs: query, keys and
    values in ``input_dtype``, the parameters in float32."""
    leaves = {k: v.to(device, input_dtype if k in INPUTS else torch.float32)
              for k, v in ref["leaves"].items()}
    lengths = None if ref["lengths"] is None else ref["lengths"].to(device)
    mask = None if ref["mask"] is None else ref["mask"].to(device)
    problem = make_problem(case, leaves, lengths, mask)
    def cast(t, dtype=input_dtype):
        return None if t is None else t.to(device, dtype)

    return din_backward(problem, cast(ref["grad_pooled"]), cast(ref["grad_scores"]))


def named_grads(case, out):
    """The kernel's gradients keyed like the test leaves, [1]-shaped parameters summed back."""
    dq, dk, dv, dweights, dbiases, dact = out
    grads = {"query": dq.squeeze(1) if case.candidates == 0 else dq, "keys": dk}
    if dv is not None:
        grads["values"] = dv
    for i, (dw, db) in enumerate(zip(dweights, dbiases)):
        grads[f"w{i}"], grads[f"b{i}"] = dw, db
    for i, layer in enumerate(dact):
        for name, g in zip(("a", "mu", "var"), layer):
            grads[f"{name}{i}"] = g.sum(0, keepdim=True) if case.scalar_params else g
    return grads


def assert_grads_close(case, ref, got, tol):
    assert set(got) == set(ref["grads"])
    for name, want in ref["grads"].items():
        assert got[name].shape == want.shape, name
        assert torch.isfinite(got[name]).all(), name
        err = rel_error(got[name].cpu(), want)
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split-launches"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_backward_matches_reference(case, split, monkeypatch):
    """Both launch plans: one launch for everything, or the split one that wide
    layers take (inputs, first layer, deeper layers; each recomputes)."""
    monkeypatch.setattr(BackwardSpec, "split_parts", lambda spec: split)
    ref = reference_grads(case)
    assert_grads_close(case, ref, named_grads(case, kernel_grads(case, ref)), TOL)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backward_matches_reference(case):
    ref = reference_grads(case)
    problem = make_problem(case, ref["leaves"], ref["lengths"], ref["mask"])
    out = torch_din_attention_backward(problem, ref["grad_pooled"], ref["grad_scores"])
    assert_grads_close(case, ref, named_grads(case, out), 1e-10)


def test_kernel_backward_in_column_blocks(monkeypatch):
    """The first layer's P sums in 16-column blocks (one launch each), as wide D
    takes them: every block's columns, dq's W_p term, G once."""
    monkeypatch.setattr(din_backward_module, "accumulator_budget", lambda dtype: 256)
    monkeypatch.setattr(BackwardSpec, "split_parts", lambda spec: True)
    monkeypatch.setattr(din_backward_module, "backward_unsupported", lambda problem: None)
    case = GradCase(activation="dice", normalization="softmax", candidates=2, value_dim=5,
                    return_scores=True, embed_dim=40, hidden=(24, 8), length=19)
    spec = din_backward_module.BackwardSpec(
        dtype=torch.float32, activation="dice", softmax=True, has_lengths=True,
        has_mask=False, has_grad_scores=True, values_are_keys=False, hidden=case.hidden,
        embed_dim=case.embed_dim, value_dim=case.value_dim, candidates=case.candidates)
    assert [launch.first_dc for launch in spec.launches() if launch.part == "first"] == [16] * 4
    ref = reference_grads(case)
    assert_grads_close(case, ref, named_grads(case, kernel_grads(case, ref)), TOL)


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split-launches"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_kernel_backward_half_inputs(dtype, tol, split, monkeypatch):
    """Half-precision inputs, float32 parameters: against float64 on the rounded inputs."""
    monkeypatch.setattr(BackwardSpec, "split_parts", lambda spec: split)
    case = GradCase(normalization="softmax", candidates=2, value_dim=6, return_scores=True,
                    embed_dim=16, hidden=(24, 8))
    rounded = reference_grads(case)
    for name in INPUTS:
        if name in rounded["leaves"]:
            rounded["leaves"][name] = rounded["leaves"][name].to(dtype).double()
    ref = reference_grads(case, leaves=rounded["leaves"])
    got = named_grads(case, kernel_grads(case, ref, input_dtype=dtype))
    assert_grads_close(case, ref, got, tol)


def test_backward_is_bitwise_deterministic():
    case = GradCase(normalization="softmax", return_scores=True, batch=5, candidates=2,
                    value_dim=3, activation="prelu")
    ref = reference_grads(case)
    first, second = (named_grads(case, kernel_grads(case, ref)) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name
