"""Autograd beyond first order (SPEC section 4): double backward, forward-mode
AD and the torch.func transforms are correct on every backend that runs them,
and raise an error naming what is not supported where a backend does not.

The reference and torch backends run all of them (the torch backend through
autograd, on every position with the padding zeroed, for forward mode and
the transforms; through a recompute under create_graph=True). The triton
backend's double backward recomputes the same way; forward mode and the
transforms raise (its kernels have a reverse-mode backward only).
"""

import pytest
import torch
from torch.autograd import forward_ad

import din_fast
from helpers import make_case, map_tensors, on_device

CASES = [
    dict(activation="sigmoid", normalization=None, masking="lengths", hidden=(3,)),
    dict(activation="dice", normalization="softmax", masking="mask", hidden=(3, 2)),
    dict(activation="prelu", normalization="softmax", masking="lengths", hidden=(2,),
         value_dim=2),
    dict(activation="relu", normalization=None, masking=None, hidden=(3,)),
]
NOT_SUPPORTED = "torch.func transform or forward-mode AD"


def skip_unless_expressible(options, jagged):
    if jagged and options["masking"] != "lengths":
        pytest.skip("jagged histories are lengths")


def small_case(dtype, activation, normalization, masking, hidden, value_dim=None):
    return on_device(make_case(3, 2, 4, 2, hidden, activation=activation,
                               normalization=normalization, masking=masking,
                               value_dim=value_dim, dtype=dtype, scale=0.8, seed=5))


def as_function(case, backend, jagged=False):
    """(f(query, keys, w0) -> pooled plus the scores' weighted sum, primals)."""
    kwargs = dict(case)
    query, keys, lengths = kwargs.pop("query"), kwargs.pop("keys"), kwargs.pop("lengths")
    weights = kwargs.pop("weights")
    probe = torch.linspace(-1, 1, keys.shape[1], dtype=keys.dtype, device=keys.device)

    def f(q, k, w0):
        call_weights = [w0] + list(weights[1:])
        if jagged:
            valid = torch.arange(k.shape[1], device=k.device) < lengths[:, None]
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            pooled, scores = din_fast.din_attention_jagged(
                q, k[valid], offsets, k.shape[1], weights=call_weights, return_scores=True,
                backend=backend, **{n: v for n, v in kwargs.items() if n != "values"})
            weighting = torch.linspace(-1, 1, scores.numel(), dtype=scores.dtype,
                                       device=scores.device).view_as(scores)
            return pooled, (scores * weighting).sum()
        pooled, scores = din_fast.din_attention(q, k, lengths, weights=call_weights,
                                                return_scores=True, backend=backend, **kwargs)
        return pooled, (scores * probe).sum()
    return f, (query, keys, weights[0])


def reference_of(case, jagged=False):
    """The float64 reference as a function of the same primals."""
    return as_function(map_tensors(case, torch.Tensor.double), "reference", jagged)


