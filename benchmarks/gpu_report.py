"""The report of a GPU benchmark run: a markdown summary and a plot from the benchmarks' CSVs.

Reads bench_gpu_forward_<label>.csv, bench_gpu_train_<label>.csv and
bench_serving_<label>.csv (any may be missing: a step that failed is
reported as missing; a row without the columns that say what it measured is
left out and one without some figures shows them as "-", each with a note)
from --results and writes gpu_summary_<label>.md
(printed too; the tables paste into docs/guides/benchmarks.md) and
bench_gpu_<label>.png (bench_gpu's time against T, one panel per pass, dtype
and C).

    python -m benchmarks.gpu_report --label NVIDIA-H200 [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

from din_fast.ctr.files import open_replacing

from . import harness
from .bench_serving import FLOOR, SERVING_TARGET, path_label

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PASSES = ("forward", "train")
PEERS = ("reference", "reference_compiled", "torch", "deepctr_torch")
# Issue 14's targets at the headline shape in bfloat16: (pass, peer, least speedup).
SPEEDUP_TARGETS = (("forward", "reference", 10.0), ("forward", "reference_compiled", 3.0),
                   ("train", "reference", 5.0), ("train", "reference_compiled", 2.0))
FLOOR_TARGET = ("forward", 3.0)          # triton within 3x of the floor
MEMORY_TARGET = ("train", "reference", 0.25)   # triton's peak over eager's at most this
# Issue 24's serving target: one user, (T, C) = SERVING_TARGET, p50 under this many ms.
SERVING_MS = 10.0
# The columns that say what a row measured (a row without one is left out),
# and those that are text; every other column is a figure (NaN where missing).
IDENTITY = {"gpu": ("pass", "dtype", "impl", "batch", "candidates", "length"),
            "serving": ("dtype", "path", "length", "candidates")}
TEXT = {"pass", "dtype", "impl", "path", "backend", "note", "part", "hidden", "device", "torch",
        "triton", "cpu", "command"}


def number(value, fmt: str) -> str:
    return f"{value:{fmt}}" if is_figure(value) else "-"


def is_figure(value) -> bool:
    """A number that was measured: not NaN, not a missing cell."""
    return isinstance(value, (int, float)) and not math.isnan(value)


def verdict(value: float, met: bool) -> str:
    return "met" if met else "NOT met" if is_figure(value) else "not measured"


def headline_table(rows: list) -> list:
    lines = ["| pass | dtype | implementation | ms: median (IQR) | triton speedup | peak MiB | "
             "memory / triton's | error vs float64 (output / gradients) | GB/s (% of copy) | "
             "TFLOP/s (% of peak) | x floor |",
             "|" + "---|" * 11]
    for row in rows:
        triton = next((r for r in rows if r["impl"] == "triton" and r["pass"] == row["pass"]
                       and r["dtype"] == row["dtype"]), {"peak_mib": math.nan})
        ms = harness.Spread.from_fields(row, "ms")
        lines.append(
            f"| {row['pass']} | {row['dtype']} | {row['impl']} | "
            f"{ms.text('.3f') if is_figure(ms.median) else '-'} | "
            f"{number(row['triton_speedup'], '.2f')}x | {number(row['peak_mib'], '.1f')} | "
            f"{number(row['peak_mib'] / triton['peak_mib'], '.2f')} | "
            f"{number(row['max_abs_error'], '.1e')} / {number(row['grad_error'], '.1e')} | "
            f"{number(row['gbps'], '.0f')} ({number(100 * row['copy_fraction'], '.0f')}%) | "
            f"{number(row['tflops'], '.1f')} ({number(100 * row['peak_fraction'], '.0f')}%) | "
            f"{number(row['over_floor'], '.1f')} |")
    return lines


def sweep_table(rows: list) -> list:
    peers = [p for p in PEERS if any(r["impl"] == p for r in rows)]
    lines = ["| pass | dtype | C | T | B | triton ms | "
             + " | ".join(f"x vs {p}" for p in peers) + " | triton % of copy | x floor |",
             "|" + "---|" * (8 + len(peers))]
    shapes = dict.fromkeys((r["pass"], r["dtype"], r["candidates"], r["length"], r["batch"])
                           for r in grouped(rows, "pass", "dtype"))
    for shape in shapes:
        at = {r["impl"]: r for r in rows
              if (r["pass"], r["dtype"], r["candidates"], r["length"], r["batch"]) == shape}
        triton = at.get("triton")
        if triton is None:
            continue
        speedups = [number(at[p]["triton_speedup"], ".2f") if p in at else "-" for p in peers]
        lines.append("| " + " | ".join(map(str, shape)) + f" | {number(triton['ms'], '.3f')} | "
                     + " | ".join(speedups)
                     + f" | {number(100 * triton['copy_fraction'], '.0f')}% | "
                     f"{number(triton['over_floor'], '.1f')} |")
    return lines


def target_lines(headline: list) -> list:
    """Issue 14's targets, met or not, at the headline shape in bfloat16."""
    bf16 = {(r["pass"], r["impl"]): r for r in headline if r["dtype"] == "bfloat16"}
    lines = []
    for pass_, peer, least in SPEEDUP_TARGETS:
        if (pass_, peer) in bf16:
            value = bf16[pass_, peer]["triton_speedup"]
            lines.append(f"- {pass_}: triton {number(value, '.1f')}x faster than {peer} "
                         f"(target >= {least:g}x): {verdict(value, value >= least)}")
    pass_, most = FLOOR_TARGET
    if (pass_, "triton") in bf16:
        value = bf16[pass_, "triton"]["over_floor"]
        lines.append(f"- {pass_}: triton at {number(value, '.1f')}x the bandwidth/FLOP floor "
                     f"(target <= {most:g}x): {verdict(value, value <= most)}")
    pass_, peer, most = MEMORY_TARGET
    if (pass_, "triton") in bf16 and (pass_, peer) in bf16:
        value = bf16[pass_, "triton"]["peak_mib"] / bf16[pass_, peer]["peak_mib"]
        lines.append(f"- {pass_}: triton's peak memory {number(value, '.2f')} of {peer}'s "
                     f"(target <= {most:g}): {verdict(value, value <= most)}")
    return lines


