"""Loading benchmark: time and peak memory of reading a large behaviour log.

Generates a log of N rows (string ids: users "u<n>", ASIN-like items, category
paths, integer timestamps; Zipf-like item popularity) as CSV and as Parquet,
then loads each in a fresh process through ``din_fast.ctr.loaders.load_interactions``
and ``din_fast.ctr.data.encode`` (what ``din-fast train`` does before building
samples), reporting wall time, CPU time (user + system: what a busy machine
does not inflate) and the process's peak resident memory, imports included.

    python -m benchmarks.load_large_log [--rows 1000000 3000000 10000000] [--dir /tmp]

Writes benchmarks/results/load_large_log.csv (the documented run is in
benchmarks/recorded/). The generated files are left in --dir (about 45 bytes a
row as CSV).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from .harness import write_csv

ROOT = Path(__file__).resolve().parents[1]
USERS_PER_ROW = 1 / 10          # ~10 behaviours per user, as in the Amazon sets
ITEMS_PER_ROW = 1 / 20
CATEGORIES = 1000
CHUNK = 1_000_000


def generate(rows: int, directory: Path) -> tuple:
    """(csv path, parquet path) of a generated log with ``rows`` rows."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    csv_path, parquet_path = (directory / f"log_{rows}.{suffix}" for suffix in ("csv", "parquet"))
    if csv_path.exists() and parquet_path.exists():
        return csv_path, parquet_path
    rng = np.random.default_rng(0)
    num_users, num_items = max(int(rows * USERS_PER_ROW), 1), max(int(rows * ITEMS_PER_ROW), 1)
    item_category = rng.integers(0, CATEGORIES, num_items)
    writer = None
    parquet = None
    for start in range(0, rows, CHUNK):
        n = min(CHUNK, rows - start)
        items = np.minimum(rng.zipf(1.3, n) - 1, num_items - 1)
        table = pa.table({
            "user": pa.array(np.char.add("u", rng.integers(0, num_users, n).astype(str))),
            "item": pa.array(np.char.add("B0", np.char.zfill(items.astype(str), 8))),
            "category": pa.array(np.char.add("Beauty/", item_category[items].astype(str))),
            "timestamp": pa.array(rng.integers(1_300_000_000, 1_400_000_000, n))})
        if writer is None:
            writer = pacsv.CSVWriter(csv_path, table.schema)
            parquet = pq.ParquetWriter(parquet_path, table.schema)
        writer.write_table(table)
        parquet.write_table(table)
    writer.close()
    parquet.close()
    return csv_path, parquet_path


MEASURE = """
import json, resource, sys, time
started = time.perf_counter()
from din_fast.ctr.data import encode
from din_fast.ctr.loaders import load_interactions
data = encode(load_interactions(sys.argv[1]))
seconds = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                  "peak_bytes": usage.ru_maxrss * 1024, "users": len(data.user_ids),
                  "items": data.num_items, "rows": len(data.items)}))
"""


def measure(path: Path) -> dict:
    """Load time (imports included) and peak RSS of a fresh process loading ``path``."""
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                            text=True, check=True)
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000,
                                                                10_000_000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "load_large_log.csv")
    args = parser.parse_args()
    results = []
    for rows in args.rows:
        for path in generate(rows, args.dir):
            figures = measure(path)
            results.append(dict(rows=rows, format=path.suffix[1:],
                                file_mb=round(os.path.getsize(path) / 2 ** 20),
                                seconds=round(figures["seconds"], 1),
                                cpu_seconds=round(figures["cpu_seconds"], 1),
                                peak_mb=round(figures["peak_bytes"] / 2 ** 20),
                                users=figures["users"], items=figures["items"]))
            print(results[-1], flush=True)
    write_csv(results, args.out)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"average {os.getloadavg()[0]:.1f}, pyarrow {pa.__version__}; written to {args.out}\n")
    print("| rows | format | file MB | wall s | CPU s | peak MB |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['format']} | {r['file_mb']} | {r['seconds']} | "
              f"{r['cpu_seconds']} | {r['peak_mb']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
