"""Serving latency per request: the eager model, its AOTInductor package and
its ONNX model on ONNX Runtime, on CPU.

One request is one user's history (``--history`` behaviours) and
``--candidates`` items to score, as a recommender's ranking stage sends it.
The model is din_fast.DIN with the default recipe (Dice attention 80-40 with
a softmax, Dice MLP 200-80, 32 per embedding table) over ``--items`` items,
random weights in eval mode (latency does not depend on what was learned).
Each format scores the request the way it serves it:

- eager: ``model(...)`` under ``torch.inference_mode``, [1, C] targets (the
  history pooled once for all candidates);
- AOTInductor: the ``.pt2`` package of ``din_fast.export.export_din``, one
  candidate per row (C rows, each with the history: ``EncodedBatch.rows()``);
- ONNX Runtime: ``din_fast.serving.OnnxModel`` (its input checks included),
  [1, C] targets, ``--threads`` intra-op threads.

All are timed round-robin (benchmarks.harness), one torch thread by default;
each logit is compared with eager's. Exporting the package compiles C++ (about
a minute on a small CPU); ``--formats eager onnx`` leaves it out.

    python -m benchmarks.bench_serving [--history 50] [--candidates 100] [--out FILE.csv]

Writes a CSV (default benchmarks/results/bench_serving.csv).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

import din_fast
from din_fast import export, onnx_export
from din_fast.serving import EncodedBatch, OnnxModel

from . import harness
from .bench_cpu import add_run_options, positive_int

FORMATS = ("eager", "pt2", "onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serving",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=positive_int, default=50, help="behaviours per request")
    parser.add_argument("--candidates", type=positive_int, default=100,
                        help="items scored per request")
    parser.add_argument("--items", type=positive_int, default=100_000)
    parser.add_argument("--categories", type=positive_int, default=1000)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    add_run_options(parser, "bench_serving.csv", rounds=50, warmup=5)   # threads: ORT's too
    return parser


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


def measure(args, command: str) -> list:
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
    setting = dict(history=args.history, candidates=args.candidates, items=args.items,
                   threads=args.threads, rounds=args.rounds, torch=torch.__version__,
                   cpu=harness.cpu_name(), cores=len(os.sched_getaffinity(0)),
                   load_before=load_before, load_after=load_after, command=command)
    base = next(iter(fns))
    return [dict(format=name, max_abs_logit_error=errors[name],
                 **harness.Spread.of(times[name]).fields("ms"),
                 **harness.Spread.of(harness.paired_ratios(times[base], times[name]))
                 .fields(f"speedup_vs_{base}"), baseline=base, **setting)
            for name in fns]


def report(rows: list) -> None:
    first = rows[0]
    print(f"one request: history {first['history']}, {first['candidates']} candidates, DIN "
          f"(default recipe) over {first['items']} items")
    print(f"{first['cpu']}, {first['threads']} thread(s) of {first['cores']} cores, torch "
          f"{first['torch']}; {first['rounds']} rounds; load average "
          f"{first['load_before']:.2f} -> {first['load_after']:.2f}")
    speedup = f"speedup_vs_{first['baseline']}"
    print(f"{'format':<8}{'ms per request: median (IQR)':>30}{'speedup (IQR)':>22}"
          f"{'max |logit error|':>19}")
    for r in rows:
        print(f"{r['format']:<8}{harness.Spread.from_fields(r, 'ms').text('.2f'):>30}"
              f"{harness.Spread.from_fields(r, speedup).text('.2f', 'x'):>22}"
              f"{r['max_abs_logit_error']:>19.1e}")
    print(f"(speedup: {first['baseline']}'s time over each one's, the median of the per-round "
          "ratios; error against eager)")


def main(argv=None) -> int:
    return harness.run_cpu_benchmark("bench_serving", build_parser, measure, report, argv)


if __name__ == "__main__":
    sys.exit(main())