def serving_table(rows: list) -> list:
    lines = ["| dtype | T | C | path | requests | p50 ms | p99 ms | x floor | vs DeepCTR-Torch | "
             "peak MB | rel. error | note |",
             "|" + "---|" * 12]
    for row in grouped(rows, "dtype"):
        floor = row["path"] == FLOOR
        versus = row.get("speedup_vs_deepctr_torch", math.nan)
        lines.append(
            f"| {row['dtype']} | {row['length']} | {row['candidates']} | {path_label(row)} | "
            f"{number(row['requests'], '.0f')} | {number(row['p50_ms'], '.3f')} | "
            f"{number(row['p99_ms'], '.3f')} | "
            f"{number(row['x_floor'], '.1f')} | {'-' if floor else number(versus, '.2f')} | "
            f"{number(row['peak_mb'], '.1f')} | {number(row['rel_error'], '.1e')} | "
            f"{row['note']} |")
    return lines


def serving_target_lines(rows: list) -> list:
    """Issue 24's serving target, per dtype: each path's p50 at SERVING_TARGET."""
    length, candidates = SERVING_TARGET
    at = [r for r in rows if (r["length"], r["candidates"]) == SERVING_TARGET
          and r["path"] != FLOOR]
    if not at:
        return [f"- T={length:,}, C={candidates}: not measured"]
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in at):
        paths = [f"{path_label(r)} {number(r['p50_ms'], '.2f')} ms "
                 f"({verdict(r['p50_ms'], r['p50_ms'] < SERVING_MS)})"
                 for r in at if r["dtype"] == dtype]
        lines.append(f"- {dtype}, T={length:,}, C={candidates}, p50 under {SERVING_MS:g} ms: "
                     + "; ".join(paths))
    return lines


def serving_summary(rows: list) -> list:
    # A shape that failed as a whole has no ceilings: the first row that has.
    copy_gbps = next((r["copy_gbps"] for r in rows if is_figure(r.get("copy_gbps"))), math.nan)
    return [
        "### Serving: one request (B=1), D=64, hidden 80x40, sigmoid, every position valid", "",
        f"p50 / p99 over the requests, each from a synchronized start to its last kernel done "
        f"(host work and launches included); x floor = the time over max(bytes / "
        f"{number(copy_gbps, '.0f')} GB/s copy, FLOPs / the matmul peak in the dtype) (the "
        f"flop_floor row's times are that floor); vs DeepCTR-Torch = its time over the path's; "
        f"peak = the allocator's peak of one request; error on up to 16 candidates against "
        f"float64 (a two-stage path against its own two-stage reference).", "",
        *serving_table(rows), "",
        "### Serving target (one user, T = 10,000, 512 candidates in under 10 ms)", "",
        *serving_target_lines(rows),
    ]


def summary(rows: list, serving: list, missing: list) -> str:
    lines = [f"## GPU benchmark: {(rows or serving)[0]['device']}", ""]
    if rows:
        lines += gpu_summary(rows)
    if serving:
        lines += ["", *serving_summary(serving)] if rows else serving_summary(serving)
    failures = [f"- {r['pass']} {r['dtype']} B={r['batch']} C={r['candidates']} T={r['length']} "
                f"{r['impl']}: {r['note']}" for r in rows if r["note"]]
    failures += [f"- serving {r['dtype']} T={r['length']} C={r['candidates']} {path_label(r)}: "
                 f"{r['note']}" for r in serving if r["note"]]
    lines += ["", "### Missing results", "", *[f"- {m}" for m in missing]] if missing else []
    lines += ["", "### Failures", "", *failures] if failures else []
    return "\n".join(lines) + "\n"


