"""GPU benchmark of a training step: forward + backward time and peak memory.

Peers as in bench_gpu.py: the fused Triton kernels (forward and backward),
the torch backend, the reference in eager mode and torch.compile of the
reference. Headline: B=4096, T=200, D=64, hidden (80, 40), sigmoid, lengths
uniform in 1..T, float32 parameters, bfloat16 inputs (float32 too by default).
Per peer: the median time of forward + backward (triton.testing.do_bench),
the peak memory of one step above what was allocated before it
(torch.cuda.max_memory_allocated), the largest relative error of a gradient
against float64 reference gradients, and whether two backward passes give
bitwise-identical gradients. Writes benchmarks/results/bench_gpu_train.csv.

    python benchmarks/bench_gpu_train.py [--dtypes bfloat16 float32] [--out DIR]
    python benchmarks/bench_gpu_train.py --smoke    # tiny shapes on CPU: checks the logic
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import DIM, HEADLINE, HIDDEN, PEERS, make_inputs, median_ms, write_csv  # noqa: E402

import din_fast  # noqa: E402

GRAD_INPUTS = ("query", "keys")


def leaves(inputs):
    """The tensors of a training step that get gradients: query, keys, weights, biases."""
    return [inputs[name] for name in GRAD_INPUTS] + inputs["weights"] + inputs["biases"]


def training_inputs(inputs):
    """A copy whose float tensors require grad (fresh leaves, no stale .grad)."""
    out = dict(inputs)
    for name in GRAD_INPUTS:
        out[name] = inputs[name].detach().clone().requires_grad_(True)
    for name in ("weights", "biases"):
        out[name] = [t.detach().clone().requires_grad_(True) for t in inputs[name]]
    return out


def step_function(peer):
    """fn(inputs, probe) -> gradients of (pooled * probe).sum() w.r.t. leaves(inputs)."""
    if peer == "reference_compiled":
        forward = torch.compile(lambda **kw: din_fast.din_attention(backend="reference", **kw))
    else:
        def forward(**kw):
            return din_fast.din_attention(backend=peer, **kw)

    def step(inputs, probe):
        pooled = forward(**inputs)
        return torch.autograd.grad((pooled.float() * probe).sum(), leaves(inputs))

    return step


def float64_gradients(inputs, probe):
    as64 = {k: ([t.detach().double().requires_grad_(True) for t in v] if isinstance(v, list)
                else v.detach().double().requires_grad_(v.is_floating_point())
                if v.is_floating_point() else v)
            for k, v in inputs.items()}
    pooled = din_fast.din_attention(backend="reference", **as64)
    return torch.autograd.grad((pooled * probe.double()).sum(), leaves(as64))


def worst_relative_error(grads, exact) -> float:
    return max(((g.double() - e).norm() / e.norm().clamp_min(1e-30)).item()
               for g, e in zip(grads, exact))


def peak_step_bytes(step, inputs, probe, device) -> float:
    """Peak bytes allocated during one step above what was allocated before it
    (NaN off CUDA, where PyTorch keeps no allocator statistics)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    grads = step(inputs, probe)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del grads
    return peak


def measure(peer, inputs, probe, exact, device):
    """One row: time, peak memory, gradient error, repeatability (or why it failed)."""
    step = step_function(peer)
    train = training_inputs(inputs)
    try:
        first = step(train, probe)
        second = step(train, probe)
        row = dict(
            fwd_bwd_ms=median_ms(lambda: step(train, probe)),
            peak_mib=peak_step_bytes(step, train, probe, device) / 2 ** 20,
            max_grad_rel_error=worst_relative_error(first, exact),
            bitwise_repeatable=all(torch.equal(a, b) for a, b in zip(first, second)),
            note="")
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        row = dict(fwd_bwd_ms=float("nan"), peak_mib=float("nan"),
                   max_grad_rel_error=float("nan"), bitwise_repeatable=False,
                   note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    return row


def triton_backward(dtype) -> str:
    """How backend="triton" runs the backward at the benchmark's widths: the
    fused kernel's launches, or the torch backward inside the op (and why)."""
    from din_fast.kernels.din_backward import BackwardSpec, backward_unsupported_shape

    reason = backward_unsupported_shape(DIM, HIDDEN, dtype)
    if reason is not None:
        return f"torch backward: {reason}"
    spec = BackwardSpec(dtype=dtype, activation="sigmoid", softmax=False, has_lengths=True,
                        has_mask=False, has_grad_scores=False, values_are_keys=True,
                        hidden=HIDDEN, embed_dim=DIM, value_dim=DIM, candidates=1)
    return f"fused backward, {len(spec.launches())} launches"


def run(dtypes, peers, shape, device):
    rows = []
    for dtype in dtypes:
        batch, candidates, length = shape
        inputs = make_inputs(batch, candidates, length, dtype, device)
        probe = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(1)).to(device)
        exact = float64_gradients(inputs, probe)
        for peer in peers:
            row = dict(dtype=str(dtype).split(".")[-1], batch=batch, length=length, dim=DIM,
                       hidden="x".join(map(str, HIDDEN)), peer=peer,
                       **measure(peer, inputs, probe, exact, device))
            if peer == "triton":
                row["note"] = "; ".join(filter(None, [triton_backward(dtype), row["note"]]))
            rows.append(row)
            print(f"{row['dtype']:>9} B={batch} T={length} {peer:<19}"
                  f"{row['fwd_bwd_ms']:>10.3f} ms {row['peak_mib']:>9.1f} MiB  "
                  f"grad err {row['max_grad_rel_error']:.1e}  "
                  f"repeatable {row['bitwise_repeatable']} {row['note']}", flush=True)
        del inputs, exact
    return rows


def add_ratios(rows):
    """Each peer's time and peak memory over triton's, same dtype."""
    base = {r["dtype"]: r for r in rows if r["peer"] == "triton"}
    for r in rows:
        ref = base.get(r["dtype"])
        r["time_over_triton"] = r["fwd_bwd_ms"] / ref["fwd_bwd_ms"] if ref else float("nan")
        r["memory_over_triton"] = r["peak_mib"] / ref["peak_mib"] if ref else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU (triton in the interpreter): checks the logic")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, shape = torch.device("cpu"), (4, 1, 9)
        peers = [p for p in args.peers if p != "reference_compiled"]
        dtypes = [torch.float32]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        shape = (HEADLINE["batch"], HEADLINE["candidates"], HEADLINE["length"])
        peers = args.peers
    else:
        raise SystemExit("bench_gpu_train.py: needs a CUDA device (or --smoke)")
    rows = run(dtypes, peers, shape, device)
    add_ratios(rows)
    name = "bench_gpu_train_smoke.csv" if args.smoke else "bench_gpu_train.csv"
    write_csv(rows, os.path.join(args.out, name))


if __name__ == "__main__":
    main()