def hessian_vector_products(f, primals, seed=2):
    """d/dx <d/dx <f(x), u>, v> for fixed random u, v: what double backward gives."""
    gen = torch.Generator().manual_seed(seed)
    leaves = [p.detach().clone().requires_grad_(True) for p in primals]
    outputs = f(*leaves)
    first = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64)
                 .to(o.device, o.dtype)).sum() for o in outputs)
    grads = torch.autograd.grad(first, leaves, create_graph=True)
    second = sum((g * torch.randn(g.shape, generator=gen, dtype=torch.float64)
                  .to(g.device, g.dtype)).sum() for g in grads)
    return torch.autograd.grad(second, leaves, allow_unused=True)


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("jagged", [False, True])
def test_gradgradcheck(backend, options, jagged):
    skip_unless_expressible(options, jagged)
    f, primals = as_function(small_case(torch.float64, **options), backend, jagged)
    primals = [p.detach().clone().requires_grad_(True) for p in primals]
    assert torch.autograd.gradgradcheck(f, primals, fast_mode=True)


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("jagged", [False, True])
def test_triton_double_backward_matches_reference(options, jagged):
    skip_unless_expressible(options, jagged)
    case = small_case(torch.float32, **options)
    f, primals = as_function(case, "triton", jagged)
    got = hessian_vector_products(f, primals)
    want = hessian_vector_products(*reference_of(case, jagged))
    for g, w in zip(got, want):
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("jagged", [False, True])
def test_forward_mode_matches_reference(backend, options, jagged):
    """torch.func.jvp, torch.func.jacfwd and forward_ad dual tensors."""
    skip_unless_expressible(options, jagged)
    case = small_case(torch.float64, **options)
    f, primals = as_function(case, backend, jagged)
    ref, _ = reference_of(case, jagged)
    gen = torch.Generator().manual_seed(3)
    tangents = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                     for p in primals)
    _, got = torch.func.jvp(f, primals, tangents)
    _, want = torch.func.jvp(ref, primals, tangents)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        assert g.abs().sum() > 0
    jac = torch.func.jacfwd(lambda q: f(q, *primals[1:])[0])(primals[0])
    jac_ref = torch.func.jacfwd(lambda q: ref(q, *primals[1:])[0])(primals[0])
    torch.testing.assert_close(jac, jac_ref, rtol=1e-9, atol=1e-10)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(primals[1], tangents[1])
        tangent = forward_ad.unpack_dual(f(primals[0], dual, primals[2])[0]).tangent
        dual_ref = forward_ad.make_dual(primals[1], tangents[1])
        tangent_ref = forward_ad.unpack_dual(ref(primals[0], dual_ref, primals[2])[0]).tangent
    torch.testing.assert_close(tangent, tangent_ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("options", CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_func_grad_and_vmap_match_reference(backend, options):
    case = small_case(torch.float64, **options)
    f, primals = as_function(case, backend)
    ref, _ = reference_of(case)

    def loss(fn):
        return lambda q, k, w0: sum(o.sum() for o in fn(q, k, w0))
    got = torch.func.grad(loss(f), argnums=(0, 1, 2))(*primals)
    want = torch.func.grad(loss(ref), argnums=(0, 1, 2))(*primals)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    # vmap over a stack of weight matrices: one call per weight, batched.
    stack = torch.stack([primals[2], 0.5 * primals[2], -primals[2]])
    batched = torch.vmap(lambda w0: f(primals[0], primals[1], w0)[0])(stack)
    looped = torch.stack([ref(primals[0], primals[1], w0)[0] for w0 in stack])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_per_sample_gradients_with_lengths_under_vmap(backend):
    """vmap(grad) over the rows, each row its own lengths (per-sample
    gradients, as DP-SGD takes them): the lengths check reads every sample's
    lengths at once (it once raised vmap's data-dependent control flow error)
    and still refuses a length past T; the gradients are the rows' own."""
    torch.manual_seed(0)
    layer = din_fast.DINAttention(3, (4,), activation="dice", normalization="softmax",
                                  backend=backend).double().eval()
    query, keys = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 5, 3,
                                                                        dtype=torch.float64)
    lengths = torch.tensor([5, 0, 2, 3])
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = dict(layer.named_buffers())

    def loss(params, q, k, n):
        return torch.func.functional_call(layer, (params, buffers),
                                          (q[None], k[None], n[None])).square().sum()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(
        params, query, keys, lengths)
    for row in range(4):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), query[row], keys[row], lengths[row]).backward()
        for name, parameter in layer.named_parameters():
            torch.testing.assert_close(per_sample[name][row], parameter.grad)
    with pytest.raises(ValueError, match="`lengths` must lie in"):
        torch.func.vmap(layer)(query[:, None], keys[:, None], torch.tensor([[5], [6], [0], [1]]))


@pytest.mark.parametrize("jagged", [False, True])
def test_triton_refuses_forward_mode_and_transforms(jagged):
    """Never a silent zero tangent: an error that names what is not supported."""
    case = small_case(torch.float32, **CASES[0])
    f, primals = as_function(case, "triton", jagged)
    tangents = tuple(torch.ones_like(p) for p in primals)
    with pytest.raises(ValueError, match=NOT_SUPPORTED):
        torch.func.jvp(f, primals, tangents)
    with pytest.raises(ValueError, match=NOT_SUPPORTED):
        torch.func.grad(lambda q: f(q, *primals[1:])[0].sum())(primals[0])
    with pytest.raises(ValueError, match=NOT_SUPPORTED):
        torch.vmap(lambda w0: f(primals[0], primals[1], w0)[0])(primals[2][None])
    with pytest.raises(ValueError, match=NOT_SUPPORTED), forward_ad.dual_level():
        f(forward_ad.make_dual(primals[0], tangents[0]), *primals[1:])


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_values_given_as_the_keys_tensor(backend):
    """values=keys passed explicitly (one tensor in two argument slots): first
    and second order on every backend, against the reference."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    case = small_case(dtype, **CASES[1])
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths", "mask")}

    def function(backend_name):
        def f(q, k, w0):
            call = dict(kwargs, weights=[w0] + list(kwargs["weights"][1:]))
            return (din_fast.din_attention(q, k, mask=case["mask"], values=k,
                                           backend=backend_name, **call),)
        return f
    primals = (case["query"], case["keys"], case["weights"][0])
    got = hessian_vector_products(function(backend), primals)
    want = hessian_vector_products(function("reference"), [p.double() for p in primals])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