def grouped(rows: list, *columns) -> list:
    """The rows grouped by the values of ``columns`` (the first column the
    outer grouping), each value in the order it first appears, each group's
    rows in their own order: the benchmarks measure the headline shape in
    every dtype before the other shapes, the tables show one dtype at a time."""
    ranks = [{value: rank for rank, value in enumerate(dict.fromkeys(r[c] for r in rows))}
             for c in columns]
    return sorted(rows, key=lambda r: [rank[r[c]] for rank, c in zip(ranks, columns)])


def gpu_summary(rows: list) -> list:
    first = rows[0]
    ceilings = {r["dtype"]: r["peak_tflops"] for r in rows if is_figure(r["peak_tflops"])}
    headline_shape = (first["batch"], first["candidates"], first["length"])
    headline = [r for r in rows if (r["batch"], r["candidates"], r["length"]) == headline_shape]
    return [
        f"torch {first['torch']}, triton {first['triton']}. Measured ceilings: device-to-device "
        f"copy {number(first['copy_gbps'], '.0f')} GB/s; matrix product "
        + ", ".join(f"{dtype} {tflops:.0f} TFLOP/s" for dtype, tflops in ceilings.items()) + ".",
        "Times are medians of CUDA-event timings (perf_counter in a dry run) taken "
        "round-robin (interquartile range in brackets); triton speedup = the implementation's time over triton's (the median "
        "per-round ratio); memory = the peak of one call above what was allocated before it; "
        "error = the output's largest absolute error against float64 / the gradients' worst "
        "element relative to each gradient's largest; x floor = the time over "
        "max(bytes / copy bandwidth, FLOPs / matmul peak).", "",
        f"### Headline: B={first['batch']}, C={first['candidates']}, T={first['length']}, "
        f"D={first['dim']}, hidden {first['hidden']}, sigmoid", "",
        *headline_table(headline), "",
        f"### Sweep: B*C*T = {math.prod(headline_shape):,} pairs (B at least 1)", "",
        *sweep_table(rows), "",
        "### Targets (headline, bfloat16)", "", *target_lines(headline),
    ]


def read_rows(path: str, missing: list, what: str, identity: tuple) -> list:
    """The rows of a benchmark's CSV, or [] with the reason added to
    ``missing``. A row without one of the ``identity`` columns is left out,
    and one without some figures (a cell missing or empty) keeps them as
    NaN, each with a note in ``missing``."""
    if not os.path.exists(path):
        missing.append(f"{what}: {path} was not written (see the log of its step)")
        return []
    try:
        read = harness.read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        missing.append(f"{what}: {path} could not be read ({error})")
        return []
    rows = []
    for line, row in enumerate(read, start=2):   # line 1 is the header
        absent = [column for column in identity if row.get(column) in (None, "")]
        if absent:
            missing.append(f"{what}: {path} line {line} has no {', '.join(absent)}: left out")
            continue
        if None in row.values():
            missing.append(f"{what}: {path} line {line} is cut short: its missing figures "
                           "show as -")
        for column, value in row.items():
            if column in TEXT:   # a text cell read back empty is ""
                row[column] = value if isinstance(value, str) else "" if value is None \
                    else str(value)
            elif not isinstance(value, (int, float)):
                row[column] = math.nan
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the device part of the file names")
    parser.add_argument("--results", default=RESULTS, help="folder of the CSVs (default: %(default)s)")
    args = parser.parse_args(argv)
    missing = []
    rows = [row for pass_ in PASSES for row in read_rows(
        os.path.join(args.results, f"bench_gpu_{pass_}_{args.label}.csv"), missing, pass_,
        IDENTITY["gpu"])]
    serving = read_rows(os.path.join(args.results, f"bench_serving_{args.label}.csv"), missing,
                        "serving", IDENTITY["serving"])
    if not rows and not serving:
        print("gpu_report: no results: " + "; ".join(missing), file=sys.stderr)
        return 1
    text = summary(rows, serving, missing)
    path = os.path.join(args.results, f"gpu_summary_{args.label}.md")
    with open_replacing(path, "--results") as f:
        f.write(text)
    written = [path]
    if rows:
        written.append(os.path.join(args.results, f"bench_gpu_{args.label}.png"))
        harness.plot_panels(rows, written[-1], panel=("pass", "dtype", "candidates"), x="length",
                            y="ms", line="impl", xlabel="T (history length)",
                            ylabel="ms (median)", option="--results")
    print(text)
    print(f"wrote {' and '.join(written)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
