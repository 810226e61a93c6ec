"""The torch backend against the literal reference: outputs, scores, every gradient."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import assert_matches_reference, make_case

SHAPES = [  # (B, C, T, D, hidden); C=None is a 2-D query
    (1, None, 1, 3, (5,)),
    (7, None, 13, 10, (9, 5)),
    (5, 3, 6, 7, (11, 6, 3)),
    (2, 1, 4, 16, (8,)),
]
OPTIONS = list(itertools.product(("sigmoid", "relu", "prelu", "dice"), (None, "softmax"),
                                 ("lengths", "mask", None)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation,normalization,masking", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(shape, activation, normalization, masking, dtype):
    batch, candidates, length, dim, hidden = shape
    case = make_case(batch, candidates, length, dim, hidden, activation=activation,
                     normalization=normalization, masking=masking, dtype=dtype,
                     scale=0.7 if normalization else 1.0)
    assert_matches_reference(case, "torch")


@pytest.mark.parametrize("normalization", [None, "softmax"])
@pytest.mark.parametrize("candidates", [None, 4])
def test_separate_values(normalization, candidates):
    case = make_case(6, candidates, 9, 5, (7, 3), normalization=normalization, value_dim=11)
    assert_matches_reference(case, "torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_half_precision_inputs_with_float32_parameters(dtype, activation):
    case = make_case(5, 2, 12, 8, (10, 6), activation=activation, normalization="softmax",
                     dtype=dtype, param_dtype=torch.float32)
    actual = assert_matches_reference(case, "torch")
    assert actual["out"].dtype == dtype
    assert actual["grad weights[0]"].dtype == torch.float32
    assert actual["grad keys"].dtype == dtype


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("activation,normalization",
                         [("sigmoid", None), ("prelu", "softmax"), ("dice", None),
                          ("relu", "softmax")])
def test_gradcheck(backend, activation, normalization):
    case = make_case(3, 2, 4, 3, (4, 3), activation=activation, normalization=normalization,
                     dtype=torch.float64, value_dim=2, seed=3)
    import din_fast

    names = ["query", "keys", "values"]
    flat = [case[n] for n in names] + case["weights"] + case["biases"]
    n_w = len(case["weights"])

    def fn(q, k, v, *params):
        out, scores = din_fast.din_attention(
            q, k, case["lengths"], values=v, weights=list(params[:n_w]),
            biases=list(params[n_w:]), activation=activation,
            activation_params=case["activation_params"], normalization=normalization,
            return_scores=True, backend=backend)
        return out, scores

    inputs = [t.detach().clone().requires_grad_() for t in flat]
    assert torch.autograd.gradcheck(fn, inputs)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 6), candidates=st.one_of(st.none(), st.integers(1, 3)),
       length=st.integers(1, 9), dim=st.integers(1, 9),
       hidden=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       activation=st.sampled_from(["sigmoid", "relu", "prelu", "dice"]),
       normalization=st.sampled_from([None, "softmax"]),
       masking=st.sampled_from(["lengths", "mask", None]), seed=st.integers(0, 2**16))
def test_property_random_shapes(batch, candidates, length, dim, hidden, activation,
                                normalization, masking, seed):
    case = make_case(batch, candidates, length, dim, tuple(hidden), activation=activation,
                     normalization=normalization, masking=masking, dtype=torch.float64,
                     seed=seed)
    assert_matches_reference(case, "torch")


def test_empty_history_gives_zeros_never_nan():
    import din_fast

    for normalization in (None, "softmax"):
        case = make_case(3, None, 5, 4, (6,), normalization=normalization)
        case["lengths"] = torch.zeros(3, dtype=torch.long)
        kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
        out, scores = din_fast.din_attention(case["query"], case["keys"], case["lengths"],
                                             return_scores=True, backend="torch", **kwargs)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.equal(scores, torch.zeros_like(scores))


def test_masked_softmax_equals_softmax_on_full_rows():
    from din_fast.reference import masked_normalize

    scores = torch.randn(4, 3, 7, dtype=torch.float64)
    valid = torch.ones(4, 7, dtype=torch.bool)
    expected = torch.softmax(scores * 0.5, dim=-1)
    assert torch.allclose(masked_normalize(scores, valid, "softmax", 0.5), expected)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_zero_length_history_axis(backend, normalization):
    case = make_case(3, 2, 0, 4, (5,), normalization=normalization)
    import din_fast

    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
    query = case["query"].requires_grad_()
    out, scores = din_fast.din_attention(query, case["keys"], case["lengths"],
                                         return_scores=True, backend=backend, **kwargs)
    assert out.shape == (3, 2, 4) and scores.shape == (3, 2, 0)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(query.grad, torch.zeros_like(query))


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_gradients_of_the_scores_alone(normalization):
    """A loss of the attention weights only: the forward op's autograd formula
    then gets no gradient for the pooled output (None, not zeros)."""
    import din_fast

    case = make_case(4, 2, 6, 3, (5,), normalization=normalization, dtype=torch.float64)
    grads = {}
    for backend in ("torch", "reference"):
        leaves = [case["query"].clone().requires_grad_(), case["keys"].clone().requires_grad_(),
                  *(w.clone().requires_grad_() for w in case["weights"])]
        kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths",
                                                             "weights")}
        _, w = din_fast.din_attention(*leaves[:2], case["lengths"], weights=leaves[2:],
                                      return_scores=True, backend=backend, **kwargs)
        probe = torch.linspace(-1, 1, w.numel(), dtype=w.dtype).view_as(w)
        grads[backend] = torch.autograd.grad((w * probe).sum(), leaves)
    for got, want in zip(grads["torch"], grads["reference"]):
        torch.testing.assert_close(got, want)
