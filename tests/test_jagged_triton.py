"""din_attention_jagged on backend="triton": the fused forward reading the
jagged values in place, against the float64 reference on the same histories
padded. Gradients run through the torch jagged path (the fused jagged
backward is future work). Runs in the Triton interpreter on CPU tensors
(tests/conftest.py), or on CUDA where a GPU exists.
"""

import pytest
import torch

import din_fast
from din_fast.functional import resolve_backend
from din_fast.kernels import din_forward as fwd
from din_fast.problem import validate_jagged
from helpers import (DEVICE, ZERO_GRAD_ATOL, make_case, on_device, relative_error,
                     tolerance)

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def jagged_case(batch, candidates, dim, hidden, lengths, **options):
    """make_case's problem with these row lengths, as (padded case, jagged call).

    The jagged call is (query, keys_values, offsets, max_len, keyword arguments),
    its histories the padded case's valid prefixes, packed back to back.
    """
    max_len = max(lengths + [1])
    case = on_device(make_case(batch, candidates, max_len, dim, hidden, **options))
    case["lengths"] = torch.tensor(lengths, device=DEVICE)
    valid = torch.arange(max_len, device=DEVICE) < case["lengths"][:, None]
    offsets = torch.zeros(batch + 1, dtype=torch.int64, device=DEVICE)
    offsets[1:] = case["lengths"].cumsum(0)
    kwargs = {name: value for name, value in case.items()
              if name not in ("query", "keys", "lengths", "values")}
    values = case.get("values")
    kwargs["values"] = None if values is None else values[valid]
    return case, (case["query"], case["keys"][valid], offsets, max_len, kwargs), valid


def leaves_of(query, keys, values, kwargs):
    """Every differentiable input, in a fixed order."""
    flat = [query, keys] + ([] if values is None else [values])
    flat += list(kwargs["weights"]) + list(kwargs["biases"])
    for entry in kwargs.get("activation_params") or []:
        flat += list(entry) if isinstance(entry, tuple) else [entry]
    return flat


def with_leaves(query, keys, values, kwargs, convert):
    """(query, keys, values, kwargs) with every float tensor convert(t) as a fresh leaf."""
    def leaf(t):
        return convert(t).detach().clone().requires_grad_()

    def params(entry):
        return tuple(map(leaf, entry)) if isinstance(entry, tuple) else leaf(entry)

    kwargs = dict(kwargs, weights=[leaf(w) for w in kwargs["weights"]],
                  biases=[leaf(b) for b in kwargs["biases"]])
    if kwargs.get("activation_params") is not None:
        kwargs["activation_params"] = [params(p) for p in kwargs["activation_params"]]
    return leaf(query), leaf(keys), None if values is None else leaf(values), kwargs


def probe(like, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device)


def outputs_and_grads(pooled, scores, leaves):
    loss = (pooled.double() * probe(pooled, 1)).sum() + (scores.double() * probe(scores, 2)).sum()
    return [pooled.detach(), scores.detach()] + list(torch.autograd.grad(loss, leaves))


def check_against_padded_reference(case, jagged, valid, dtype=None):
    """Outputs, jagged scores and every gradient of the triton jagged call
    against the float64 reference on the padded case."""
    query, keys, offsets, max_len, kwargs = jagged
    query, keys, values, kwargs = with_leaves(query, keys, kwargs.pop("values"), kwargs,
                                              lambda t: t)
    pooled, scores = din_fast.din_attention_jagged(query, keys, offsets, max_len,
                                                   values=values, return_scores=True,
                                                   backend="triton", **kwargs)
    assert pooled.dtype == keys.dtype
    got = outputs_and_grads(pooled, scores, leaves_of(query, keys, values, kwargs))

    ref_query, ref_keys, ref_values, ref_kwargs = with_leaves(
        case["query"], case["keys"], case.get("values"), kwargs, lambda t: t.double())
    ref_pooled, ref_w = din_fast.din_attention(ref_query, ref_keys, case["lengths"],
                                               values=ref_values, return_scores=True,
                                               backend="reference", **ref_kwargs)
    ref_scores = (ref_w if ref_w.dim() == 2 else ref_w.transpose(1, 2))[valid]
    want = outputs_and_grads(ref_pooled, ref_scores,
                             leaves_of(ref_query, ref_keys, ref_values, ref_kwargs))
    # The padded gradients of keys / values at the valid positions are the jagged ones.
    want[3] = want[3][valid]
    if ref_values is not None:
        want[4] = want[4][valid]

    dtype = dtype or keys.dtype
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"output {index}: {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"output {index}: NaN/Inf"
        if w.norm() <= 1e-12:
            assert g.double().norm() <= ZERO_GRAD_ATOL[dtype], f"output {index}: should be ~0"
            continue
        err = relative_error(g, w)
        assert err <= tolerance(dtype), f"output {index}: relative error {err:.2e}"


