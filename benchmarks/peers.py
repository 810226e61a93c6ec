"""What the benchmarks compare: one DIN problem, its float64 answer, and the
implementations that compute it (din_fast's backends, torch.compile of them,
DeepCTR-Torch's AttentionSequencePoolingLayer).

Every implementation gets the same inputs and weights: a query [B, D] or
[B, C, D], keys [B, T, D] in the benchmark's dtype, lengths uniform in 1..T,
float32 parameters in nn.Linear layout (the layout every peer uses), sigmoid,
no normalization (the paper's DIN, and DeepCTR-Torch's default).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch

import din_fast

GRAD_INPUTS = ("query", "keys")


def make_inputs(batch: int, candidates: int, length: int, dim: int, hidden: tuple,
                dtype: torch.dtype, device, seed: int = 0) -> dict:
    """din_attention's keyword arguments for one problem (C = 1: a 2-D query).

    The weights are scaled (1.5 / sqrt(fan_in)) so that the scores vary
    across positions instead of sitting near the bias.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    widths = (4 * dim,) + tuple(hidden) + (1,)
    query_shape = (batch, dim) if candidates == 1 else (batch, candidates, dim)
    return dict(
        query=randn(*query_shape).to(dtype),
        keys=randn(batch, length, dim).to(dtype),
        lengths=torch.randint(1, length + 1, (batch,), generator=gen).to(device),
        weights=[randn(o, i, std=1.5 / i ** 0.5) for i, o in zip(widths, widths[1:])],
        biases=[randn(o, std=0.3) for o in widths[1:]],
    )


def with_grad(inputs: dict) -> dict:
    """A copy whose query, keys, weights and biases are fresh leaves that require grad."""
    out = dict(inputs)
    for name in GRAD_INPUTS:
        out[name] = inputs[name].detach().clone().requires_grad_(True)
    for name in ("weights", "biases"):
        out[name] = [t.detach().clone().requires_grad_(True) for t in inputs[name]]
    return out


def leaves(inputs: dict) -> list:
    """The tensors of din_attention's inputs that get gradients, in a fixed order."""
    return [inputs[name] for name in GRAD_INPUTS] + inputs["weights"] + inputs["biases"]


