"""The main job: din_fast's torch backend on CPU against DeepCTR-Torch and the FLOP floor.

Two shapes in one run, each beside the peers and the FLOP floor:

- ``training``: B=1024 rows, one candidate each, T=100 (lengths uniform in
  1..T), the forward (no grad) and the forward+backward (every gradient:
  query, keys, weights, biases);
- ``serving``: one user, T=10,000 (the whole history valid) and C=512
  candidates as a 3-D query, the forward (inference).

D=64, hidden (80, 40), sigmoid, float32, the same inputs and weights for
every implementation: din_fast backend="torch", the same under torch.compile
(``torch_compiled``: what a compiled model runs), backend="reference" (left
out where its [C, T, 4D] concat would exceed ``--memory-budget-mb``),
DeepCTR-Torch's AttentionSequencePoolingLayer with the history tiled per
candidate (``deepctr_torch``; where that exceeds the budget, in calls of as
many candidate rows as fit) and the same layer under torch.compile
(``deepctr_compiled``: what a user who does not adopt din_fast would do).

The FLOP floor (``flop_floor`` rows) is the activation unit's matrix-product
FLOPs (peers.attention_flops; forward+backward three times the forward's)
at this machine's rate for a representative sgemm (peers.FLOOR_GEMM, the
folded first layer's shape), timed in every round beside the others.

Everything is timed round-robin (harness.time_round_robin), so the
machine's load falls on each alike; each time is printed as the median with
its interquartile range, each ratio (speedup over DeepCTR-Torch, over the
eager torch backend, time over the floor) as the median of the per-round
ratios. Beside every time: the peak memory of one call and the error against
the float64 reference (the output's largest absolute error and its relative
error ||out - ref|| / ||ref||; for forward+backward also the gradients'
largest, relative to each gradient's largest element). One torch thread by
default: on a shared machine more threads than free cores made the timings
swing by 2x.

    python -m benchmarks.bench_cpu [--shapes training serving] [--rounds 20]
                                   [--serving-rounds 3] [--threads 1] [--out FILE.csv]

Writes a CSV (default benchmarks/results/bench_cpu.csv, not tracked by git).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch

from . import harness, peers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PASSES = ("forward", "forward+backward")
SHAPES = ("training", "serving")
FLOOR = "flop_floor"


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
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--batch", type=positive_int, default=1024, help="training: B")
    parser.add_argument("--length", type=positive_int, default=100, help="training: T")
    parser.add_argument("--serving-length", type=positive_int, default=10_000,
                        help="serving: T")
    parser.add_argument("--serving-candidates", type=positive_int, default=512,
                        help="serving: C")
    parser.add_argument("--serving-rounds", type=positive_int, default=3,
                        help="serving: timed rounds (the first call of each, which measures "
                        "memory and error, is its warm-up)")
    parser.add_argument("--dim", type=positive_int, default=64, help="D")
    parser.add_argument("--hidden", type=positive_int, nargs="+", default=[80, 40])
    parser.add_argument("--memory-budget-mb", type=positive_int, default=2048,
                        help="the most one call of a peer may hold: DeepCTR-Torch's rows are "
                        "split into calls within it, the reference is left out beyond it")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager"),
                        default="inductor", help="torch.compile's backend for the compiled rows "
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


@dataclass
class Shape:
    """One problem of the run: its inputs, the passes timed, the rounds."""

    name: str
    batch: int
    candidates: int
    length: int
    full_histories: bool
    passes: tuple
    rounds: int
    warmup: int

    @classmethod
    def of(cls, name: str, args) -> "Shape":
        if name == "training":
            return cls(name, args.batch, 1, args.length, False, PASSES, args.rounds,
                       args.warmup)
        return cls(name, 1, args.serving_candidates, args.serving_length, True,
                   PASSES[:1], args.serving_rounds, 0)

    def inputs(self, args) -> dict:
        inputs = peers.make_inputs(self.batch, self.candidates, self.length, args.dim,
                                   tuple(args.hidden), torch.float32, torch.device("cpu"))
        if self.full_histories:
            inputs["lengths"].fill_(self.length)
        return inputs

    def describe(self) -> str:
        lengths = "every position valid" if self.full_histories else "lengths uniform in 1..T"
        query = "2-D query" if self.candidates == 1 else f"C={self.candidates} candidates"
        return f"{self.name}: B={self.batch}, {query}, T={self.length} ({lengths})"


def implementations(shape: Shape, inputs: dict, args) -> list:
    """The implementations timed at ``shape``, each with why it is left out, if it is."""
    budget = args.memory_budget_mb * 2 ** 20
    impls = [peers.din_fast_implementation("torch"),
             peers.compiled_implementation("torch", args.compile_backend)]
    reference_bytes = (inputs["keys"].shape[1] * shape.batch * shape.candidates
                       * (4 * args.dim + 2 * sum(args.hidden)) * 4)
    if reference_bytes <= budget:
        impls.append(peers.din_fast_implementation("reference"))
    else:
        print(f"{shape.name}: reference left out: its [B, C, T, 4D] concat and activations "
              f"would hold {reference_bytes / 2 ** 30:.1f} GiB, over --memory-budget-mb "
              f"{args.memory_budget_mb}")
    rows_per_call = peers.deepctr_rows_per_call(inputs, budget)
    if rows_per_call is not None:
        print(f"{shape.name}: DeepCTR-Torch's layer takes {rows_per_call} candidate rows per "
              f"call (all {shape.batch * shape.candidates} at once would exceed "
              f"--memory-budget-mb {args.memory_budget_mb})")
    for compile_backend in (None, args.compile_backend):
        deepctr = peers.deepctr_implementation(inputs, rows_per_call, compile_backend)
        if deepctr is None:
            print(peers.DEEPCTR_MISSING)
            break
        impls.append(deepctr)
    return impls


def measure_shape(shape: Shape, args) -> list:
    """One row per implementation and pass at ``shape``, the floor's included."""
    device = torch.device("cpu")
    inputs = shape.inputs(args)
    train = "forward+backward" in shape.passes
    if train:
        probe, exact, exact_grads = peers.float64_oracle(inputs, train=True)
        train_inputs = peers.with_grad(inputs)
    else:
        exact = peers.float64_output(inputs, max_pairs=args.memory_budget_mb * 2 ** 20 // 4096)
    fns, rows = {}, {}
    for impl in implementations(shape, inputs, args):
        def forward(impl=impl):
            with torch.no_grad():
                return impl.forward(inputs)

        def train_step(impl=impl):
            return impl.train_step(train_inputs, probe)

        for name, fn in zip(PASSES, (forward, train_step)):
            if name not in shape.passes:
                continue
            if impl.name.endswith("_compiled"):
                fn()    # compiled outside the memory count
            peak, result = harness.peak_memory_and_result(fn, device)
            if name == "forward":
                output_error = (harness.max_abs_error(result, exact),
                                harness.relative_error(result, exact))
                grad_error = math.nan
            else:
                grad_error = harness.worst_gradient_error(result, exact_grads)
            fns[impl.name, name] = fn
            rows[impl.name, name] = dict(
                impl=impl.name, **{"pass": name}, peak_mb=peak / 2 ** 20,
                max_abs_error=output_error[0], rel_error=output_error[1], grad_error=grad_error)
    flops = peers.attention_flops(inputs)
    fns[FLOOR], gemm_flops = peers.floor_gemm(device, flops)
    load_before = harness.load_average()
    times = harness.time_round_robin(fns, shape.rounds, shape.warmup, device)
    load_after = harness.load_average()
    return _rows(shape, args, rows, times, flops, gemm_flops,
                 dict(load_before=load_before, load_after=load_after))


def _rows(shape: Shape, args, rows: dict, times: dict, flops: int, gemm_flops: int,
          load: dict) -> list:
    """The CSV rows of one shape from its first calls and timed rounds."""
    gemm_ms = times.pop(FLOOR)
    # Per round: the floor at that round's rate, forward+backward three times the forward's.
    floors = {name: [ms * flops * (1 if name == "forward" else 3) / gemm_flops
                     for ms in gemm_ms] for name in shape.passes}
    for name in shape.passes:
        times[FLOOR, name] = floors[name]
        rows[FLOOR, name] = dict(impl=FLOOR, **{"pass": name}, peak_mb=math.nan,
                                 max_abs_error=math.nan, rel_error=math.nan,
                                 grad_error=math.nan)
    names = {impl for impl, _ in rows}
    base = "deepctr_torch" if "deepctr_torch" in names else "torch"
    setting = dict(shape=shape.name, description=shape.describe(), batch=shape.batch, candidates=shape.candidates,
                   length=shape.length, dim=args.dim, hidden="x".join(map(str, args.hidden)),
                   dtype="float32", threads=args.threads, rounds=shape.rounds,
                   gemm_gflops=harness.Spread.of([gemm_flops / ms / 1e6 for ms in gemm_ms]).median,
                   floor_gemm="x".join(map(str, peers.FLOOR_GEMM)), flops=flops,
                   torch=torch.__version__, cpu=harness.cpu_name(),
                   cores=len(os.sched_getaffinity(0)), **load, command=args.command)
    out = []
    for (impl, name), row in rows.items():
        mine = times[impl, name]
        ratios = {f"speedup_vs_{base}": harness.paired_ratios(times[base, name], mine),
                  # Against the eager torch backend as well: what torch_compiled must not lose.
                  "speedup_vs_torch": harness.paired_ratios(times["torch", name], mine),
                  "x_floor": harness.paired_ratios(mine, floors[name])}
        fields = {}
        for prefix, values in ratios.items():
            fields.update(harness.Spread.of(values).fields(prefix))
        out.append(dict(row, **harness.Spread.of(mine).fields("ms"), baseline=base, **fields,
                        **setting))
    return out


def measure(args, command: str) -> list:
    """One row per shape, implementation and pass."""
    args.command = command
    return [row for name in args.shapes for row in measure_shape(Shape.of(name, args), args)]


def report(rows: list) -> None:
    first = rows[0]
    print(f"D={first['dim']} hidden {first['hidden']} sigmoid float32; {first['cpu']}, "
          f"{first['threads']} thread(s) of {first['cores']} cores, torch {first['torch']}")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        chosen = [r for r in rows if r["shape"] == shape]
        head = chosen[0]
        base = head["baseline"]
        print(f"\n{head['description']}; {head['rounds']} rounds; load average {head['load_before']:.2f} -> "
              f"{head['load_after']:.2f}; floor at {head['gemm_gflops']:.1f} GFLOP/s "
              f"(sgemm {head['floor_gemm']})")
        if head["load_before"] + head["threads"] > head["cores"] + 0.5:
            print("note: other processes compete for the cores: the times are inflated and "
                  "noisy, the ratios (per round) less so")
        print(f"{'implementation':<17}{'pass':<17}{'ms: median (IQR)':>28}{'vs ' + base:>22}"
              f"{'vs torch':>22}{'x floor':>22}{'peak MB':>9}{'out err':>9}{'rel err':>9}"
              f"{'grad err':>9}")
        for r in chosen:
            def spread(prefix, unit="x", fmt=".2f"):
                if r["impl"] == FLOOR and prefix.startswith("speedup"):
                    return "-"
                return harness.Spread.from_fields(r, prefix).text(fmt, unit)

            def number(value, fmt):
                return "-" if math.isnan(value) else format(value, fmt)

            print(f"{r['impl']:<17}{r['pass']:<17}{spread('ms', '', '.1f'):>28}"
                  f"{spread(f'speedup_vs_{base}'):>22}{spread('speedup_vs_torch'):>22}"
                  f"{spread('x_floor'):>22}{number(r['peak_mb'], '.1f'):>9}"
                  f"{number(r['max_abs_error'], '.1e'):>9}{number(r['rel_error'], '.1e'):>9}"
                  f"{number(r['grad_error'], '.1e'):>9}")
    print(f"\n(vs X: X's time over each one's, the median of the per-round ratios; x floor: "
          f"each one's time over the FLOP floor's; err: against float64)")


def main(argv=None) -> int:
    return harness.run_cpu_benchmark("bench_cpu", build_parser, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