# (batch, candidates, dim, hidden, lengths), options. Odd D and widths; empty
# segments, segments of length 1, every activation, both normalizations,
# C = 1, C > 1 and a 2-D query, separate values, 1 to 3 hidden layers.
CASES = {
    "sigmoid-none-c1": ((4, 1, 5, (7, 3), [3, 0, 1, 6]), dict(scale=0.7)),
    "relu-softmax-2d-query-values-3-layers": ((5, None, 6, (9, 5, 3), [2, 1, 0, 4, 3]), dict(
        activation="relu", normalization="softmax", value_dim=7)),
    "prelu-softmax-c3": ((3, 3, 3, (5,), [1, 5, 0]), dict(
        activation="prelu", normalization="softmax")),
    "dice-none-c2-values": ((3, 2, 7, (11, 6), [0, 4, 2]), dict(
        activation="dice", value_dim=4, scale=0.5)),
    "dice-softmax-one-row": ((1, 2, 4, (6,), [5]), dict(
        activation="dice", normalization="softmax", scale=0.3)),
    "sigmoid-softmax-17-candidates": ((2, 17, 4, (5,), [3, 2]), dict(
        normalization="softmax")),
    "all-segments-empty": ((3, 2, 4, (5,), [0, 0, 0]), dict(normalization="softmax")),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_jagged_triton_matches_padded_reference(case):
    (batch, candidates, dim, hidden, lengths), options = CASES[case]
    check_against_padded_reference(*jagged_case(batch, candidates, dim, hidden, lengths,
                                                **options))


def test_bfloat16_inputs_with_float32_parameters():
    case, jagged, valid = jagged_case(3, 2, 8, (12, 6), [4, 0, 7], normalization="softmax",
                                      dtype=torch.bfloat16, param_dtype=torch.float32,
                                      scale=0.3)
    assert jagged[4]["weights"][0].dtype == torch.float32
    check_against_padded_reference(case, jagged, valid)


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_split_t_matches_reference(normalization):
    """Three programs share each row's positions; empty and single-position rows too."""
    case, jagged, valid = jagged_case(4, 2, 6, (9,), [40, 0, 1, 33], scale=0.5,
                                      normalization=normalization, value_dim=5)
    query, keys, offsets, max_len, kwargs = jagged
    problem = validate_jagged(query, keys, offsets, max_len, dice_eps=1e-8, **kwargs)
    pooled, scores, _, _ = fwd.din_forward_jagged(problem, True, num_splits=3)
    double = {name: value.double() if isinstance(value, torch.Tensor)
              and value.is_floating_point() else value for name, value in case.items()}
    double["weights"] = [w.double() for w in case["weights"]]
    double["biases"] = [b.double() for b in case["biases"]]
    ref_pooled, ref_w = din_fast.din_attention(double.pop("query"), double.pop("keys"),
                                               double.pop("lengths"), return_scores=True,
                                               backend="reference", **double)
    assert relative_error(pooled, ref_pooled) <= tolerance(torch.float32)
    assert relative_error(scores, ref_w.transpose(1, 2)[valid]) <= tolerance(torch.float32)


def test_inference_without_scores_and_auto():
    """No grad: no autograd node; without return_scores the kernel writes none."""
    _, (query, keys, offsets, max_len, kwargs), _ = jagged_case(3, None, 5, (7,), [2, 0, 3])
    pooled = din_fast.din_attention_jagged(query, keys, offsets, max_len, backend="triton",
                                           **kwargs)
    assert pooled.shape == (3, 5) and pooled.grad_fn is None
    assert torch.equal(pooled[1], torch.zeros_like(pooled[1]))
    problem = validate_jagged(query, keys, offsets, max_len, dice_eps=1e-8, **kwargs)
    assert resolve_backend("auto", problem) == ("triton" if DEVICE == "cuda" else "torch")


def test_unsupported_configuration_raises_and_auto_falls_back():
    """backend='triton' says why it cannot run (float64: test_jagged.py); 'auto'
    takes the torch path instead."""
    _, (query, keys, offsets, max_len, kwargs), _ = jagged_case(2, 1, 3, (4, 4, 4, 4), [1, 2])
    with pytest.raises(ValueError, match="backend='triton' cannot run .*4 hidden layers"):
        din_fast.din_attention_jagged(query, keys, offsets, max_len, backend="triton",
                                      **kwargs)
    pooled = din_fast.din_attention_jagged(query, keys, offsets, max_len, backend="auto",
                                           **kwargs)
    assert torch.isfinite(pooled).all()