def make_probe(inputs: dict) -> torch.Tensor:
    """The upstream gradient of a training step: (pooled * probe).sum()."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(inputs["query"].shape, generator=gen).to(inputs["query"].device)


def as_float64(inputs: dict) -> dict:
    """The arguments with every floating-point tensor in float64."""
    def convert(value):
        if isinstance(value, list):
            return [convert(item) for item in value]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.detach().double()
        return value

    return {name: convert(value) for name, value in inputs.items()}


def float64_output(inputs: dict, max_pairs: int | None = None, **options) -> torch.Tensor:
    """The pooled output of the reference in float64; with ``max_pairs``, a
    few candidates at a time, so that the reference's [B, C, T, 4D] concat
    of one call holds at most that many (candidate, position) pairs.
    ``options`` (top_k, search, search_params) make it two-stage
    (din_attention_top_k's reference)."""
    exact = as_float64(inputs)
    attention = din_fast.din_attention_top_k if "top_k" in options else din_fast.din_attention
    options = {name: [t.double() for t in value] if name == "search_params" else value
               for name, value in options.items()}
    query = exact["query"]
    candidates = 1 if query.dim() == 2 else query.shape[1]
    pairs_per_candidate = max(1, query.shape[0] * exact["keys"].shape[1])
    step = candidates if max_pairs is None else max(1, max_pairs // pairs_per_candidate)
    with torch.no_grad():
        if step >= candidates:
            return attention(backend="reference", **exact, **options)
        return torch.cat([attention(backend="reference", **dict(exact, query=query[:, c:c + step]),
                                    **options) for c in range(0, candidates, step)], dim=1)


def float64_gradients(inputs: dict, probe: torch.Tensor) -> list:
    """The reference's float64 gradients of (pooled * probe).sum(), in leaves() order."""
    exact = with_grad(as_float64(inputs))
    pooled = din_fast.din_attention(backend="reference", **exact)
    return list(torch.autograd.grad((pooled * probe.double()).sum(), leaves(exact)))


def float64_oracle(inputs: dict, train: bool) -> tuple:
    """What a benchmark row is checked against: (the probe, the reference's
    float64 output, and with ``train`` its float64 gradients, else None)."""
    probe = make_probe(inputs)
    return probe, float64_output(inputs), float64_gradients(inputs, probe) if train else None


@dataclass
class Implementation:
    """One way of computing the pooled output from din_attention's inputs.

    ``leaves(inputs)`` are the tensors its training step differentiates, in
    the order of peers.leaves (a peer with its own parameters returns those
    in place of the inputs' weights and biases).
    """

    name: str
    forward: Callable[[dict], torch.Tensor]
    leaves: Callable[[dict], list] = leaves

    def train_step(self, inputs: dict, probe: torch.Tensor) -> list:
        """Forward and backward: the gradients of (pooled * probe).sum()."""
        pooled = self.forward(inputs)
        return list(torch.autograd.grad((pooled.float() * probe).sum(), self.leaves(inputs)))


def din_fast_implementation(backend: str) -> Implementation:
    return Implementation(backend, lambda inputs: din_fast.din_attention(backend=backend, **inputs))


def compiled_implementation(backend: str, compile_backend: str = "inductor") -> Implementation:
    """torch.compile of din_attention on ``backend``: of the reference, the
    strongest stock-op baseline; of the torch backend, what a compiled model
    runs (the packed custom ops).

    Dynamo's caches are cleared first: every shape compiles anew, and past
    its recompile limit dynamo would silently run the function eagerly.
    """
    torch._dynamo.reset()
    compiled = torch.compile(lambda **inputs: din_fast.din_attention(backend=backend, **inputs),
                             backend=compile_backend)
    return Implementation(f"{backend}_compiled", lambda inputs: compiled(**inputs))


def deepctr_module(submodule: str):
    """deepctr_torch.<submodule> ("layers.sequence", "models.din"), or None
    when deepctr-torch is not installed.

    The package's __init__ starts a thread that asks PyPI for the latest
    version (no timeout: it can hold the process open offline); its layers
    and models do not need it, so the package is registered without running it.
    """
    if "deepctr_torch" not in sys.modules:
        spec = importlib.util.find_spec("deepctr_torch")
        if spec is None:
            return None
        package = types.ModuleType("deepctr_torch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["deepctr_torch"] = package
    return importlib.import_module(f"deepctr_torch.{submodule}")


def attention_flops(inputs: dict) -> int:
    """The activation unit's matrix-product FLOPs of one forward: per valid
    (candidate, position) pair, the folded first layer (2 * D * H1), each
    deeper layer (2 * H_(i-1) * H_i) and the output (2 * H_L). A backward
    costs about twice as much."""
    query, weights = inputs["query"], inputs["weights"]
    candidates = 1 if query.dim() == 2 else query.shape[1]
    keys = inputs["keys"]
    lengths = inputs.get("lengths")
    positions = keys.shape[0] * keys.shape[1] if lengths is None else int(lengths.sum())
    per_pair = 2 * (keys.shape[-1] * weights[0].shape[0]
                    + sum(w.shape[0] * w.shape[1] for w in weights[1:]))
    return positions * candidates * per_pair


# The representative matrix product whose rate sets the FLOP floor: the
# folded first layer of a block, [positions, D] x [D, candidates * H1].
FLOOR_GEMM = (4096, 64, 1280)


def floor_gemm(device, flops: int, dtype=torch.float32) -> tuple:
    """(a function computing FLOOR_GEMM's product as many times as comes
    closest to ``flops``, the FLOPs it does): timed beside an implementation
    doing ``flops``, it runs about as long, so that both see the same load."""
    m, k, n = FLOOR_GEMM
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(m, k, generator=gen).to(device, dtype)
    b = torch.randn(k, n, generator=gen).to(device, dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    once = 2 * m * k * n
    times = max(1, round(flops / once))

    def products():
        for _ in range(times):
            torch.mm(a, b, out=out)
    return products, times * once


def deepctr_rows_per_call(inputs: dict, memory_budget: int) -> int | None:
    """How many candidate rows (each with its own copy of the history) one
    call of DeepCTR-Torch's layer may take within ``memory_budget`` bytes:
    a power of two, or None when all of them fit. Its memory per row: the
    tiled history, the [T, 4D] concat and the hidden activations, kept for
    the backward."""
    keys, weights = inputs["keys"], inputs["weights"]
    length, dim = keys.shape[1:]
    per_row = length * (5 * dim + 2 * sum(w.shape[0] for w in weights)) * keys.element_size()
    query = inputs["query"]
    rows = query.shape[0] * (1 if query.dim() == 2 else query.shape[1])
    if rows * per_row <= memory_budget:
        return None
    fit = max(1, memory_budget // per_row)
    return 1 << (fit.bit_length() - 1)


def deepctr_implementation(inputs: dict, rows_per_call: int | None = None,
                           compile_backend: str | None = None) -> Implementation | None:
    """DeepCTR-Torch's AttentionSequencePoolingLayer with the inputs' weights
    (None when deepctr-torch is not installed).

    The layer scores one candidate per row: C candidates become B*C rows, each
    with its own copy of the history, as a DeepCTR-Torch user would batch them;
    ``rows_per_call`` splits them into calls of that many rows (how a server
    would bound the layer's memory, which grows with C * T). With
    ``compile_backend`` the layer runs under torch.compile
    (``deepctr_compiled``): what a user who does not adopt din_fast would do.
    Half-precision inputs run under torch.autocast (float32 parameters, the
    matrix products in the inputs' dtype), as DeepCTR-Torch trains in AMP.
    """
    sequence = deepctr_module("layers.sequence")
    if sequence is None:
        return None
    weights, biases = inputs["weights"], inputs["biases"]
    hidden = tuple(w.shape[0] for w in weights[:-1])
    dim = inputs["keys"].shape[-1]
    layer = sequence.AttentionSequencePoolingLayer(att_hidden_units=hidden, embedding_dim=dim)
    layer = layer.to(inputs["keys"].device)
    linears = list(layer.local_att.dnn.linears) + [layer.local_att.dense]
    with torch.no_grad():
        for linear, weight, bias in zip(linears, weights, biases):
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
    dtype = inputs["keys"].dtype
    autocast = torch.autocast(inputs["keys"].device.type, dtype=dtype,
                              enabled=dtype in (torch.float16, torch.bfloat16))

    call = layer
    if compile_backend is not None:
        torch._dynamo.reset()
        call = torch.compile(layer, backend=compile_backend)

    def forward(inputs):
        query, keys, lengths = inputs["query"], inputs["keys"], inputs["lengths"]
        batch, length, _ = keys.shape
        candidates = 1 if query.dim() == 2 else query.shape[1]
        rows = batch * candidates
        queries = query.reshape(rows, 1, dim)
        row_lengths = lengths.repeat_interleave(candidates)[:, None]
        step = rows if rows_per_call is None else rows_per_call
        pooled = []
        with autocast:
            for start in range(0, rows, step):
                # The history copied for this call's rows (row r is batch r // C).
                owners = torch.arange(start, min(start + step, rows), device=keys.device)
                history = keys.index_select(0, owners // candidates)
                pooled.append(call(queries[start:start + step], history,
                                   row_lengths[start:start + step]))
        return torch.cat(pooled).reshape(query.shape)

    def layer_leaves(inputs):
        return ([inputs[name] for name in GRAD_INPUTS] + [m.weight for m in linears]
                + [m.bias for m in linears])

    name = "deepctr_torch" if compile_backend is None else "deepctr_compiled"
    return Implementation(name, forward, layer_leaves)


DEEPCTR_MISSING = ("deepctr-torch is not installed: its layer is left out "
                   "(pip install --no-deps deepctr-torch to compare)")
