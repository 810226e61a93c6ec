"""What the property tests share: small random DIN problems on every backend,
other memory layouts of the same values, and outputs with the gradients of
every input under a fixed random loss.

Problems are din_cases.make_case dicts: float64 on the torch and reference
backends, float32 on triton (the Triton interpreter on CPU, tests/conftest.py,
or CUDA where a GPU exists). Interpreted kernels are slow, so triton draws
fewer examples (EXAMPLES).
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from din_cases import make_case

BACKENDS = ("torch", "reference", "triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
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
    """Fixed random cotangents, one per output, drawn on the CPU then moved."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)
            for t in tensors]


def outputs_and_grads(outputs, leaves) -> list:
    """The outputs (detached) and d loss / d each leaf under loss_probes; a leaf
    the loss does not reach gets zeros."""
    outputs = [o for o in outputs if o is not None]
    loss = sum((o * p).sum() for o, p in zip(outputs, loss_probes(outputs)))
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
    import din_fast

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
