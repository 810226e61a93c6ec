"""The report of a GPU benchmark run: a markdown summary and a plot from bench_gpu's CSVs.

Reads bench_gpu_forward_<label>.csv and bench_gpu_train_<label>.csv (either
may be missing: a pass that failed is reported as missing) from --results and
writes gpu_summary_<label>.md (printed too; the tables paste into docs/guides/benchmarks.md)
and bench_gpu_<label>.png (time against T, one panel per pass, dtype and C).

    python -m benchmarks.gpu_report --label NVIDIA-H200 [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from . import harness

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PASSES = ("forward", "train")
PEERS = ("reference", "reference_compiled", "torch", "deepctr_torch")
# Issue 14's targets at the headline shape in bfloat16: (pass, peer, least speedup).
SPEEDUP_TARGETS = (("forward", "reference", 10.0), ("forward", "reference_compiled", 3.0),
                   ("train", "reference", 5.0), ("train", "reference_compiled", 2.0))
FLOOR_TARGET = ("forward", 3.0)          # triton within 3x of the floor
MEMORY_TARGET = ("train", "reference", 0.25)   # triton's peak over eager's at most this


def number(value, fmt: str) -> str:
    return "-" if isinstance(value, str) or math.isnan(value) else f"{value:{fmt}}"


def headline_table(rows: list) -> list:
    lines = ["| pass | dtype | implementation | ms: median (IQR) | triton speedup | peak MiB | "
             "memory / triton's | error vs float64 (output / gradients) | GB/s (% of copy) | "
             "TFLOP/s (% of peak) | x floor |",
             "|" + "---|" * 11]
    for row in rows:
        triton = next(r for r in rows if r["impl"] == "triton" and r["pass"] == row["pass"]
                      and r["dtype"] == row["dtype"])
        ms = harness.Spread.from_fields(row, "ms")
        lines.append(
            f"| {row['pass']} | {row['dtype']} | {row['impl']} | "
            f"{'-' if math.isnan(ms.median) else ms.text('.3f')} | "
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
                           for r in rows)
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
                         f"(target >= {least:g}x): {'met' if value >= least else 'NOT met'}")
    pass_, most = FLOOR_TARGET
    if (pass_, "triton") in bf16:
        value = bf16[pass_, "triton"]["over_floor"]
        lines.append(f"- {pass_}: triton at {number(value, '.1f')}x the bandwidth/FLOP floor "
                     f"(target <= {most:g}x): {'met' if value <= most else 'NOT met'}")
    pass_, peer, most = MEMORY_TARGET
    if (pass_, "triton") in bf16 and (pass_, peer) in bf16:
        value = bf16[pass_, "triton"]["peak_mib"] / bf16[pass_, peer]["peak_mib"]
        lines.append(f"- {pass_}: triton's peak memory {number(value, '.2f')} of {peer}'s "
                     f"(target <= {most:g}): {'met' if value <= most else 'NOT met'}")
    return lines


def summary(rows: list, missing: list) -> str:
    first = rows[0]
    ceilings = {r["dtype"]: r["peak_tflops"] for r in rows}
    headline_shape = (first["batch"], first["candidates"], first["length"])
    headline = [r for r in rows if (r["batch"], r["candidates"], r["length"]) == headline_shape]
    lines = [
        f"## GPU benchmark: {first['device']}", "",
        f"torch {first['torch']}, triton {first['triton']}. Measured ceilings: device-to-device "
        f"copy {first['copy_gbps']:.0f} GB/s; matrix product "
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
    failures = [f"- {r['pass']} {r['dtype']} B={r['batch']} C={r['candidates']} T={r['length']} "
                f"{r['impl']}: {r['note']}" for r in rows if r["note"]]
    lines += ["", "### Missing passes", "", *[f"- {m}" for m in missing]] if missing else []
    lines += ["", "### Failures", "", *failures] if failures else []
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the device part of the file names")
    parser.add_argument("--results", default=RESULTS, help="folder of the CSVs (default: %(default)s)")
    args = parser.parse_args(argv)
    rows, missing = [], []
    for pass_ in PASSES:
        path = os.path.join(args.results, f"bench_gpu_{pass_}_{args.label}.csv")
        if os.path.exists(path):
            rows += harness.read_csv(path)
        else:
            missing.append(f"{pass_}: {path} was not written (see the log of its step)")
    if not rows:
        print("gpu_report: no results: " + "; ".join(missing), file=sys.stderr)
        return 1
    for row in rows:   # a note read back from an empty CSV cell is ""
        row["note"] = row["note"] if isinstance(row["note"], str) else ""
    text = summary(rows, missing)
    path = os.path.join(args.results, f"gpu_summary_{args.label}.md")
    with open(path, "w") as f:
        f.write(text)
    plot_path = os.path.join(args.results, f"bench_gpu_{args.label}.png")
    harness.plot_panels(rows, plot_path, panel=("pass", "dtype", "candidates"), x="length",
                        y="ms", line="impl", xlabel="T (history length)", ylabel="ms (median)")
    print(text)
    print(f"wrote {path} and {plot_path}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
