"""Quality of the two stages: exact DIN over the whole history, DIN over the
last K behaviours, and the two-stage DIN (top K) for each stage-one scorer.

Every run is ``din-fast train`` with the default recipe on one dataset with
one seed; only the history options differ between the models:

- ``full``: exact DIN over the whole history (``--max-len`` set to the
  dataset's longest history, measured from its samples);
- ``last``: exact DIN over the K most recent behaviours (``--max-len K``);
- ``top-din``, ``top-dot``, ``top-category``: the two-stage DIN over the
  whole history (``--max-len`` as for ``full``), stage two attending over the
  K behaviours that stage one ranks highest (``--top-k K --search ...``).

The truncated and the two-stage models both attend over K behaviours: the
question is whether a search over the whole history picks better ones than
recency alone.

    python -m benchmarks.two_stage_quality [--data-dir DIR]
        [--datasets amazon-beauty amazon-sports] [--seeds 0 1 2] [--top-k 10]
        [--models full last top-din top-dot top-category] [--jobs 2] [--nice 5]

Each run is a ``python -m din_fast train ... --no-progress --threads 1``
subprocess under ``nice``, ``--jobs`` of them at a time. A finished run leaves
its record, ``<results>/<dataset>/<model>_seed<S>.json`` (the command, the
commit it ran on and its metrics), and its log beside it; a run whose record
exists is not run again, so an interrupted benchmark resumes where it
stopped. Then it writes one row per run to ``<results>.csv`` and the mean and
standard deviation per (dataset, model) to ``<results>_summary.csv``, and
prints both with the per-seed comparison of each two-stage model against the
truncated one. Skips, with a message, when the data directory is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from din_fast.ctr.files import write_json
from din_fast.ctr.training import load_data

from .bench_cpu import positive_int
from .harness import add_amazon_data_options, write_csv

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("full", "last", "top-din", "top-dot", "top-category")
TRUNCATED = "last"
METRICS = ("test_gauc", "test_auc", "test_logloss", "validation_gauc", "validation_auc",
           "validation_logloss", "best_epoch", "epochs_run", "train_seconds")
SUMMARY_METRICS = ("test_gauc", "test_auc", "test_logloss", "validation_gauc", "epochs_run",
                   "train_seconds")


@dataclass(frozen=True)
class Run:
    dataset: str
    model: str
    seed: int
    top_k: int
    longest: int     # the dataset's longest history

    @property
    def max_len(self) -> int:
        return self.top_k if self.model == TRUNCATED else self.longest

    @property
    def search(self) -> str:
        return self.model.removeprefix("top-") if self.model.startswith("top-") else ""

    @property
    def name(self) -> str:
        """The model with its K: ``full``, ``last10``, ``top10-dot``."""
        return self.model if self.model == "full" else self.model.replace(
            TRUNCATED, f"{TRUNCATED}{self.top_k}").replace("top-", f"top{self.top_k}-")

    def history_args(self) -> list:
        """The `din-fast train` options that make this model."""
        args = ["--max-len", str(self.max_len)]
        return args + (["--top-k", str(self.top_k), "--search", self.search] if self.search
                       else [])

    def record(self, results: Path) -> Path:
        return results / self.dataset / f"{self.name}_seed{self.seed}.json"


def longest_history(data_dir: Path) -> int:
    """The longest history among the dataset's samples (seed-independent:
    only the negatives depend on the seed)."""
    _, splits = load_data(str(data_dir), seed=0)
    return int(max(samples.history_length.max(initial=0)
                   for samples in (splits.train, splits.validation, splits.test)))


def code_commit() -> str:
    """HEAD's commit, marked ``+dirty`` when the package or its kernels differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout
    commit = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    dirty = git("status", "--porcelain", "--", "din_fast", "kernels").strip()
    return commit + ("+dirty" if dirty else "")


def execute(run: Run, data_dir: Path, results: Path, extra: list, niceness: int,
            commit: str) -> str:
    """Train one run and write its record; returns a line saying how it went."""
    record = run.record(results)
    log = record.with_suffix(".log")
    # The metrics go to a scratch file: the record appears only once the run
    # has finished, so a run interrupted half-way is run again on resuming.
    with tempfile.TemporaryDirectory(dir=record.parent) as scratch:
        metrics_out = Path(scratch) / "metrics.json"
        args = ["train", "--data", str(data_dir / run.dataset), *run.history_args(),
                "--seed", str(run.seed), *extra]
        with open(log, "w") as handle:
            status = subprocess.run(
                [sys.executable, "-m", "din_fast", *args, "--metrics-out", str(metrics_out),
                 "--no-progress", "--threads", "1"],
                cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.nice(niceness)).returncode
        if status != 0:
            return f"FAILED (exit {status}): {run.dataset} {run.name} seed {run.seed}: see {log}"
        metrics = json.loads(metrics_out.read_text())
    write_json(record, dict(dataset=run.dataset, model=run.name, seed=run.seed,
                            max_len=run.max_len, top_k=run.top_k if run.search else "",
                            search=run.search, commit=commit,
                            command="din-fast " + shlex.join(args),
                            **{key: metrics[key] for key in METRICS}), "record")
    return (f"done: {run.dataset} {run.name} seed {run.seed}: test GAUC "
            f"{metrics['test_gauc']:.4f}, {metrics['best_epoch']}/{metrics['epochs_run']} "
            f"epochs, {metrics['train_seconds']:.0f} s")


