"""What the tests share: random DIN problems, float64 reference results,
tolerances, and the property tests' strategies and layouts.

A case is a dict of din_attention's keyword arguments plus the positional
query, keys and lengths (``make_case``). ``run_case`` computes the outputs and
the gradient of every differentiable input on a backend under a fixed random
loss, ``assert_matches_reference`` compares them with the reference computed
in float64 on the same inputs (SPEC tolerances, ``tolerance``). Property tests
draw cases with ``cases``: float64 on the torch and reference backends,
float32 on triton (the Triton interpreter on CPU, tests/conftest.py, or CUDA
where a GPU exists), which draws fewer examples (EXAMPLES) as it is slow.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import din_fast
from din_fast.kernels.common import cuda_matmul_tf32

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# SPEC section 3: relative error ||out - ref|| / ||ref|| against a float64 reference.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3,
             torch.bfloat16: 2e-2}
# A gradient that is analytically zero (the output bias under softmax) is
# checked against this absolute bound instead.
ZERO_GRAD_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2,
                  torch.bfloat16: 1e-1}


def tolerance(dtype: torch.dtype, gradients: bool = False) -> float:
    """SPEC section 3 on DEVICE: float32 on a GPU is 5e-3 where dots may run
    as TF32: the forward's where torch allows it, the fused backward's always."""
    if dtype == torch.float32 and DEVICE == "cuda" and (gradients or cuda_matmul_tf32()):
        return 5e-3
    return TOLERANCE[dtype]


def make_case(batch, candidates, length, dim, hidden, *, activation="sigmoid",
              normalization=None, masking="lengths", value_dim=None, dtype=torch.float32,
              param_dtype=None, scale=1.0, seed=0, scalar_params=False):
    """A random problem: din_attention's keyword arguments plus query, keys and
    lengths. candidates=None gives a 2-D query. masking is "lengths", "mask" or
    None; lengths include 0 and T (and a mask an empty row) when batch allows.
    scalar_params: prelu/dice parameters of shape [1] instead of [H]."""
    gen = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dt)

    q_shape = (batch, dim) if candidates is None else (batch, candidates, dim)
    widths = (4 * dim,) + tuple(hidden) + (1,)
    weights = [randn(o, i, std=1.5 / max(i, 1) ** 0.5, dt=param_dtype)
               for i, o in zip(widths[:-1], widths[1:])]
    biases = [randn(o, std=0.3, dt=param_dtype) for o in widths[1:]]
    units = [1 if scalar_params else h for h in hidden]
    if activation == "prelu":
        params = [randn(h, std=0.3, dt=param_dtype) for h in units]
    elif activation == "dice":
        params = [(randn(h, std=0.3, dt=param_dtype), randn(h, std=0.5, dt=param_dtype),
                   (torch.rand(h, generator=gen, dtype=torch.float64) + 0.5).to(param_dtype))
                  for h in units]
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


def differentiable(case):
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


def map_tensors(case, fn):
    """A copy of the case with fn applied to every floating tensor."""
    def conv(x):
        if isinstance(x, torch.Tensor):
            return fn(x) if x.is_floating_point() else x
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        return x
    return {k: conv(v) for k, v in case.items()}


def run_case(case, backend, with_scores=True):
    """{name: tensor} of the outputs and of every input's gradient under a fixed
    random linear loss (loss_probes; the scores take part with ``with_scores``)."""
    case = map_tensors(case, lambda t: t.detach().clone().requires_grad_())
    out, scores = call_din_attention(case, backend)
    probes = loss_probes([out, scores])
    loss = (out.double() * probes[0]).sum()
    if with_scores:
        loss = loss + (scores.double() * probes[1]).sum()
    named = differentiable(case)
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    result = {"out": out.detach(), "scores": scores.detach()}
    result.update({f"grad {name}": g for (name, _), g in zip(named, grads)})
    return result


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


def assert_matches_reference(case, backend, with_scores=True, tolerance_dtype=None):
    """Outputs and gradients of ``backend`` against the float64 reference, within
    ``tolerance`` of the case's dtype (or ``tolerance_dtype``) on DEVICE."""
    dtype = tolerance_dtype or case["keys"].dtype
    actual = run_case(case, backend, with_scores)
    expected = run_case(map_tensors(case, lambda t: t.double()), "reference", with_scores)
    for name, exp in expected.items():
        act = actual[name]
        assert act is not None, f"{name}: no gradient"
        assert act.shape == exp.shape, f"{name}: shape {tuple(act.shape)} != {tuple(exp.shape)}"
        assert torch.isfinite(act).all() or not torch.isfinite(exp).all(), f"{name}: NaN/Inf"
        if exp.norm() <= 1e-12:
            assert act.double().norm() <= ZERO_GRAD_ATOL[dtype], f"{name}: should be ~0"
            continue
        err = relative_error(act, exp)
        bound = tolerance(dtype, gradients=name.startswith("grad") and backend == "triton")
        assert err <= bound, f"{name}: relative error {err:.2e} > {bound}"
    return actual


# ------------------------------------------------------------------ property tests

BACKENDS = ("torch", "reference", "triton")
EXAMPLES = {"torch": 25, "reference": 25, "triton": 8}
LAYOUTS = ("contiguous", "strided", "offset", "transposed", "expanded")


