"""CPU benchmark: din_fast's torch backend against the reference and DeepCTR-Torch.

Times forward and forward+backward (median of repeated runs after warm-up) and
the peak extra memory of one forward+backward, at the headline shape of issue 2:
B=1024, T=100 (lengths uniform in 1..T), D=64, hidden (80, 40), sigmoid, float32.
Every implementation gets the same inputs and weights; the max error against the
float64 reference is printed beside each speed. Writes a CSV.

    python benchmarks/bench_cpu.py [--batch 1024] [--length 100] [--repeats 10]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time

import torch

import din_fast
from din_fast.problem import validate
from din_fast.reference import reference_din_attention
from peak_memory import PeakMemory


def make_inputs(batch, length, dim, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = din_fast.DINAttention(dim, hidden)
    with torch.no_grad():  # deeper weights than nn.Linear's default, so scores vary
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    query = torch.randn(batch, dim, generator=gen)
    keys = torch.randn(batch, length, dim, generator=gen)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    return layer, query, keys, lengths


def deepctr_layer(layer, dim, hidden):
    """DeepCTR-Torch's AttentionSequencePoolingLayer with the same weights, or None."""
    try:
        from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer
    except ImportError:
        return None
    peer = AttentionSequencePoolingLayer(att_hidden_units=hidden, embedding_dim=dim)
    with torch.no_grad():
        for ours, theirs in zip(layer.hidden, peer.local_att.dnn.linears):
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        peer.local_att.dense.weight.copy_(layer.output.weight)
        peer.local_att.dense.bias.copy_(layer.output.bias)
    return lambda q, k, lengths: peer(q[:, None, :], k, lengths[:, None]).squeeze(1)


def peak_extra_bytes(fn):
    """Most bytes of tensors alive at once during one call of fn."""
    with PeakMemory() as memory:
        fn()
    return memory.peak_bytes


def interleaved_medians(fns, repeats, warmup=2):
    """Median seconds per call of each fn, timed round-robin so that a change
    in the machine's load affects every implementation alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def build(args):
    """(float64 reference output, {name: callable(q, k, lengths)}, inputs)."""
    hidden = tuple(args.hidden)
    layer, query, keys, lengths = make_inputs(args.batch, args.length, args.dim, hidden)
    weights = [m.weight for m in layer.hidden] + [layer.output.weight]
    biases = [m.bias for m in layer.hidden] + [layer.output.bias]

    exact = reference_din_attention(validate(
        query.double(), keys.double(), lengths, weights=[w.double() for w in weights],
        biases=[b.double() for b in biases], activation="sigmoid", activation_params=None,
        mask=None, normalization=None, scale=1.0, values=None, dice_eps=1e-8))[0].squeeze(1)

    impls = {}
    for backend in ("torch", "reference"):
        layer_b = din_fast.DINAttention(args.dim, hidden, backend=backend)
        layer_b.load_state_dict(layer.state_dict())
        impls[f"din_fast[{backend}]"] = layer_b
    peer = deepctr_layer(layer, args.dim, hidden)
    if peer is not None:
        impls["deepctr_torch"] = peer
    else:
        print("deepctr-torch not installed: `pip install --no-deps deepctr-torch` to compare")
    return exact, impls, (query, keys, lengths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, nargs="+", default=[80, 40])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "bench_cpu.csv"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hidden = tuple(args.hidden)
    exact, impls, (query, keys, lengths) = build(args)
    rows, forwards, train_steps = [], [], []
    for name, impl in impls.items():
        q = query.clone().requires_grad_()
        k = keys.clone().requires_grad_()

        def forward(impl=impl):
            with torch.no_grad():
                return impl(query, keys, lengths)

        def train_step(impl=impl, q=q, k=k):
            impl(q, k, lengths).sum().backward()

        error = (forward().double() - exact).abs().max().item()
        rows.append(dict(impl=name, peak_extra_mb=peak_extra_bytes(train_step) / 2**20,
                         max_abs_error=error))
        forwards.append(forward)
        train_steps.append(train_step)
    for row, fwd, fwd_bwd in zip(rows, interleaved_medians(forwards, args.repeats),
                                 interleaved_medians(train_steps, args.repeats)):
        row.update(forward_ms=1e3 * fwd, fwd_bwd_ms=1e3 * fwd_bwd)

    base = next((r for r in rows if r["impl"] == "deepctr_torch"), rows[-1])
    print(f"B={args.batch} T={args.length} D={args.dim} hidden={hidden} sigmoid float32, "
          f"lengths uniform in 1..T; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'implementation':<22}{'fwd ms':>9}{'fwd+bwd ms':>12}{'peak MB':>10}" \
             f"{'speedup':>9}{'mem ratio':>11}{'max err':>11}"
    print(header)
    for r in rows:
        r["fwd_bwd_speedup_vs_base"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        r["memory_ratio_vs_base"] = r["peak_extra_mb"] / base["peak_extra_mb"]
        print(f"{r['impl']:<22}{r['forward_ms']:>9.2f}{r['fwd_bwd_ms']:>12.2f}"
              f"{r['peak_extra_mb']:>10.1f}{r['fwd_bwd_speedup_vs_base']:>8.2f}x"
              f"{r['memory_ratio_vs_base']:>11.2f}{r['max_abs_error']:>11.2e}")
    print(f"(speedup and memory ratio are relative to {base['impl']})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
