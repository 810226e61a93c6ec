"""Serving latency per request: the attention layer over long histories and many candidates (CPU or a GPU), and the whole model in each serving format (CPU).

One request is one user: a history of T behaviours and C candidate items to
score, as a recommender's ranking stage sends it. Two parts, in one run:

``grid`` (the attention layer, the DIN paper's "hundreds of ads for each
visitor in less than 10 ms"): for each dtype in ``--dtypes`` (float32 on
CPU; bfloat16, then float32 with ``--device cuda``), T in ``--grid-lengths``
x C in ``--grid-candidates``, D=64, hidden (80, 40), sigmoid, every position
valid, each path scores the request, the exact and two-stage ones on each
din_fast backend in ``--backends`` (torch on CPU; triton and torch on CUDA).
The serving target's shape, T=10,000 x C=512 (``SERVING_TARGET``), runs first
in every dtype when the grid holds it, so that a run stopped by a time limit
has it; then the other shapes, dtype by dtype.

- ``exact``: din_fast.din_attention, the [1, C, D] query against the
  history once, in bounded memory;
- ``two_stage_<search>_K<K>``: din_fast.din_attention_top_k with K in
  ``--top-k`` (50, 200): stage one scores every position with the ``din``
  scorer (the exact DIN score: as costly as ``exact`` on CPU; on triton the
  fused search kernel) or the ``dot`` scorer (the inner product of 16-wide
  projections, random here) and keeps the K best per candidate, stage two
  attends over those K only; on CUDA (and in ``--dry-run``) the torch
  backend runs the first K only: it is bound by its many launches there, and
  the triton backend's paths are the ones measured in full;
- ``deepctr_torch``: DeepCTR-Torch's AttentionSequencePoolingLayer with the
  history tiled per candidate (C rows; half precision under autocast), left
  out where its memory estimate exceeds ``--memory-budget-mb`` (the reason
  is printed);
- ``flop_floor``: on CPU, the activation unit's matrix-product FLOPs at this
  machine's rate for a representative sgemm, timed in every round, and what
  the same FLOPs would take at an H100's rate (the spec sheet's, an
  estimate, not a measurement); on a GPU, the request's bytes at the
  device's measured copy bandwidth or its FLOPs at the measured matmul peak
  in the dtype, whichever is longer (bench_gpu's floor), computed.

Per path: the latency's median (p50) and 99th percentile (p99) over the
requests, timed round-robin with the other paths (fewer requests at the
large shapes: ``--seconds-per-shape``), each from a synchronized start to
its last kernel done on a GPU (host work and launches included, after an L2
flush), the peak memory of one request (the CUDA allocator's on a GPU), and
the error against the float64 reference (computed in chunks of candidates,
on up to 16 of them). A path that fails at a shape (out of memory, a kernel
that cannot compile, in its first request or in the timed ones) is recorded
with its reason and the run goes on, and so is a shape that cannot be set up
at all (a row for "all paths").
``--dry-run`` runs the ``--device cuda`` code on CPU at two tiny shapes, the
triton backend in the Triton interpreter (TRITON_INTERPRET=1 in the
environment): it checks the script, not the speed.

``formats`` (the whole model): din_fast.DIN with the default recipe (Dice
attention 80-40 with a softmax, Dice MLP 200-80, 32 per embedding table)
over ``--items`` items, random weights in eval mode (latency does not depend
on what was learned), one request of ``--history`` behaviours and
``--candidates`` candidates in each serving format:

- eager: ``model(...)`` under ``torch.inference_mode``, [1, C] targets (the
  history pooled once for all candidates);
- AOTInductor: the ``.pt2`` package of ``din_fast.ctr.export.export_din``
  (its input checks included), [1, C] targets;
- ONNX Runtime: ``din_fast.ctr.serving.OnnxModel`` (its input checks included),
  [1, C] targets, ``--threads`` intra-op threads.

Each logit is compared with eager's. Exporting the package compiles C++
(about a minute on a small CPU); ``--formats eager onnx`` leaves it out.
All is timed with benchmarks.harness, one torch thread by default.

    python -m benchmarks.bench_serving [--parts grid formats] [--history 1000]
                                       [--candidates 512] [--out FILE.csv]
    python -m benchmarks.bench_serving --device cuda [--grid-lengths 1000 10000]

Writes a CSV (default benchmarks/results/bench_serving.csv), one row per
path, backend and shape, then per format; the grid's rows after every shape.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import triton

import din_fast
from din_fast.ctr import export, onnx_export
from din_fast.ctr.serving import EncodedBatch, OnnxModel

from . import bench_gpu, harness, peers
from .bench_cpu import add_run_options, positive_int

FORMATS = ("eager", "pt2", "onnx")
PARTS = ("grid", "formats")
FLOOR = "flop_floor"
# An H100 SXM's spec-sheet matrix rates: FP32 on its CUDA cores, and TF32 on
# its tensor cores (dense); what the floor would be there is an estimate.
H100_FP32_FLOPS = 67e12
H100_TF32_FLOPS = 495e12
# The float64 reference's error is measured on this many candidates at most.
ERROR_CANDIDATES = 16
PROJECTION = 16   # the dot search's projection width
BACKENDS = ("triton", "torch")
# The serving target's shape (T, C): one user, 10,000 behaviours, 512 candidates.
SERVING_TARGET = (10_000, 512)
# The path of the row that records a shape none of whose paths could be set up.
ALL_PATHS = "all paths"
DTYPES = ("bfloat16", "float32")
# --dry-run's grid: two tiny shapes, K under T (the selection runs), two requests.
DRY_RUN_GRID = dict(grid_lengths=[16], grid_candidates=[1, 4], top_k=[4], requests=2,
                    seconds_per_shape=0.0)


class ServingParser(argparse.ArgumentParser):
    """The command line, with the defaults that depend on the device filled in
    and the combinations that cannot run refused (exit status 2)."""

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        gpu_mode = runs_gpu_code(parsed)
        if gpu_mode and parsed.parts is not None and "formats" in parsed.parts:
            self.error("--parts formats: the model formats run on CPU only; with --device cuda "
                       "or --dry-run give --parts grid")
        if parsed.device == "cuda" and not parsed.dry_run and not torch.cuda.is_available():
            self.error("--device cuda: needs a CUDA device (torch.cuda.is_available() is "
                       "False); --dry-run checks its code on CPU")
        if parsed.parts is None:
            parsed.parts = ["grid"] if gpu_mode else list(PARTS)
        if parsed.backends is None:
            parsed.backends = list(BACKENDS) if gpu_mode else ["torch"]
        if parsed.dtypes is None:
            parsed.dtypes = list(DTYPES) if gpu_mode else ["float32"]
        if parsed.dry_run:
            parsed.__dict__.update(DRY_RUN_GRID)
        return parsed


def runs_gpu_code(args) -> bool:
    """Whether the grid runs the --device cuda code (on CPU with --dry-run)."""
    return args.dry_run or args.device == "cuda"


def build_parser() -> argparse.ArgumentParser:
    parser = ServingParser(prog="python -m benchmarks.bench_serving",
                           description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS,
                        help="default: both on CPU, grid with --device cuda or --dry-run")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="grid: where the paths run (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="grid: the --device cuda run's code on CPU, tiny shapes, triton in "
                        "the interpreter (set TRITON_INTERPRET=1): checks the script")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        help="grid: din_fast's backends, each exact and two-stage path on each "
                        "(default: torch on CPU, triton and torch on CUDA)")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES,
                        help="grid: of the query and history (default: float32 on CPU, "
                        "bfloat16 and float32 on CUDA)")
    parser.add_argument("--grid-lengths", type=positive_int, nargs="+",
                        default=[100, 1000, 10_000, 50_000], help="grid: T")
    parser.add_argument("--grid-candidates", type=positive_int, nargs="+", default=[1, 64, 512],
                        help="grid: C")
    parser.add_argument("--seconds-per-shape", type=float, default=20.0,
                        help="grid: about how long each shape's timed requests take")
    parser.add_argument("--requests", type=positive_int, default=50,
                        help="grid: the most requests timed per shape (at least 3)")
    parser.add_argument("--memory-budget-mb", type=positive_int, default=2048,
                        help="grid: a peer whose one request would hold more is left out")
    parser.add_argument("--top-k", type=positive_int, nargs="*", default=[50, 200],
                        help="grid: K of the two-stage paths (none: leave them out)")
    parser.add_argument("--history", type=positive_int, default=1000,
                        help="formats: behaviours per request")
    parser.add_argument("--candidates", type=positive_int, default=512,
                        help="formats: items scored per request")
    parser.add_argument("--items", type=positive_int, default=100_000)
    parser.add_argument("--categories", type=positive_int, default=1000)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    add_run_options(parser, "bench_serving.csv", rounds=50, warmup=5)   # threads: ORT's too
    return parser


@dataclass(frozen=True)
class Grid:
    """Where the grid runs and what it measures against.

    ``ceilings`` are bench_gpu.measure_ceilings' on a GPU (and in a dry run):
    the floor is then max(bytes / copy bandwidth, FLOPs / matmul peak in the
    dtype), computed. On CPU they are None: the floor is a representative
    sgemm doing the same FLOPs, timed beside the paths so that both see the
    machine's load, with what the FLOPs would take at an H100's rate.
    """

    device: torch.device
    ceilings: dict | None
    device_text: str

    @classmethod
    def of(cls, args) -> "Grid":
        if args.dry_run:
            device = torch.device("cpu")
            return cls(device, bench_gpu.measure_ceilings(device, bench_gpu.DRY_RUN_SIZES,
                                                         dtypes_of(args)),
                       harness.device_name(device) + " (dry run: CPU, Triton interpreter)")
        device = torch.device(args.device)
        ceilings = (bench_gpu.measure_ceilings(device, bench_gpu.GPU_SIZES, dtypes_of(args))
                    if device.type == "cuda" else None)
        return cls(device, ceilings, harness.device_name(device))

    def floor_ms(self, inputs: dict, flops: int) -> float:
        """The measured ceilings' floor of one request (GPU)."""
        return 1e3 * bench_gpu.floor_seconds(bench_gpu.min_bytes(inputs, train=False), flops,
                                             self.ceilings["copy_bytes_per_s"],
                                             self.ceilings[inputs["keys"].dtype])


