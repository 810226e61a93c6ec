"""GPU benchmark: din_fast's fused Triton kernels against the other backends and DeepCTR-Torch.

One pass per run: ``--pass forward`` (no grad) or ``--pass train`` (forward
and backward, every gradient: query, keys, weights, biases). Implementations:
din_fast backend="triton", "torch" and "reference" (eager), torch.compile of
the reference, and DeepCTR-Torch's AttentionSequencePoolingLayer (C
candidates as B*C rows; half precision under autocast). Shapes: the headline
B=4096, T=200, C=1, D=64, hidden (80, 40), sigmoid, lengths uniform in 1..T,
then the sweep T in {50, 200, 1000, 10000} x C in {1, 100} with B chosen so
that B*C*T stays the headline's 819,200 (query, history) pairs (T=10000,
C=100: B=1); bfloat16 and float32 inputs, float32 parameters. The headline
runs first in every dtype, then the sweep dtype by dtype, so that a run
stopped by a time limit has the headline's figures.
torch.compile runs at the headline shape only unless --compile-sweep (every
new shape compiles anew).

Per row: the median milliseconds and interquartile range of CUDA-event
timings taken round-robin (harness.time_round_robin); triton's speedup over
the implementation (the median per-round ratio); the peak memory of one call
above what was allocated before it; the error against float64 (the output's
largest absolute error; in --pass train also the gradients', relative to
each gradient's largest element); and against the device's measured
ceilings (a device-to-device copy's bandwidth, a matrix product's FLOP rate
in the dtype): the bytes the problem must move at least (each input read
once, each output written once) and the FLOPs of the folded MLP, as GB/s,
TFLOP/s and the time over the floor max(bytes / bandwidth, flops / peak).

``--dry-run`` runs the same code on CPU with tiny shapes, the triton backend
in the Triton interpreter and torch.compile with the aot_eager backend: it
checks the script, not the speed. Writes bench_gpu_<pass>_<label>.csv into
--out after every shape, so a run stopped by a time limit keeps what it measured.

    python -m benchmarks.bench_gpu --pass forward|train [--dry-run] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch
import triton

from . import harness, peers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DTYPES = ("bfloat16", "float32")
IMPLEMENTATIONS = ("triton", "torch", "reference", "reference_compiled", "deepctr_torch")


@dataclass(frozen=True)
class Sizes:
    """The shapes and repeat counts of one run."""

    headline: tuple        # (batch, candidates, length)
    lengths: tuple         # the sweep's T
    candidates: tuple      # the sweep's C
    dim: int
    hidden: tuple
    rounds: int
    warmup: int
    copy_bytes: int        # of the bandwidth measurement
    matmul_size: int       # of the peak FLOP rate measurement

    def shapes(self) -> list:
        """(batch, candidates, length) of every measurement, the headline first;
        the sweep keeps B*C*T at the headline's count (B at least 1)."""
        pairs = math.prod(self.headline)
        shapes = [self.headline]
        for candidates in self.candidates:
            for length in self.lengths:
                shape = (max(1, pairs // (candidates * length)), candidates, length)
                if shape not in shapes:
                    shapes.append(shape)
        return shapes


GPU_SIZES = Sizes(headline=(4096, 1, 200), lengths=(50, 200, 1000, 10000), candidates=(1, 100),
                  dim=64, hidden=(80, 40), rounds=20, warmup=3, copy_bytes=2 ** 30,
                  matmul_size=8192)
DRY_RUN_SIZES = Sizes(headline=(4, 1, 16), lengths=(16,), candidates=(1, 4), dim=64,
                      hidden=(80, 40), rounds=2, warmup=0, copy_bytes=2 ** 23, matmul_size=128)


def min_bytes(inputs: dict, train: bool) -> int:
    """Bytes the problem moves at least: every input read once and the output
    written once; training adds the output's gradient read and the query's,
    keys' and parameters' gradients written."""
    differentiable = sum(t.numel() * t.element_size() for t in peers.leaves(inputs))
    lengths = inputs["lengths"].numel() * inputs["lengths"].element_size()
    output = inputs["query"].numel() * inputs["keys"].element_size()
    if not train:
        return differentiable + lengths + output
    return 2 * differentiable + lengths + 2 * output


def flops(batch: int, candidates: int, length: int, dim: int, hidden: tuple, train: bool) -> float:
    """FLOPs of the folded MLP (2 per multiply-add): per (candidate, position)
    pair the q*k term of the first layer, the deeper layers, the output unit
    and the pooling; per position the key term; per candidate the query term.
    Training counts three times the forward (the backward's two products per
    forward product)."""
    pairs = batch * candidates * length
    layers = (dim,) + tuple(hidden)
    per_pair = sum(a * b for a, b in zip(layers[1:], layers[2:])) + dim * hidden[0] + hidden[-1] + dim
    forward = 2.0 * (pairs * per_pair + (batch * length + batch * candidates) * dim * hidden[0])
    return 3 * forward if train else forward


def implementations(inputs: dict, args, headline: bool) -> list:
    impls = [peers.din_fast_implementation(backend) for backend in ("triton", "torch", "reference")]
    if headline or args.compile_sweep:
        impls.append(peers.compiled_implementation("reference",
                                                   "aot_eager" if args.dry_run else "inductor"))
    deepctr = peers.deepctr_implementation(inputs)
    if deepctr is not None:
        impls.append(deepctr)
    return [impl for impl in impls if impl.name in args.implementations]


def failure_note(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [""]
    return f"{type(exc).__name__}: {lines[0][:160]}"


def measure_shape(args, sizes: Sizes, shape: tuple, dtype: torch.dtype, device, ceilings,
                  headline: bool) -> list:
    """One row per implementation at one shape and dtype."""
    batch, candidates, length = shape
    train = args.pass_ == "train"
    inputs = peers.make_inputs(batch, candidates, length, sizes.dim, sizes.hidden, dtype, device)
    probe, exact, exact_grads = peers.float64_oracle(inputs, train)
    if train:
        inputs = peers.with_grad(inputs)
    fns, rows = {}, {}
    for impl in implementations(inputs, args, headline):
        if train:
            def call(impl=impl):
                return impl.train_step(inputs, probe)
        else:
            def call(impl=impl):
                with torch.no_grad():
                    return impl.forward(inputs)
        row = rows[impl.name] = dict(impl=impl.name, note="")
        try:
            with torch.set_grad_enabled(train):   # train: the graph the timed steps use
                row["max_abs_error"] = harness.max_abs_error(impl.forward(inputs), exact)
            row["grad_error"] = (harness.worst_gradient_error(call(), exact_grads)
                                 if train else math.nan)
            row["peak_mib"] = harness.peak_memory_bytes(call, device) / 2 ** 20
            fns[impl.name] = call
        except Exception as exc:  # a peer that cannot run here is recorded, not fatal
            row.update(note=failure_note(exc))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    try:
        times = harness.time_round_robin(fns, sizes.rounds, sizes.warmup, device)
    except Exception as exc:
        times = {}
        for row in rows.values():
            row["note"] = row["note"] or f"timing: {failure_note(exc)}"
    bytes_needed = min_bytes(inputs, train)
    work = flops(batch, candidates, length, sizes.dim, sizes.hidden, train)
    setting = {"pass": args.pass_, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
               "candidates": candidates, "length": length, "dim": sizes.dim,
               "hidden": "x".join(map(str, sizes.hidden))}
    out = []
    for name, row in rows.items():
        ms = harness.Spread.of(times.get(name, []))
        speedup = harness.Spread.of(harness.paired_ratios(times.get(name, []),
                                                         times.get("triton", [])))
        out.append(dict(setting, impl=name, **ms.fields("ms"), **speedup.fields("triton_speedup"),
                        peak_mib=row.get("peak_mib", math.nan),
                        max_abs_error=row.get("max_abs_error", math.nan),
                        grad_error=row.get("grad_error", math.nan),
                        **against_ceilings(ms.median, bytes_needed, work,
                                           ceilings["copy_bytes_per_s"], ceilings[dtype]),
                        note=row["note"]))
    return out


def measure_ceilings(device: torch.device, sizes: Sizes, dtypes) -> dict:
    """The device's measured ceilings: {"copy_bytes_per_s": a device-to-device
    copy's bandwidth, dtype: a matrix product's FLOP rate in it, ...}."""
    ceilings = {"copy_bytes_per_s": harness.copy_bandwidth(device, sizes.copy_bytes)}
    ceilings.update({dtype: harness.matmul_rate(device, dtype, sizes.matmul_size)
                     for dtype in dtypes})
    return ceilings


def floor_seconds(bytes_needed: int, work: float, bandwidth: float, peak: float) -> float:
    """The least time a problem can take on the device: its bytes at the copy
    bandwidth or its FLOPs at the matmul peak, whichever is longer."""
    return max(bytes_needed / bandwidth, work / peak)


def against_ceilings(ms: float, bytes_needed: int, work: float, bandwidth: float,
                     peak: float) -> dict:
    """A time against the device's measured copy bandwidth and matmul peak."""
    seconds = ms / 1e3
    floor = floor_seconds(bytes_needed, work, bandwidth, peak)
    return dict(min_bytes=bytes_needed, flops=work, gbps=bytes_needed / seconds / 1e9,
                copy_fraction=bytes_needed / seconds / bandwidth, tflops=work / seconds / 1e12,
                peak_fraction=work / seconds / peak, floor_ms=1e3 * floor,
                over_floor=seconds / floor, copy_gbps=bandwidth / 1e9, peak_tflops=peak / 1e12)


def print_row(row: dict) -> None:
    ms = harness.Spread.from_fields(row, "ms").text(".3f")
    print(f"{row['pass']:<8}{row['dtype']:<9}B={row['batch']:<6}C={row['candidates']:<4}"
          f"T={row['length']:<6}{row['impl']:<19}{ms:>26} ms  triton x{row['triton_speedup']:<6.2f}"
          f"{row['peak_mib']:>9.1f} MiB  err {row['max_abs_error']:.1e}/{row['grad_error']:.1e}"
          f"{row['gbps']:>8.0f} GB/s {row['over_floor']:>6.1f}x floor {row['note']}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--pass", dest="pass_", choices=("forward", "train"), required=True,
                        help="forward (no grad) or train (forward + backward)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=IMPLEMENTATIONS)
    parser.add_argument("--headline-only", action="store_true", help="skip the sweep")
    parser.add_argument("--compile-sweep", action="store_true",
                        help="torch.compile the reference at every shape, not only the headline")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, triton in the interpreter: checks the script")
    parser.add_argument("--label", help="the device part of the file name "
                        "(default: the GPU's name, dry-run-cpu with --dry-run)")
    parser.add_argument("--out", default=RESULTS, help="folder for the CSV (default: %(default)s)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:   # one thread: the interpreter's checks need no more
        device, sizes = torch.device("cpu"), DRY_RUN_SIZES
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), GPU_SIZES
    else:
        print("bench_gpu: needs a CUDA device (torch.cuda.is_available() is False); "
              "--dry-run checks the script on CPU", file=sys.stderr)
        return 2
    if "triton" not in args.implementations:
        print("bench_gpu: --implementations must include triton (the speedups are over it)",
              file=sys.stderr)
        return 2
    if peers.deepctr_module("layers.sequence") is None:
        print(peers.DEEPCTR_MISSING)
    label = args.label or harness.results_label(device, args.dry_run)
    path = os.path.join(args.out, f"bench_gpu_{args.pass_}_{label}.csv")
    dtypes = [getattr(torch, name) for name in args.dtypes]
    ceilings = measure_ceilings(device, sizes, dtypes)
    print(f"{harness.device_name(device)}: torch {torch.__version__}, triton {triton.__version__}; "
          f"copy {ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s, matmul "
          + ", ".join(f"{str(d).removeprefix('torch.')} {ceilings[d] / 1e12:.1f} TFLOP/s"
                      for d in dtypes), flush=True)
    shapes = sizes.shapes()[:1] if args.headline_only else sizes.shapes()
    device_text = harness.device_name(device) + (" (dry run: CPU, Triton interpreter)"
                                                 if args.dry_run else "")
    rows = []
    # The headline in every dtype first, then the sweep (index 0: the headline).
    order = [(dtype, 0) for dtype in dtypes] + [(dtype, index) for dtype in dtypes
                                                 for index in range(1, len(shapes))]
    for dtype, index in order:
        for row in measure_shape(args, sizes, shapes[index], dtype, device, ceilings, index == 0):
            row.update(device=device_text, torch=torch.__version__, triton=triton.__version__)
            rows.append(row)
            print_row(row)
        harness.write_csv(rows, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
