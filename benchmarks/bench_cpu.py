"""The main job: din_fast's torch backend on CPU against the reference and DeepCTR-Torch.

Times the forward (no grad) and the forward+backward (every gradient: query,
keys, weights, biases) of din_fast backend="torch", the same under
torch.compile (``torch_compiled``: what a compiled model runs),
backend="reference" and DeepCTR-Torch's AttentionSequencePoolingLayer, all
with the same inputs and weights, at B=1024, T=100 (lengths uniform in 1..T),
D=64, hidden (80, 40), sigmoid, float32. All eight are timed round-robin
(harness.time_round_robin), so the machine's load falls on each alike; each
time is printed as the median with its interquartile range, each speedup
(over DeepCTR-Torch, and over the eager torch backend) as the median of the
per-round ratios. Beside every time: the peak memory of one call and the
error against the float64 reference (the output's largest absolute error; for
forward+backward also the gradients', relative to each gradient's largest
element). One torch thread by default: on a shared machine more threads than
free cores made the timings swing by 2x.

    python -m benchmarks.bench_cpu [--threads 1] [--rounds 20] [--out FILE.csv]
                                   [--compile-backend inductor]

Writes a CSV (default benchmarks/results/bench_cpu.csv, not tracked by git).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from . import harness, peers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BACKENDS = ("torch", "reference")
PASSES = ("forward", "forward+backward")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=1024)
    parser.add_argument("--length", type=positive_int, default=100, help="T")
    parser.add_argument("--dim", type=positive_int, default=64, help="D")
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=[80, 40])
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager"),
                        default="inductor", help="torch.compile's backend for torch_compiled "
                        "(aot_eager: the same graphs without code generation, quick to compile)")
    add_run_options(parser, "bench_cpu.csv", rounds=20, warmup=2)
    return parser


def add_run_options(parser: argparse.ArgumentParser, csv_name: str, rounds: int,
                    warmup: int) -> None:
    """The options every CPU benchmark takes: --rounds, --warmup, --threads
    (torch's; default 1) and --out (default: results/<csv_name>)."""
    parser.add_argument("--rounds", type=positive_int, default=rounds,
                        help="timed rounds, each calling every implementation once")
    parser.add_argument("--warmup", type=int, default=warmup,
                        help="untimed calls of each first")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads (default 1: no oversubscription on a shared machine)")
    parser.add_argument("--out", default=os.path.join(RESULTS, csv_name),
                        help="CSV to write (default: %(default)s)")


def implementations(inputs: dict, compile_backend: str) -> list:
    impls = [peers.din_fast_implementation(backend) for backend in BACKENDS]
    impls.insert(1, peers.compiled_implementation("torch", compile_backend))
    deepctr = peers.deepctr_implementation(inputs)
    if deepctr is None:
        print(peers.DEEPCTR_MISSING)
    else:
        impls.append(deepctr)
    return impls


def measure(args, command: str) -> list:
    """One row per implementation and pass."""
    device = torch.device("cpu")
    hidden = tuple(args.hidden)
    inputs = peers.make_inputs(args.batch, 1, args.length, args.dim, hidden, torch.float32, device)
    train_inputs = peers.with_grad(inputs)
    probe, exact, exact_grads = peers.float64_oracle(inputs, train=True)
    impls = implementations(inputs, args.compile_backend)

    fns, rows = {}, {}
    for impl in impls:
        def forward(impl=impl):
            with torch.no_grad():
                return impl.forward(inputs)

        def train_step(impl=impl):
            return impl.train_step(train_inputs, probe)

        output_error = harness.max_abs_error(forward(), exact)
        grad_error = harness.worst_gradient_error(train_step(), exact_grads)
        for name, fn in zip(PASSES, (forward, train_step)):
            fns[impl.name, name] = fn
            rows[impl.name, name] = {
                "impl": impl.name, "pass": name,
                "peak_mb": harness.peak_memory_bytes(fn, device) / 2 ** 20,
                "max_abs_error": output_error,
                "grad_error": grad_error if fn is train_step else math.nan}
    load_before = harness.load_average()
    times = harness.time_round_robin(fns, args.rounds, args.warmup, device)
    load_after = harness.load_average()

    base = "deepctr_torch" if any(i.name == "deepctr_torch" for i in impls) else "reference"
    setting = dict(batch=args.batch, length=args.length, dim=args.dim,
                   hidden="x".join(map(str, hidden)), dtype="float32", threads=args.threads,
                   rounds=args.rounds, torch=torch.__version__, cpu=harness.cpu_name(),
                   cores=len(os.sched_getaffinity(0)), load_before=load_before, load_after=load_after,
                   command=command)
    out = []
    for (impl, name), row in rows.items():
        ratios = harness.paired_ratios(times[base, name], times[impl, name])
        # Against the eager torch backend as well: what torch_compiled must not lose.
        eager_ratios = harness.paired_ratios(times["torch", name], times[impl, name])
        out.append(dict(row, **harness.Spread.of(times[impl, name]).fields("ms"),
                        **harness.Spread.of(ratios).fields(f"speedup_vs_{base}"), baseline=base,
                        **harness.Spread.of(eager_ratios).fields("speedup_vs_torch"),
                        **setting))
    return out


def report(rows: list) -> None:
    first = rows[0]
    base = first["baseline"]
    print(f"B={first['batch']} T={first['length']} D={first['dim']} hidden {first['hidden']} "
          f"sigmoid float32, lengths uniform in 1..T")
    print(f"{first['cpu']}, {first['threads']} thread(s) of {first['cores']} cores, "
          f"torch {first['torch']}; {first['rounds']} rounds; load average "
          f"{first['load_before']:.2f} -> {first['load_after']:.2f}")
    if first["load_before"] + first["threads"] > first["cores"] + 0.5:
        print("note: other processes compete for the cores: the times are inflated and "
              "noisy, the speedups (per-round ratios) less so")
    speedup = f"speedup_vs_{base}"
    print(f"{'implementation':<15}{'pass':<17}{'ms: median (IQR)':>22}{'speedup (IQR)':>20}"
          f"{'vs torch (IQR)':>20}{'peak MB':>9}{'out err':>9}{'grad err':>9}")
    for r in rows:
        ms = harness.Spread.from_fields(r, "ms").text(".1f")
        ratio = harness.Spread.from_fields(r, speedup).text(".2f", "x")
        eager_ratio = harness.Spread.from_fields(r, "speedup_vs_torch").text(".2f", "x")
        grad_error = "-" if math.isnan(r["grad_error"]) else f"{r['grad_error']:.1e}"
        print(f"{r['impl']:<15}{r['pass']:<17}{ms:>22}{ratio:>20}{eager_ratio:>20}"
              f"{r['peak_mb']:>9.1f}{r['max_abs_error']:>9.1e}{grad_error:>9}")
    print(f"(speedup: {base}'s time over each one's, the median of the per-round ratios; "
          f"vs torch: the eager torch backend's likewise; err: against float64)")


def main(argv=None) -> int:
    return harness.run_cpu_benchmark("bench_cpu", build_parser, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
