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


def float64_output(inputs: dict) -> torch.Tensor:
    """The pooled output of the reference in float64."""
    with torch.no_grad():
        return din_fast.din_attention(backend="reference", **as_float64(inputs))


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


def deepctr_implementation(inputs: dict) -> Implementation | None:
    """DeepCTR-Torch's AttentionSequencePoolingLayer with the inputs' weights
    (None when deepctr-torch is not installed).

    The layer scores one candidate per row: C candidates become B*C rows, each
    with its own copy of the history, as a DeepCTR-Torch user would batch them.
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

    def forward(inputs):
        query, keys, lengths = inputs["query"], inputs["keys"], inputs["lengths"]
        batch, length, _ = keys.shape
        candidates = 1 if query.dim() == 2 else query.shape[1]
        rows = batch * candidates
        with autocast:
            pooled = layer(query.reshape(rows, 1, dim),
                           keys[:, None].expand(batch, candidates, length, dim).reshape(rows, length, dim),
                           lengths.repeat_interleave(candidates)[:, None])
        return pooled.reshape(query.shape)

    def layer_leaves(inputs):
        return ([inputs[name] for name in GRAD_INPUTS] + [m.weight for m in linears]
                + [m.bias for m in linears])

    return Implementation("deepctr_torch", forward, layer_leaves)


DEEPCTR_MISSING = ("deepctr-torch is not installed: its layer is left out "
                   "(pip install --no-deps deepctr-torch to compare)")
