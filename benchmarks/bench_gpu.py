"""GPU benchmark of the forward: the fused Triton kernel against its peers.

Forward only, no grad, medians from triton.testing.do_bench. Peers: the
reference in eager mode, torch.compile of the reference, and the torch
backend. Headline: B=4096, T=200, D=64, hidden (80, 40), sigmoid, lengths
uniform in 1..T, float32 parameters, bfloat16 and float32 inputs. Sweep: T in
{50, 200, 1000, 10000} x C in {1, 100}, with B chosen so that B*C*T stays at
the headline's 819,200 pairs (T=10000, C=100 is one user: B=1). Beside each
time: the max error against a float64 reference, the achieved bandwidth
(bytes of query, keys and lengths read over the time) as a fraction of a
measured device-to-device copy, and the floor max(bytes / copy bandwidth,
flops / peak). Writes a CSV and a plot.

    python benchmarks/bench_gpu.py [--quick] [--compile-sweep] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

import din_fast

HEADLINE = dict(batch=4096, candidates=1, length=200)
PAIRS = 4096 * 200
SWEEP_LENGTHS = (50, 200, 1000, 10000)
SWEEP_CANDIDATES = (1, 100)
DIM = 64
HIDDEN = (80, 40)
PEERS = ("triton", "torch", "reference", "reference_compiled")
# Dense peak flop rates (H100 SXM; override with --peak-tflops-*): bfloat16 on
# tensor cores, float32 on CUDA cores (the kernel's float32 dots are IEEE
# unless torch allows TF32).
PEAK_TFLOPS = {torch.bfloat16: 989.0, torch.float16: 989.0, torch.float32: 67.0}


def sweep_shapes(quick: bool):
    """(batch, candidates, length) per measurement, headline first."""
    shapes = [(HEADLINE["batch"], HEADLINE["candidates"], HEADLINE["length"])]
    lengths = (200, 10000) if quick else SWEEP_LENGTHS
    for candidates in SWEEP_CANDIDATES:
        for length in lengths:
            shape = (max(1, PAIRS // (length * candidates)), candidates, length)
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def make_inputs(batch, candidates, length, dtype, device, seed=0):
    """din_attention keyword arguments; float32 parameters, inputs in `dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device)

    widths = (4 * DIM,) + HIDDEN + (1,)
    query_shape = (batch, DIM) if candidates == 1 else (batch, candidates, DIM)
    return dict(
        query=randn(*query_shape).to(dtype), keys=randn(batch, length, DIM).to(dtype),
        lengths=torch.randint(1, length + 1, (batch,), generator=gen).to(device),
        weights=[randn(o, i, std=1.5 / i ** 0.5) for i, o in zip(widths, widths[1:])],
        biases=[randn(o, std=0.3) for o in widths[1:]],
    )


def float64_reference(inputs):
    as64 = {k: ([t.double() for t in v] if isinstance(v, list) else
                v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    return din_fast.din_attention(backend="reference", **as64)


def bytes_read(inputs) -> int:
    return sum(inputs[name].numel() * inputs[name].element_size()
               for name in ("query", "keys", "lengths"))


def flops(batch, candidates, length) -> float:
    """Multiply-adds x 2 of the folded MLP on every (b, c, t) pair, plus the pooling."""
    h1, h2 = HIDDEN
    pairs = batch * candidates * length
    per_pair = DIM * h1 + h1 * h2 + h2 + DIM          # interaction, layer 2, output, pooling
    return 2.0 * (pairs * per_pair + batch * length * DIM * h1)   # + the key term per key


def copy_bandwidth(device) -> float:
    """Bytes per second of a device-to-device copy (read + write) of 1 GiB."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = median_ms(lambda: dst.copy_(src)) / 1e3
    return 2 * src.numel() / seconds


def median_ms(fn) -> float:
    """Median milliseconds per call: do_bench on a GPU, a wall clock elsewhere."""
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peer_function(peer):
    if peer == "reference_compiled":
        compiled = torch.compile(lambda **kw: din_fast.din_attention(backend="reference", **kw))
        return compiled
    return lambda **kw: din_fast.din_attention(backend=peer, **kw)


def measure(peer, fn, inputs, exact):
    """One row's timing and error fields, or the error that stopped the peer."""
    try:
        with torch.no_grad():
            out = fn(**inputs)
            error = (out.double() - exact).abs().max().item()
            ms = median_ms(lambda: fn(**inputs))
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return dict(median_ms=float("nan"), max_abs_error=float("nan"),
                    note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
    return dict(median_ms=ms, max_abs_error=error, note="")


def run(args, device):
    dtypes = [getattr(torch, name) for name in args.dtypes]
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else float("nan")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    rows = []
    for dtype in dtypes:
        peak = getattr(args, f"peak_tflops_{str(dtype).split('.')[-1]}") * 1e12
        for index, (batch, candidates, length) in enumerate(sweep_shapes(args.quick)):
            inputs = make_inputs(batch, candidates, length, dtype, device)
            with torch.no_grad():
                exact = float64_reference(inputs)
            traffic = bytes_read(inputs)
            floor_ms = 1e3 * max(traffic / bandwidth, flops(batch, candidates, length) / peak)
            for peer in args.peers:
                if peer == "reference_compiled" and index and not args.compile_sweep:
                    continue
                row = dict(dtype=str(dtype).split(".")[-1], batch=batch, candidates=candidates,
                           length=length, dim=DIM, hidden="x".join(map(str, HIDDEN)),
                           peer=peer, **measure(peer, peer_function(peer), inputs, exact))
                row["key_gbps"] = traffic / row["median_ms"] / 1e6
                row["copy_fraction"] = row["key_gbps"] * 1e9 / bandwidth
                row["floor_ms"] = floor_ms
                row["x_floor"] = row["median_ms"] / floor_ms
                rows.append(row)
                print(f"{row['dtype']:>9} B={batch:<5} C={candidates:<3} T={length:<5} "
                      f"{peer:<19}{row['median_ms']:>10.3f} ms {row['key_gbps']:>7.0f} GB/s "
                      f"{row['x_floor']:>6.1f}x floor  err {row['max_abs_error']:.1e} "
                      f"{row['note']}", flush=True)
            del inputs, exact
    return rows


def add_speedups(rows):
    """Each row's time over triton's at the same shape and dtype."""
    triton_ms = {(r["dtype"], r["batch"], r["candidates"], r["length"]): r["median_ms"]
                 for r in rows if r["peer"] == "triton"}
    for r in rows:
        base = triton_ms.get((r["dtype"], r["batch"], r["candidates"], r["length"]))
        r["triton_speedup"] = r["median_ms"] / base if base else float("nan")


def write_csv(rows, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def plot(rows, path):
    """Time against T, one panel per (dtype, C), one line per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["candidates"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (dtype, candidates) in zip(axes[0], panels):
        for peer in dict.fromkeys(r["peer"] for r in rows):
            points = sorted((r["length"], r["median_ms"]) for r in rows
                            if (r["dtype"], r["candidates"], r["peer"]) == (dtype, candidates, peer)
                            and r["batch"] * r["candidates"] * r["length"] <= PAIRS)
            if points:
                ax.plot(*zip(*points), marker="o", label=peer)
        ax.set(xscale="log", yscale="log", xlabel="T (B*C*T = 819,200 pairs)",
               ylabel="forward ms (median)", title=f"{dtype}, C={candidates}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    parser.add_argument("--quick", action="store_true", help="T in {200, 10000} only")
    parser.add_argument("--compile-sweep", action="store_true",
                        help="torch.compile the reference at every shape, not only the headline")
    for dtype, tflops in PEAK_TFLOPS.items():
        name = str(dtype).split(".")[-1]
        parser.add_argument(f"--peak-tflops-{name}", type=float, default=tflops,
                            help=f"dense peak for {name} (for the floor)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: needs a CUDA device (torch.cuda.is_available() is False)")
    rows = run(args, torch.device("cuda"))
    add_speedups(rows)
    write_csv(rows, os.path.join(args.out, "bench_gpu.csv"))
    plot(rows, os.path.join(args.out, "bench_gpu.png"))


if __name__ == "__main__":
    main()
