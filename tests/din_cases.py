"""Shared test helpers: random DIN problems, and comparison with the reference.

A case is a dict of din_attention keyword arguments plus the positional
query, keys and lengths. ``run_case`` computes the outputs and the gradient of
every differentiable input for a backend, ``assert_matches_reference``
compares them with the reference computed in float64 on the same inputs.
"""

from __future__ import annotations

import torch

import din_fast

# SPEC section 3: relative error ||out - ref|| / ||ref|| against a float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3,
             torch.bfloat16: 2e-2}
# A gradient that is analytically zero (the output bias under softmax) is
# checked against this absolute bound instead.
ZERO_GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
                  torch.bfloat16: 1e-1}


def make_case(batch, candidates, length, dim, hidden, *, activation="sigmoid",
              normalization=None, masking="lengths", value_dim=None, dtype=torch.float32,
              param_dtype=None, scale=1.0, seed=0):
    """A random problem. candidates=None gives a 2-D query. masking is
    "lengths", "mask" or None; lengths include 0 and T when batch allows."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    q_shape = (batch, dim) if candidates is None else (batch, candidates, dim)
    widths = (4 * dim,) + tuple(hidden) + (1,)
    weights = [randn(o, i, std=1.5 / max(i, 1) ** 0.5, dt=param_dtype)
               for i, o in zip(widths[:-1], widths[1:])]
    biases = [randn(o, std=0.3, dt=param_dtype) for o in widths[1:]]
    if activation == "prelu":
        params = [randn(h, std=0.3, dt=param_dtype) for h in hidden]
    elif activation == "dice":
        params = [(randn(h, std=0.3, dt=param_dtype), randn(h, std=0.5, dt=param_dtype),
                   (torch.rand(h, generator=gen, dtype=torch.float64) + 0.5).to(param_dtype))
                  for h in hidden]
    else:
        params = None
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    if batch > 1:
        lengths[0], lengths[-1] = 0, length
    case = dict(query=randn(*q_shape), keys=randn(batch, length, dim), lengths=None,
                weights=weights, biases=biases, activation=activation,
                activation_params=params, normalization=normalization, scale=scale)
    if masking == "lengths":
        case["lengths"] = lengths
    elif masking == "mask":
        mask = torch.rand(batch, length, generator=gen) < 0.6
        if batch > 1:
            mask[0] = False
        case["mask"] = mask
    if value_dim is not None:
        case["values"] = randn(batch, length, value_dim)
    return case


def _differentiable(case):
    """The case's differentiable tensors, in a fixed order, with their names."""
    named = [("query", case["query"]), ("keys", case["keys"])]
    if case.get("values") is not None:
        named.append(("values", case["values"]))
    named += [(f"weights[{i}]", w) for i, w in enumerate(case["weights"])]
    named += [(f"biases[{i}]", b) for i, b in enumerate(case["biases"])]
    for i, p in enumerate(case.get("activation_params") or []):
        for j, t in enumerate(p if isinstance(p, tuple) else (p,)):
            named.append((f"activation_params[{i}][{j}]", t))
    return named


def _map_tensors(case, fn):
    """A copy of the case with fn applied to every floating tensor."""
    def conv(x):
        if isinstance(x, torch.Tensor):
            return fn(x) if x.is_floating_point() else x
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        return x
    return {k: conv(v) for k, v in case.items()}


def run_case(case, backend, with_scores=True, seed=1):
    """{name: tensor} of the outputs and of every input's gradient under a fixed
    random linear loss."""
    case = _map_tensors(case, lambda t: t.detach().clone().requires_grad_())
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
    out, scores = din_fast.din_attention(case["query"], case["keys"], case["lengths"],
                                         return_scores=True, backend=backend, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    def probe(like):  # drawn on the CPU generator, then moved: the same numbers on any device
        return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device)

    loss = (out.double() * probe(out)).sum()
    if with_scores:
        loss = loss + (scores.double() * probe(scores)).sum()
    named = _differentiable(case)
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    result = {"out": out.detach(), "scores": scores.detach()}
    result.update({f"grad {name}": g for (name, _), g in zip(named, grads)})
    return result


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def assert_matches_reference(case, backend, with_scores=True, tolerance_dtype=None):
    """Outputs and gradients of ``backend`` against the float64 reference."""
    dtype = tolerance_dtype or case["keys"].dtype
    actual = run_case(case, backend, with_scores)
    expected = run_case(_map_tensors(case, lambda t: t.double()), "reference", with_scores)
    for name, exp in expected.items():
        act = actual[name]
        assert act is not None, f"{name}: no gradient"
        assert act.shape == exp.shape, f"{name}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
        assert torch.isfinite(act).all() or not torch.isfinite(exp).all(), f"{name}: NaN/Inf"
        if exp.norm() <= 1e-12:
            assert act.double().norm() <= ZERO_GRAD_ATOL[dtype], f"{name}: should be ~0"
            continue
        err = relative_error(act, exp)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]}"
    return actual
