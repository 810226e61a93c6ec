"""Serving latency per request on CPU: the attention layer over long histories and many candidates, and the whole model in each serving format.

One request is one user: a history of T behaviours and C candidate items to
score, as a recommender's ranking stage sends it. Two parts, in one run:

``grid`` (the attention layer, the DIN paper's "hundreds of ads for each
visitor in less than 10 ms"): for T in ``--grid-lengths`` x C in
``--grid-candidates``, D=64, hidden (80, 40), sigmoid, float32, every
position valid, each path scores the request:

- ``exact``: din_fast.din_attention (backend="torch"), the [1, C, D] query
  against the history once, in bounded memory;
- ``two_stage_<search>_K<K>``: din_fast.din_attention_top_k (backend="torch")
  with K in ``--top-k`` (50, 200): stage one scores every position with the
  ``din`` scorer (the exact DIN score: as costly as ``exact`` on CPU) or the
  ``dot`` scorer (the inner product of 16-wide projections, random here) and
  keeps the K best per candidate, stage two attends over those K only;
- ``deepctr_torch``: DeepCTR-Torch's AttentionSequencePoolingLayer with the
  history tiled per candidate (C rows), left out where its memory estimate
  exceeds ``--memory-budget-mb`` (the reason is printed);
- ``flop_floor``: the activation unit's matrix-product FLOPs at this
  machine's rate for a representative sgemm, timed in every round, and
  what the same FLOPs would take at an H100's rate (the spec sheet's, an
  estimate, not a measurement).

Per path: the latency's median (p50) and 99th percentile (p99) over the
requests, timed round-robin with the other paths (fewer requests at the
large shapes: ``--seconds-per-shape``), the peak memory of one request, and
the error against the float64 reference (computed in chunks of candidates,
on up to 16 of them).

``formats`` (the whole model): din_fast.DIN with the default recipe (Dice
attention 80-40 with a softmax, Dice MLP 200-80, 32 per embedding table)
over ``--items`` items, random weights in eval mode (latency does not depend
on what was learned), one request of ``--history`` behaviours and
``--candidates`` candidates in each serving format:

- eager: ``model(...)`` under ``torch.inference_mode``, [1, C] targets (the
  history pooled once for all candidates);
- AOTInductor: the ``.pt2`` package of ``din_fast.export.export_din``, one
  candidate per row (C rows, each with the history: ``EncodedBatch.rows()``);
- ONNX Runtime: ``din_fast.serving.OnnxModel`` (its input checks included),
  [1, C] targets, ``--threads`` intra-op threads.

Each logit is compared with eager's. Exporting the package compiles C++
(about a minute on a small CPU); ``--formats eager onnx`` leaves it out.
All is timed with benchmarks.harness, one torch thread by default.

    python -m benchmarks.bench_serving [--parts grid formats] [--history 1000]
                                       [--candidates 512] [--out FILE.csv]

Writes a CSV (default benchmarks/results/bench_serving.csv), one row per
path and shape, then per format.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import torch

import din_fast
from din_fast import export, onnx_export
from din_fast.serving import EncodedBatch, OnnxModel

from . import harness, peers
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
SEARCHES = ("din", "dot")
PROJECTION = 16   # the dot search's projection width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
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


def two_stage_options(dim: int) -> dict:
    """{path name: din_attention_top_k's stage-one options} of the grid's
    two-stage paths without K: the din and dot searches."""
    gen = torch.Generator().manual_seed(3)
    projections = [torch.randn(PROJECTION, dim, generator=gen) / dim ** 0.5 for _ in range(2)]
    return {"din": dict(search="din"), "dot": dict(search="dot", search_params=projections)}


def grid_paths(inputs: dict, args) -> dict:
    """{path: (a function scoring the request, din_attention_top_k's options
    or {} for exact DIN)} at one grid shape, the peers whose memory estimate
    exceeds the budget left out (printed)."""
    def exact():
        with torch.inference_mode():
            return din_fast.din_attention(backend="torch", **inputs)

    paths = {"exact": (exact, {})}
    for search, options in two_stage_options(inputs["keys"].shape[-1]).items():
        for top_k in args.top_k:
            def two_stage(options=dict(options, top_k=top_k)):
                with torch.inference_mode():
                    return din_fast.din_attention_top_k(backend="torch", **inputs, **options)
            paths[f"two_stage_{search}_K{top_k}"] = (two_stage, dict(options, top_k=top_k))
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
        paths["deepctr_torch"] = (tiled, {})
    return paths


def _percentile(values: list, q: int) -> float:
    """The q-th percentile of ``values`` (interpolated; the largest for q = 99
    of fewer than 100 values, nearly)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure_grid_shape(length: int, candidates: int, args) -> list:
    inputs = peers.make_inputs(1, candidates, length, 64, (80, 40), torch.float32,
                               torch.device("cpu"))
    inputs["lengths"].fill_(length)
    inputs["query"] = inputs["query"].reshape(1, candidates, -1)    # C = 1 too: [1, C, D]
    paths = grid_paths(inputs, args)
    sample = min(candidates, ERROR_CANDIDATES)
    sampled = dict(inputs, query=inputs["query"][:, :sample])
    max_pairs = args.memory_budget_mb * 2 ** 20 // 4096
    references = {}
    first = {}
    for name, (fn, options) in paths.items():
        key = tuple(sorted((k, str(v)) for k, v in options.items() if k != "search_params"))
        if key not in references:   # the float64 reference of what the path computes
            references[key] = peers.float64_output(sampled, max_pairs, **options)
        exact = references[key]
        start = time.perf_counter()
        peak, out = harness.peak_memory_and_result(fn, torch.device("cpu"))
        out = out[:, :sample]
        first[name] = dict(seconds=time.perf_counter() - start, peak_mb=peak / 2 ** 20,
                           max_abs_error=harness.max_abs_error(out, exact),
                           rel_error=harness.relative_error(out, exact))
    round_seconds = sum(f["seconds"] for f in first.values())
    requests = int(min(args.requests, max(3, args.seconds_per_shape // max(round_seconds, 1e-6))))
    flops = peers.attention_flops(inputs)
    gemm, gemm_flops = peers.floor_gemm(torch.device("cpu"), flops)
    load_before = harness.load_average()
    times = harness.time_round_robin(dict({name: fn for name, (fn, _) in paths.items()},
                                          **{FLOOR: gemm}), requests, 1, torch.device("cpu"))
    load_after = harness.load_average()
    floor = [ms * flops / gemm_flops for ms in times.pop(FLOOR)]
    setting = dict(part="grid", length=length, candidates=candidates, requests=requests,
                   flops=flops, gemm_gflops=harness.Spread.of(
                       [flops / ms / 1e6 for ms in floor]).median,
                   h100_fp32_floor_ms=1e3 * flops / H100_FP32_FLOPS,
                   h100_tf32_floor_ms=1e3 * flops / H100_TF32_FLOPS,
                   load_before=load_before, load_after=load_after)
    rows = []
    for name, ms in dict(times, **{FLOOR: floor}).items():
        measured = first.get(name, dict(peak_mb=math.nan, max_abs_error=math.nan,
                                        rel_error=math.nan))
        measured.pop("seconds", None)
        row = dict(path=name, p50_ms=statistics.median(ms), p99_ms=_percentile(ms, 99),
                   **measured, **harness.Spread.of(harness.paired_ratios(ms, floor))
                   .fields("x_floor"), **setting)
        if "deepctr_torch" in times:
            row.update(harness.Spread.of(harness.paired_ratios(times["deepctr_torch"], ms))
                       .fields("speedup_vs_deepctr_torch"))
        rows.append(row)
    return rows


def measure_grid(args) -> list:
    return [row for length in args.grid_lengths for candidates in args.grid_candidates
            for row in measure_grid_shape(length, candidates, args)]


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
        rows = batch.rows()
        found["pt2"] = lambda: package(*rows).view(batch.shape)
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
    """The grid's rows, then the formats', each with the run's setting."""
    setting = dict(threads=args.threads, torch=torch.__version__, cpu=harness.cpu_name(),
                   cores=len(os.sched_getaffinity(0)), command=command)
    rows = []
    if "grid" in args.parts:
        rows += measure_grid(args)
    if "formats" in args.parts:
        rows += measure_formats(args)
    return [dict(row, **setting) for row in rows]


def ten_ms_reach(rows: list) -> dict:
    """{path: {C: the largest T whose p50 is at most 10 ms, or None}} of the
    grid's rows (a path left out at a shape does not reach it)."""
    reach = {}
    for row in rows:
        per_c = reach.setdefault(row["path"], {})
        per_c.setdefault(row["candidates"], None)
        if row["p50_ms"] <= 10:
            per_c[row["candidates"]] = max(per_c[row["candidates"]] or 0, row["length"])
    return reach


def report_grid(rows: list) -> None:
    first = rows[0]
    print(f"the attention layer, one request: D=64, hidden 80x40, sigmoid, float32, every "
          f"position valid; floor at {first['gemm_gflops']:.1f} GFLOP/s (sgemm "
          f"{'x'.join(map(str, peers.FLOOR_GEMM))}); load average {first['load_before']:.2f} "
          f"-> {rows[-1]['load_after']:.2f}")
    print(f"{'T':>7}{'C':>5}{'path':>20}{'requests':>9}{'p50 ms':>10}{'p99 ms':>10}"
          f"{'x floor':>9}{'vs deepctr':>11}{'peak MB':>10}{'rel err':>9}{'H100 floor ms':>15}")
    for r in rows:
        versus = r.get("speedup_vs_deepctr_torch")
        versus = "-" if versus is None or r["path"] == FLOOR or math.isnan(versus) \
            else f"{versus:.2f}x"
        h100 = f"{r['h100_fp32_floor_ms']:.3f}" if r["path"] == FLOOR else ""
        peak = "-" if math.isnan(r["peak_mb"]) else f"{r['peak_mb']:.1f}"
        error = "-" if math.isnan(r["rel_error"]) else f"{r['rel_error']:.1e}"
        print(f"{r['length']:>7}{r['candidates']:>5}{r['path']:>20}{r['requests']:>9}"
              f"{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['x_floor']:>8.2f}x{versus:>11}"
              f"{peak:>10}{error:>9}{h100:>15}")
    print("the longest history whose p50 is within the DIN paper's 10 ms per request:")
    for path, reach in ten_ms_reach(rows).items():
        print(f"  {path}: " + ", ".join(f"C={c}: " + ("none" if t is None else f"T={t}")
                                        for c, t in reach.items()))
    print("(x floor: each path's time over the FLOP floor's, per request; vs deepctr: "
          "DeepCTR-Torch's time over each one's; H100 floor: the same FLOPs at an H100's "
          f"FP32 rate of {H100_FP32_FLOPS / 1e12:.0f} TFLOP/s, an estimate)")


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
    print(f"{first['cpu']}, {first['threads']} thread(s) of {first['cores']} cores, torch "
          f"{first['torch']}")
    for part, show in (("grid", report_grid), ("formats", report_formats)):
        chosen = [r for r in rows if r["part"] == part]
        if chosen:
            print()
            show(chosen)


def main(argv=None) -> int:
    return harness.run_cpu_benchmark("bench_serving", build_parser, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
