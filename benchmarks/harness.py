"""How the benchmarks measure and record: one harness for every benchmark script.

Timing is round-robin: each round calls every implementation once, starting
with a different one each round, so a change in the machine's load during a
run falls on all of them alike; the speedups are medians of per-round ratios,
which cancel most of what is left. On a GPU each call is timed with CUDA
events after the L2 cache has been flushed (the inputs of small shapes would
otherwise be timed from cache), or from a synchronized start to a
synchronized end where a request's latency is the figure; on CPU with
time.perf_counter. Every figure
is a median with its spread (the interquartile range and the extremes).

Peak memory is the CUDA allocator's peak above what was allocated before the
call on a GPU, and on CPU (which keeps no allocator statistics) the most
bytes of tensors alive at once, counted op by op (peak_memory.PeakMemory).
Errors are against float64. Records are CSV files and matplotlib figures.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from pathlib import Path
from dataclasses import dataclass

import torch

from din_fast.ctr.files import open_replacing, replacing

from .peak_memory import PeakMemory

L2_FLUSH_BYTES = 256 * 2 ** 20   # over the L2 of any current GPU (H100/H200: 50-60 MB)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict, rounds: int, warmup: int, device: torch.device,
                     wall_clock: bool = False) -> dict:
    """Milliseconds per call of each fn, `rounds` of them: {name: [ms, ...]}.

    Every fn is first called `warmup` times (compilation, autotuning and
    caches stay out of the figures). Round r then calls the fns in their
    order rotated by r, each call timed alone. On a GPU a call's time is the
    device's, between CUDA events, or with ``wall_clock`` the time from an
    idle device to the call's last kernel done (torch.cuda.synchronize on
    both sides): what a caller waits for, the host's validation and launches
    included, as a served request's latency.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    names = list(fns)
    times = {name: [] for name in names}
    flush = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
             if device.type == "cuda" else None)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if flush is None or wall_clock:
            for name in order:
                if flush is not None:
                    flush.zero_()
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fns[name]()
                synchronize(device)
                times[name].append(1e3 * (time.perf_counter() - start))
            continue
        events = []
        for name in order:
            flush.zero_()
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fns[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize(device)
        for name, start, end in events:
            times[name].append(start.elapsed_time(end))
    return times


@dataclass(frozen=True)
class Spread:
    """The median of some measurements, their quartiles and their extremes."""

    median: float
    q1: float
    q3: float
    low: float
    high: float

    @classmethod
    def of(cls, values) -> "Spread":
        values = sorted(values)
        if not values:
            return cls(*[math.nan] * 5)
        if len(values) == 1:
            return cls(*values * 5)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1])

    @classmethod
    def from_fields(cls, row: dict, prefix: str) -> "Spread":
        """The Spread that fields(prefix) wrote into row."""
        return cls(row[prefix], row[f"{prefix}_q1"], row[f"{prefix}_q3"], row[f"{prefix}_min"],
                   row[f"{prefix}_max"])

    def fields(self, prefix: str) -> dict:
        """CSV columns: prefix (the median), prefix_q1, prefix_q3, prefix_min, prefix_max."""
        return {prefix: self.median, f"{prefix}_q1": self.q1, f"{prefix}_q3": self.q3,
                f"{prefix}_min": self.low, f"{prefix}_max": self.high}

    def text(self, fmt: str = ".3g", unit: str = "") -> str:
        """'median (q1-q3)'."""
        return f"{self.median:{fmt}}{unit} ({self.q1:{fmt}}-{self.q3:{fmt}})"


def paired_ratios(numerators, denominators) -> list:
    """Per-round ratios of two implementations timed in the same rounds."""
    return [n / d for n, d in zip(numerators, denominators)]


def peak_memory_bytes(fn, device: torch.device) -> float:
    """Peak bytes one call of fn adds to what was allocated before it."""
    return peak_memory_and_result(fn, device)[0]


def peak_memory_and_result(fn, device: torch.device) -> tuple:
    """(peak bytes one call of fn adds to what was allocated before it, its result)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with PeakMemory() as memory:
        result = fn()
    return memory.peak_bytes, result


def max_abs_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest |out - exact| (exact: float64); NaN anywhere gives NaN."""
    diff = (out.double() - exact).abs()
    return math.nan if diff.isnan().any() else diff.max().item()


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """||out - exact|| / ||exact|| (exact: float64), SPEC's accuracy measure."""
    return ((out.double() - exact).norm() / exact.norm()).item()