def dtypes_of(args) -> list:
    return [getattr(torch, name) for name in args.dtypes]


def two_stage_options(dim: int, device) -> dict:
    """{path name: din_attention_top_k's stage-one options} of the grid's
    two-stage paths without K: the din and dot searches."""
    gen = torch.Generator().manual_seed(3)
    projections = [(torch.randn(PROJECTION, dim, generator=gen) / dim ** 0.5).to(device)
                   for _ in range(2)]
    return {"din": dict(search="din"), "dot": dict(search="dot", search_params=projections)}


def grid_paths(inputs: dict, args) -> dict:
    """{(path, backend): (a function scoring the request, din_attention_top_k's
    options or {} for exact DIN)} at one grid shape: exact and each two-stage
    path on each of ``--backends`` (the torch backend's with the first K only
    on CUDA), then DeepCTR-Torch's layer (backend "") unless its memory
    estimate exceeds the budget (printed)."""
    paths = {}
    searches = two_stage_options(inputs["keys"].shape[-1], inputs["keys"].device)
    for backend in args.backends:
        def exact(backend=backend):
            with torch.inference_mode():
                return din_fast.din_attention(backend=backend, **inputs)

        paths["exact", backend] = (exact, {})
        top_ks = args.top_k[:1] if backend == "torch" and runs_gpu_code(args) else args.top_k
        for search, options in searches.items():
            for top_k in top_ks:
                def two_stage(backend=backend, options=dict(options, top_k=top_k)):
                    with torch.inference_mode():
                        return din_fast.din_attention_top_k(backend=backend, **inputs, **options)
                paths[f"two_stage_{search}_K{top_k}", backend] = (two_stage,
                                                                  dict(options, top_k=top_k))
    length, candidates = inputs["keys"].shape[1], inputs["query"].shape[1]
    if peers.deepctr_rows_per_call(inputs, args.memory_budget_mb * 2 ** 20) is not None:
        print(f"T={length} C={candidates}: deepctr_torch left out: the history tiled per "
              f"candidate would exceed --memory-budget-mb {args.memory_budget_mb}")
        return paths
    deepctr = peers.deepctr_implementation(inputs)
    if deepctr is not None:
        def tiled():
            with torch.inference_mode():
                return deepctr.forward(inputs)
        paths["deepctr_torch", ""] = (tiled, {})
    return paths