def mean_sd(values: list) -> tuple:
    return (statistics.fmean(values),
            statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(rows: list) -> list:
    """Mean and standard deviation of each metric per (dataset, model)."""
    groups = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["model"]), []).append(row)
    summary = []
    for (dataset, model), group in groups.items():
        entry = dict(dataset=dataset, model=model, runs=len(group))
        for key in SUMMARY_METRICS:
            entry[f"{key}_mean"], entry[f"{key}_sd"] = mean_sd([r[key] for r in group])
        summary.append(entry)
    return summary


def comparisons(rows: list, truncated: str) -> list:
    """Each two-stage model's test and validation GAUC minus the truncated
    model's, seed by seed, per dataset."""
    by_key = {(r["dataset"], r["model"], r["seed"]): r for r in rows}
    found = []
    for row in rows:
        base = by_key.get((row["dataset"], truncated, row["seed"]))
        if row["search"] and base is not None:
            found.append(dict(dataset=row["dataset"], model=row["model"], seed=row["seed"],
                              test_gauc_gain=row["test_gauc"] - base["test_gauc"],
                              validation_gauc_gain=row["validation_gauc"]
                              - base["validation_gauc"]))
    return found


def report(rows: list, summary: list, truncated: str) -> None:
    print("\n| data | model | runs | test GAUC | test AUC | test logloss | validation GAUC "
          "| epochs run | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['dataset']} | {s['model']} | {s['runs']} "
              f"| {s['test_gauc_mean']:.4f} ± {s['test_gauc_sd']:.4f} "
              f"| {s['test_auc_mean']:.4f} ± {s['test_auc_sd']:.4f} "
              f"| {s['test_logloss_mean']:.4f} | {s['validation_gauc_mean']:.4f} "
              f"| {s['epochs_run_mean']:.1f} | {s['train_seconds_mean']:.0f} |")
    gains = comparisons(rows, truncated)
    if not gains:
        return
    print(f"\nTwo-stage minus {truncated}, seed by seed (GAUC):\n")
    print("| data | model | seed | test | validation |")
    print("|---|---|---|---|---|")
    for g in gains:
        print(f"| {g['dataset']} | {g['model']} | {g['seed']} | {g['test_gauc_gain']:+.4f} "
              f"| {g['validation_gauc_gain']:+.4f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_amazon_data_options(parser)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--top-k", type=positive_int, default=10,
                        help="K of the truncated and of the two-stage models")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="the most epochs per run (default: the recipe's)")
    parser.add_argument("--jobs", type=positive_int, default=2, help="runs at a time")
    parser.add_argument("--nice", type=int, default=5, help="niceness of each run")
    parser.add_argument("--results", type=Path,
                        default=ROOT / "benchmarks" / "results" / "two_stage_quality",
                        help="the runs' records go in this folder; the tables beside it "
                        "(RESULTS.csv, RESULTS_summary.csv)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: tabulate the runs already recorded (of the "
                        "datasets, seeds and models asked for)")
    args = parser.parse_args(argv)
    missing = [d for d in args.datasets if not (args.data_dir / d).is_dir()]
    if missing:
        print(f"skipped: no data at {args.data_dir} for {missing} (pass --data-dir)")
        return 0
    runs = []
    for dataset in args.datasets:
        longest = longest_history(args.data_dir / dataset)
        print(f"{dataset}: longest history {longest}")
        (args.results / dataset).mkdir(parents=True, exist_ok=True)
        runs += [Run(dataset, model, seed, args.top_k, longest)
                 for seed in args.seeds for model in args.models]
    # Seed by seed, so that a partial table already compares every model.
    runs.sort(key=lambda run: (run.seed, run.dataset))
    pending = [] if args.report_only else [run for run in runs
                                           if not run.record(args.results).exists()]
    recorded = sum(run.record(args.results).exists() for run in runs)
    print(f"{recorded} of {len(runs)} runs recorded; running {len(pending)}, "
          f"{args.jobs} at a time", flush=True)
    extra = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    commit = code_commit()
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda run: execute(run, args.data_dir, args.results, extra,
                                                 args.nice, commit), pending):
            print(line, flush=True)
    rows = [json.loads(run.record(args.results).read_text())
            for run in runs if run.record(args.results).exists()]
    if not rows:
        print("no run finished")
        return 1
    summary = summarize(rows)
    table = args.results.with_suffix(".csv")
    write_csv(rows, str(table), "--results")
    write_csv(summary, str(table.with_name(f"{table.stem}_summary.csv")), "--results")
    report(rows, summary, f"{TRUNCATED}{args.top_k}")
    print(f"\nwritten: {table} and {table.stem}_summary.csv beside it")
    if len(rows) < len(runs):
        print(f"{len(runs) - len(rows)} of {len(runs)} runs not recorded yet")
    return 0 if len(rows) == len(runs) or args.report_only else 1


if __name__ == "__main__":
    sys.exit(main())