def worst_gradient_error(grads, exact) -> float:
    """Over the gradients, the largest of max |g - g64| / scale: each
    gradient's worst element relative to its largest one, or to a thousandth
    of the largest element of any gradient where that is more (a gradient
    that is zero in exact arithmetic, as the output bias's under softmax,
    is rounding noise on the others' scale). NaN anywhere gives NaN."""
    exact = list(exact)
    overall = max(e.abs().max().item() for e in exact)
    worst = 0.0
    for grad, grad64 in zip(grads, exact):
        scale = max(grad64.abs().max().item(), 1e-3 * overall, 1e-30)
        error = max_abs_error(grad, grad64) / scale
        if math.isnan(error):
            return math.nan
        worst = max(worst, error)
    return worst


def copy_bandwidth(device: torch.device, nbytes: int = 2 ** 30) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = Spread.of(time_round_robin({"copy": lambda: dst.copy_(src)}, 10, 2, device)["copy"])
    return 2 * nbytes / (ms.median / 1e3)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """FLOP per second of a square matrix product on random data (torch's
    defaults: float32 without TF32), the measured peak for that dtype."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen, device=device, dtype=dtype) for _ in range(2))
    ms = Spread.of(time_round_robin({"mm": lambda: a @ b}, 10, 2, device)["mm"])
    return 2 * size ** 3 / (ms.median / 1e3)


def load_average() -> float:
    """The machine's 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def results_label(device: torch.device, dry_run: bool = False) -> str:
    """The device part of result file names: the GPU's name ('NVIDIA H200'
    -> 'NVIDIA-H200'), or dry-run-cpu."""
    if dry_run:
        return "dry-run-cpu"
    return re.sub(r"[^A-Za-z0-9.]+", "-", device_name(device)).strip("-") or "unknown"


def run_cpu_benchmark(name: str, build_parser, measure, report, argv=None) -> int:
    """The command of a benchmark that writes one CSV (the CPU benchmarks,
    bench_serving on either device): parse ``argv`` (default: sys.argv), set
    torch's CPU threads (``--threads``), ``measure(args, command)`` into rows,
    print ``report(rows)`` and write them to ``--out``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args, shlex.join(["python", "-m", f"benchmarks.{name}", *argv]))
    report(rows)
    write_csv(rows, args.out)
    print(f"wrote {args.out}")
    return 0


def write_csv(rows: list, path: str, option: str = "--out") -> None:
    """Write rows (dicts) to path, the columns in first-seen order: into a
    temporary file beside it, then renamed over it, so that a run stopped
    mid-write (a step's time limit) leaves the previous complete file. A
    failed write raises OutputError naming ``option``, the path's flag."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open_replacing(path, option, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list:
    """Rows of a CSV written by write_csv, with its numbers parsed; a column a
    short row lacks (a file cut off by hand or by another writer) is None."""
    def value(text):
        for parse in (int, float):
            try:
                return parse(text)
            except (TypeError, ValueError):
                pass
        return text

    with open(path, newline="") as f:
        return [{key: value(text) for key, text in row.items() if key is not None}
                for row in csv.DictReader(f)]


def plot_panels(rows: list, path: str, *, panel: tuple, x: str, y: str, line: str,
                xlabel: str, ylabel: str, option: str = "--out") -> None:
    """One log-log panel per distinct value of the `panel` columns, y against
    x, one line (one colour in every panel) per value of `line`; saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(tuple(row[key] for key in panel) for row in rows))
    colors = {name: f"C{index}" for index, name in enumerate(dict.fromkeys(row[line] for row in rows))}
    columns = min(4, len(panels)) or 1
    grid_rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(grid_rows, columns, figsize=(4.5 * columns, 3.6 * grid_rows),
                             squeeze=False)
    for ax, key in zip(axes.flat, panels):
        chosen = [row for row in rows if tuple(row[k] for k in panel) == key]
        for name in colors:
            points = sorted((row[x], row[y]) for row in chosen
                            if row[line] == name and not math.isnan(row[y]))
            if points:
                ax.plot(*zip(*points), marker="o", label=name, color=colors[name])
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel,
               title=", ".join(f"{k}={v}" for k, v in zip(panel, key)))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path, option) as temporary:   # its suffix tells matplotlib the format
        fig.savefig(temporary, dpi=110)
    plt.close(fig)


def add_amazon_data_options(parser) -> None:
    """``--data-dir`` and ``--datasets``: the Amazon-layout sets a training
    benchmark runs on (the same two options in each such benchmark)."""
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--data-dir", type=Path, default=root.parent / "shared" / "data",
                        help="a folder holding the datasets as Amazon-layout directories "
                        "(see docs/guides/training.md, Data); default: the development "
                        "checkout's data folder beside the repository")
    parser.add_argument("--datasets", nargs="+", default=["amazon-beauty", "amazon-sports"])