def path_label(row: dict) -> str:
    """A grid row's path with its backend: 'exact (triton)', 'deepctr_torch'."""
    return f"{row['path']} ({row['backend']})" if row["backend"] else row["path"]


def _percentile(values: list, q: int) -> float:
    """The q-th percentile of ``values`` (interpolated; the largest for q = 99
    of fewer than 100 values, nearly)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def first_requests(paths: dict, inputs: dict, args, grid: Grid) -> dict:
    """{(path, backend): the first request's peak memory and error against
    the float64 reference of what the path computes (on up to
    ERROR_CANDIDATES candidates), and the seconds of a second one (warm:
    compilation and caches out, as the timed requests), or the note of why
    it failed}."""
    candidates = inputs["query"].shape[1]
    sample = min(candidates, ERROR_CANDIDATES)
    sampled = dict(inputs, query=inputs["query"][:, :sample])
    max_pairs = args.memory_budget_mb * 2 ** 20 // 4096
    references = {}
    first = {}
    for key, (fn, options) in paths.items():
        reference_key = tuple(sorted((k, str(v)) for k, v in options.items()
                                     if k != "search_params"))
        try:
            if reference_key not in references:
                references[reference_key] = peers.float64_output(sampled, max_pairs, **options)
            exact = references[reference_key]
            peak, out = harness.peak_memory_and_result(fn, grid.device)
            start = time.perf_counter()
            fn()
            harness.synchronize(grid.device)
            seconds = time.perf_counter() - start
        except Exception as exc:  # a path that cannot run here is recorded, not fatal
            first[key] = dict(note=bench_gpu.failure_note(exc))
            release_memory(grid.device)
            continue
        out = out[:, :sample]
        first[key] = dict(seconds=seconds, peak_mb=peak / 2 ** 20,
                          max_abs_error=harness.max_abs_error(out, exact),
                          rel_error=harness.relative_error(out, exact), note="")
    return first


def release_memory(device: torch.device) -> None:
    """After a failure (out of memory, say): the allocator's cache back to the device."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_requests(fns: dict, requests: int, device: torch.device) -> tuple:
    """({key: [ms per request]}, {key: why it has none}): the paths timed
    round-robin; where a timed request fails (out of memory, a kernel error),
    each path again alone, so that a failing path loses only its own times."""
    if not fns:
        return {}, {}
    try:
        return harness.time_round_robin(fns, requests, 0, device, wall_clock=True), {}
    except Exception:  # which path failed, the loop below finds
        release_memory(device)
    times, notes = {}, {}
    for key, fn in fns.items():
        try:
            times.update(harness.time_round_robin({key: fn}, requests, 0, device,
                                                  wall_clock=True))
        except Exception as exc:
            notes[key] = f"timed requests: {bench_gpu.failure_note(exc)}"
            release_memory(device)
    return times, notes