def backend_settings(backend: str, factor: float = 1.0):
    """Hypothesis settings for one backend's property check."""
    return settings(max_examples=max(2, int(EXAMPLES[backend] * factor)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def backend_dtype(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else torch.float64


@st.composite
def cases(draw, dtype=torch.float64, min_batch=1, min_length=0, masking=("lengths", "mask", None),
          normalization=(None, "softmax")):
    """A make_case problem of awkward small sizes, on DEVICE."""
    batch = draw(st.integers(min_batch, 3))
    candidates = draw(st.sampled_from([None, 1, 2, 3]))
    length = draw(st.integers(min_length, 6))
    dim = draw(st.integers(1, 6))
    hidden = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=3)))
    case = make_case(batch, candidates, length, dim, hidden,
                     activation=draw(st.sampled_from(["sigmoid", "relu", "prelu", "dice"])),
                     normalization=draw(st.sampled_from(normalization)),
                     masking=draw(st.sampled_from(masking)),
                     value_dim=draw(st.sampled_from([None, 1, 4])), dtype=dtype,
                     scale=draw(st.sampled_from([1.0, 0.3, -2.0])),
                     seed=draw(st.integers(0, 2 ** 16)))
    return on_device(case)


def on_device(value):
    """A case (or any nest of lists, tuples and dicts) with its tensors on DEVICE."""
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE)
    if isinstance(value, dict):
        return {k: on_device(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_device(v) for v in value)
    return value


def tensor_slots(case: dict) -> list:
    """Where the case's tensors are: (key, index or None, inner index or None)."""
    slots = []
    for key, value in case.items():
        if isinstance(value, torch.Tensor):
            slots.append((key, None, None))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    slots.append((key, i, None))
                elif isinstance(item, (list, tuple)):
                    slots += [(key, i, j) for j in range(len(item))]
    return slots


def get_slot(case: dict, slot):
    key, i, j = slot
    value = case[key]
    value = value if i is None else value[i]
    return value if j is None else value[j]


def with_slots(case: dict, replace) -> dict:
    """A copy of the case with every tensor t at slot s replaced by replace(s, t)."""
    def conv(value, key, i=None, j=None):
        if isinstance(value, torch.Tensor):
            return replace((key, i, j), value)
        if isinstance(value, (list, tuple)):
            if i is None:
                return type(value)(conv(v, key, n) for n, v in enumerate(value))
            return type(value)(conv(v, key, i, n) for n, v in enumerate(value))
        return value
    return {key: conv(value, key) for key, value in case.items()}


def relayout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``tensor`` in another memory layout, differentiable in it.

    strided: every other element of a larger buffer; offset: a view starting
    past the beginning of its storage; transposed: column-major storage;
    expanded: stride 0 along the first non-empty axis (the values of its
    first slice repeated, so the values change, not the shape).
    """
    if layout == "contiguous" or tensor.dim() == 0:
        return tensor
    if layout == "expanded":
        axis = next((d for d in range(tensor.dim()) if tensor.shape[d] > 1), None)
        if axis is None:
            return tensor.expand(tensor.shape)
        return tensor.narrow(axis, 0, 1).expand(tensor.shape)
    if layout == "transposed" and tensor.dim() >= 2:
        return tensor.mT.contiguous().mT
    step = 2 if layout in ("strided", "transposed") else 1
    start = 3 if layout == "offset" else 1
    buffer = tensor.new_zeros([start + step * n for n in tensor.shape])
    window = tuple(slice(start, start + step * n, step) for n in tensor.shape)
    buffer[window] = tensor
    return buffer[window]


def loss_probes(tensors, seed=1):
    """Fixed random cotangents, one per output, drawn on the CPU (the same
    numbers on any device) as float64, then moved."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device)
            for t in tensors]


def outputs_and_grads(outputs, leaves) -> list:
    """The outputs (detached) and d loss / d each leaf under loss_probes; a leaf
    the loss does not reach gets zeros."""
    outputs = [o for o in outputs if o is not None]
    loss = sum((o * p.to(o.dtype)).sum() for o, p in zip(outputs, loss_probes(outputs)))
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    # retain_graph: two calls may share the graph of how their inputs were made.
    grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True, retain_graph=True)) \
        if wanted else iter(())
    result = [o.detach() for o in outputs]
    for leaf in leaves:
        if leaf.requires_grad:
            grad = next(grads)
            result.append(torch.zeros_like(leaf) if grad is None else grad)
    return result


def call_din_attention(case: dict, backend: str):
    """din_attention(**case) with its scores: (pooled, scores)."""
    kwargs = dict(case)
    return din_fast.din_attention(kwargs.pop("query"), kwargs.pop("keys"), kwargs.pop("lengths"),
                                  return_scores=True, backend=backend, **kwargs)


def leaf_copy(case: dict) -> tuple:
    """(the case with every floating tensor a fresh leaf requiring grad, those leaves)."""
    leaves = []

    def fresh(slot, tensor):
        if not tensor.is_floating_point():
            return tensor
        leaf = tensor.detach().clone().requires_grad_(True)
        leaves.append(leaf)
        return leaf
    return with_slots(case, fresh), leaves