def measure_grid_shape(length: int, candidates: int, dtype: torch.dtype, args,
                       grid: Grid) -> list:
    inputs = peers.make_inputs(1, candidates, length, 64, (80, 40), dtype, grid.device)
    inputs["lengths"].fill_(length)
    inputs["query"] = inputs["query"].reshape(1, candidates, -1)    # C = 1 too: [1, C, D]
    paths = grid_paths(inputs, args)
    first = first_requests(paths, inputs, args, grid)
    fns = {key: fn for key, (fn, _) in paths.items() if "seconds" in first[key]}
    round_seconds = sum(f.get("seconds", 0.0) for f in first.values())
    requests = int(min(args.requests, max(3, args.seconds_per_shape // max(round_seconds, 1e-6))))
    flops = peers.attention_flops(inputs)
    floor_key = (FLOOR, "")
    if grid.ceilings is None:
        gemm, gemm_flops = peers.floor_gemm(grid.device, flops)
        gemm()   # warm, as the paths are
        fns[floor_key] = gemm
    load_before = harness.load_average()
    times, notes = time_requests(fns, requests, grid.device)
    load_after = harness.load_average()
    setting = dict(part="grid", dtype=str(dtype).removeprefix("torch."), length=length,
                   candidates=candidates, requests=requests, flops=flops)
    if grid.ceilings is None:
        floor = [ms * flops / gemm_flops for ms in times.pop(floor_key, [math.nan])]
        setting.update(gemm_gflops=harness.Spread.of([flops / ms / 1e6 for ms in floor]).median,
                       h100_fp32_floor_ms=1e3 * flops / H100_FP32_FLOPS,
                       h100_tf32_floor_ms=1e3 * flops / H100_TF32_FLOPS)
    else:
        floor = [grid.floor_ms(inputs, flops)] * requests
        setting.update(min_bytes=bench_gpu.min_bytes(inputs, train=False), floor_ms=floor[0],
                       copy_gbps=grid.ceilings["copy_bytes_per_s"] / 1e9,
                       peak_tflops=grid.ceilings[dtype] / 1e12)
    setting.update(load_before=load_before, load_after=load_after)
    unmeasured = dict(peak_mb=math.nan, max_abs_error=math.nan, rel_error=math.nan, note="")
    times[floor_key] = floor
    rows, failed = [], []
    for key in [*paths, floor_key]:
        measured = dict(unmeasured, **first.get(key, {}))
        measured.pop("seconds", None)
        measured["note"] = notes.get(key, measured["note"])
        row = dict(path=key[0], backend=key[1])
        if key not in times:   # failed in its first request or in the timed ones
            row.update(p50_ms=math.nan, p99_ms=math.nan, **measured,
                       **harness.Spread.of([]).fields("x_floor"), **setting)
            print(f"T={length} C={candidates} {path_label(row)}: failed: {row['note']}")
            failed.append(row)
            continue
        ms = times[key]
        row.update(p50_ms=statistics.median(ms), p99_ms=_percentile(ms, 99), **measured,
                   **harness.Spread.of(harness.paired_ratios(ms, floor)).fields("x_floor"),
                   **setting)
        if ("deepctr_torch", "") in times:
            row.update(harness.Spread.of(harness.paired_ratios(times["deepctr_torch", ""], ms))
                       .fields("speedup_vs_deepctr_torch"))
        rows.append(row)
    return rows + failed


def grid_order(args) -> list:
    """(dtype, T, C) in the order they are measured: SERVING_TARGET in every
    dtype first (where the grid holds it), then the other shapes dtype by
    dtype (the first given first), so that a run stopped by a time limit has
    what matters most."""
    shapes = [(length, candidates) for length in args.grid_lengths
              for candidates in args.grid_candidates]
    dtypes = dtypes_of(args)
    first = [(dtype, *SERVING_TARGET) for dtype in dtypes if SERVING_TARGET in shapes]
    return first + [(dtype, *shape) for dtype in dtypes for shape in shapes
                    if shape != SERVING_TARGET]


def measure_grid(args, grid: Grid, record) -> list:
    """The grid's rows in grid_order, ``record(rows so far)`` after each
    shape; a shape that cannot be set up (its inputs, out of memory) is one
    row for ALL_PATHS with the reason, and the next shape runs."""
    rows = []
    for dtype, length, candidates in grid_order(args):
        try:
            rows += measure_grid_shape(length, candidates, dtype, args, grid)
        except Exception as exc:  # a shape that cannot run here is recorded, not fatal
            release_memory(grid.device)
            rows.append(dict(path=ALL_PATHS, backend="", p50_ms=math.nan, p99_ms=math.nan,
                             peak_mb=math.nan, max_abs_error=math.nan, rel_error=math.nan,
                             note=bench_gpu.failure_note(exc),
                             **harness.Spread.of([]).fields("x_floor"), part="grid",
                             dtype=str(dtype).removeprefix("torch."), length=length,
                             candidates=candidates, requests=0))
            print(f"T={length} C={candidates} {rows[-1]['dtype']}: failed: {rows[-1]['note']}")
        record(rows)
    return rows


def request(model, history: int, candidates: int) -> EncodedBatch:
    """One request of dense ids: a full history and ``candidates`` items."""
    gen = torch.Generator().manual_seed(0)
    items = model.item_embedding.num_embeddings - 1
    categories = model.category_embedding.num_embeddings - 1
    history_items = torch.randint(1, items + 1, (1, history), generator=gen)
    target_items = torch.randint(1, items + 1, (1, candidates), generator=gen)
    category = torch.randint(1, categories + 1, (items + 1,), generator=gen)
    return EncodedBatch(history_items, category[history_items], torch.tensor([history]),
                        target_items, category[target_items],
                        torch.ones(1, candidates, dtype=torch.bool))


def scorers(model, batch: EncodedBatch, formats, threads: int, directory: str) -> dict:
    """{format: a function scoring ``batch`` -> logits [1, C]}."""
    found = {}
    if "eager" in formats:
        def eager():
            with torch.inference_mode():
                return model(*batch.inputs())
        found["eager"] = eager
    if "pt2" in formats:
        package = export.load(export.export_din(model, os.path.join(directory, "din.pt2")))
        found["pt2"] = lambda: package(*batch.inputs())
    if "onnx" in formats:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        scorer = OnnxModel(onnx_export.export_onnx(model, os.path.join(directory, "din.onnx")),
                           session_options=options)
        inputs = batch.inputs()
        found["onnx"] = lambda: scorer(*inputs)
    return found


def measure_formats(args) -> list:
    torch.manual_seed(0)
    model = din_fast.DIN(args.items, args.categories).eval()
    batch = request(model, args.history, args.candidates)
    with tempfile.TemporaryDirectory() as directory:
        fns = scorers(model, batch, args.formats, args.threads, directory)
        with torch.inference_mode():
            expected = model(*batch.inputs())
        errors = {name: (fn() - expected).abs().max().item() for name, fn in fns.items()}
        load_before = harness.load_average()
        times = harness.time_round_robin(fns, args.rounds, args.warmup, torch.device("cpu"))
        load_after = harness.load_average()
    setting = dict(part="formats", history=args.history, candidates=args.candidates,
                   items=args.items, rounds=args.rounds, load_before=load_before,
                   load_after=load_after)
    base = next(iter(fns))
    return [dict(format=name, max_abs_logit_error=errors[name],
                 **harness.Spread.of(times[name]).fields("ms"),
                 **harness.Spread.of(harness.paired_ratios(times[base], times[name]))
                 .fields(f"speedup_vs_{base}"), baseline=base, **setting)
            for name in fns]


def measure(args, command: str) -> list:
    """The grid's rows, then the formats', each with the run's setting; the
    CSV is written after every grid shape, so that a run stopped by a time
    limit keeps what it measured."""
    grid = Grid.of(args)
    setting = dict(device=grid.device_text, threads=args.threads, torch=torch.__version__,
                   triton=triton.__version__, cpu=harness.cpu_name(),
                   cores=len(os.sched_getaffinity(0)), command=command)

    def with_setting(rows):
        return [dict(row, **setting) for row in rows]

    rows = []
    if "grid" in args.parts:
        rows += measure_grid(args, grid, lambda so_far: harness.write_csv(with_setting(so_far),
                                                                           args.out))
    if "formats" in args.parts:
        rows += measure_formats(args)
    return with_setting(rows)


def ten_ms_reach(rows: list) -> dict:
    """{path label: {C: the largest T whose p50 is at most 10 ms, or None}}
    of the grid's rows in one dtype (a path left out at a shape, or failed
    there, does not reach it)."""
    reach = {}
    for row in rows:
        per_c = reach.setdefault(path_label(row), {})
        per_c.setdefault(row["candidates"], None)
        if row["p50_ms"] <= 10:
            per_c[row["candidates"]] = max(per_c[row["candidates"]] or 0, row["length"])
    return reach


def report_grid(rows: list) -> None:
    for r in rows:
        if r["path"] == ALL_PATHS:
            print(f"{r['dtype']} T={r['length']} C={r['candidates']}: not measured: {r['note']}")
    rows = [r for r in rows if r["path"] != ALL_PATHS]
    if not rows:
        return
    first = rows[0]
    on_gpu = "floor_ms" in first
    if on_gpu:
        floor = (f"floor max(bytes / {first['copy_gbps']:.0f} GB/s copy, FLOPs / the measured "
                 "matmul peak in the dtype)")
    else:
        floor = (f"floor at {first['gemm_gflops']:.1f} GFLOP/s (sgemm "
                 f"{'x'.join(map(str, peers.FLOOR_GEMM))})")
    print(f"the attention layer, one request: D=64, hidden 80x40, sigmoid, every position "
          f"valid; {floor}; load average {first['load_before']:.2f} -> "
          f"{rows[-1]['load_after']:.2f}")
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        chosen = [r for r in rows if r["dtype"] == dtype]
        print(f"\n{dtype}" + (f": matmul peak {chosen[0]['peak_tflops']:.1f} TFLOP/s"
                               if on_gpu else ""))
        print(f"{'T':>7}{'C':>5}{'path':>20}{'backend':>8}{'requests':>9}{'p50 ms':>10}"
              f"{'p99 ms':>10}{'x floor':>11}{'vs deepctr':>11}{'peak MB':>10}{'rel err':>9}"
              f"{'floor ms' if on_gpu else 'H100 floor ms':>15}")
        for r in chosen:
            versus = r.get("speedup_vs_deepctr_torch")
            versus = "-" if versus is None or r["path"] == FLOOR or math.isnan(versus) \
                else f"{versus:.2f}x"
            floor_ms = f"{r['floor_ms'] if on_gpu else r['h100_fp32_floor_ms']:.4g}" \
                if r["path"] == FLOOR else ""
            peak = "-" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.1f}"
            error = "-" if math.isnan(r["rel_error"]) else f"{r['rel_error']:.1e}"
            print(f"{r['length']:>7}{r['candidates']:>5}{r['path']:>20}{r['backend'] or '-':>8}"
                  f"{r['requests']:>9}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}"
                  f"{r['x_floor']:>10.2f}x{versus:>11}{peak:>10}{error:>9}"
                  f"{floor_ms:>15}  {r['note']}".rstrip())
        print("the longest history whose p50 is within the DIN paper's 10 ms per request:")
        for path, reach in ten_ms_reach(chosen).items():
            print(f"  {path}: " + ", ".join(f"C={c}: " + ("none" if t is None else f"T={t}")
                                            for c, t in reach.items()))
    print("(x floor: each path's time over the floor's, per request; vs deepctr: "
          "DeepCTR-Torch's time over each one's; "
          + ("floor ms: the floor from the device's measured copy bandwidth and matmul peak)"
             if on_gpu else "H100 floor: the same FLOPs at an H100's FP32 rate of "
             f"{H100_FP32_FLOPS / 1e12:.0f} TFLOP/s, an estimate)"))


def report_formats(rows: list) -> None:
    first = rows[0]
    print(f"the whole model, one request: history {first['history']}, {first['candidates']} "
          f"candidates, DIN (default recipe) over {first['items']} items; {first['rounds']} "
          f"rounds; load average {first['load_before']:.2f} -> {first['load_after']:.2f}")
    speedup = f"speedup_vs_{first['baseline']}"
    print(f"{'format':<8}{'ms per request: median (IQR)':>30}{'speedup (IQR)':>22}"
          f"{'max |logit error|':>19}")
    for r in rows:
        print(f"{r['format']:<8}{harness.Spread.from_fields(r, 'ms').text('.2f'):>30}"
              f"{harness.Spread.from_fields(r, speedup).text('.2f', 'x'):>22}"
              f"{r['max_abs_logit_error']:>19.1e}")
    print(f"(speedup: {first['baseline']}'s time over each one's, the median of the per-round "
          "ratios; error against eager)")


def report(rows: list) -> None:
    first = rows[0]
    print(f"{first['device']}; host {first['cpu']}, {first['threads']} thread(s) of "
          f"{first['cores']} cores, torch {first['torch']}, triton {first['triton']}")
    for part, show in (("grid", report_grid), ("formats", report_formats)):
        chosen = [r for r in rows if r["part"] == part]
        if chosen:
            print()
            show(chosen)


def main(argv=None) -> int:
    return harness.run_cpu_benchmark("bench_serving", build_parser, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
