"""Small data files in the layouts din-fast reads, and the real command run
on them in a subprocess, for the data and CLI tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch


@dataclass
class Case:
    argv: list
    expected: tuple                       # fragments the error line must contain
    env: dict = field(default_factory=dict)
    unset: tuple = ()                     # environment variables removed for the command


def run(case: Case, **options) -> subprocess.CompletedProcess:
    """``python -m din_fast`` with the case's arguments and environment
    (``options`` go to subprocess.run)."""
    env = {k: v for k, v in os.environ.items() if k not in case.unset}
    env.update(case.env)
    return subprocess.run([sys.executable, "-m", "din_fast", *case.argv], capture_output=True,
                          text=True, env=env, timeout=600, **options)


def evaluation_reproducing(checkpoint: Path, data: Path, trained: dict, out: Path,
                           tolerance: float) -> dict:
    """din-fast evaluate's metrics (through the CLI's main, written to
    ``out``) of ``checkpoint`` on ``data``, having checked that its test AUC,
    GAUC and logloss are train's (``trained``, its metrics) within
    ``tolerance``."""
    from din_fast.ctr.cli import main

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data),
                 "--metrics-out", str(out)]) == 0
    evaluated = json.loads(out.read_text())
    for key in ("test_auc", "test_gauc", "test_logloss"):
        assert evaluated[key] == pytest.approx(trained[key], abs=tolerance), key
    return evaluated


def write_csv(path: Path, interactions) -> Path:
    """The interactions as a user,item,category,timestamp table (timestamp = position)."""
    category = dict(zip(interactions.category_items.tolist(),
                        interactions.category_values.tolist()))
    rows = ["user,item,category,timestamp"]
    for u, user in enumerate(interactions.user_ids.tolist()):
        items = interactions.items[interactions.offsets[u]:interactions.offsets[u + 1]]
        rows += [f"{user},{item},{category[item]},{t}" for t, item in enumerate(items.tolist())]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_amazon(directory: Path, name="Small", lines=None, attributes=None) -> Path:
    """An Amazon-layout directory: <name>.txt and <name>_item2attributes.json."""
    directory.mkdir(exist_ok=True)
    lines = ["1 10 11 12 13", "2 11 14 10", "3 15 12"] if lines is None else lines
    attributes = ({"10": [7, 1], "11": [2], "12": [7, 3, 2], "13": [4], "14": [1],
                   "15": [3]} if attributes is None else attributes)
    (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (directory / f"{name}_item2attributes.json").write_text(json.dumps(attributes))
    return directory


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the command sets (cli.add_threads_option); main()
    sets the count for the whole process, so the other tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unwritable_directory(tmp_path: Path) -> Path:
    """A directory that takes no new file: one without write permission, or
    (root writes there anyway) /sys, which refuses even root."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500, exist_ok=True)
    for directory in (locked, Path("/sys")):
        try:
            tempfile.TemporaryFile(dir=directory).close()
        except OSError:
            return directory
    pytest.skip("no directory here refuses a new file")


def labeled_rows(num_rows: int = 600, num_users: int = 30, num_items: int = 40,
                 seed: int = 0) -> list:
    """A seeded labeled log as rows (user, item, category, timestamp, label,
    genres, hour, price): a user clicks items of their favourite category
    more often, timestamps repeat (several rows a second), genres are
    multi-valued (sometimes none)."""
    rng = np.random.default_rng(seed)
    favourite = rng.integers(0, 5, num_users)
    rows = []
    for r in range(num_rows):
        user, item = int(rng.integers(num_users)), int(rng.integers(num_items))
        category = item % 5
        click = rng.random() < (0.7 if category == favourite[user] else 0.25)
        genres = "|".join(f"g{g}" for g in sorted(set(rng.integers(0, 6, rng.integers(0, 3)))))
        rows.append((f"u{user}", f"i{item}", f"c{category}", r // 3, int(click), genres,
                     int(rng.integers(24)), round(float(rng.normal(10, 3)), 3)))
    return rows


LABELED_HEADER = ("user", "item", "category", "timestamp", "label", "genres", "hour", "price")


def write_labeled_log(path: Path, rows=None, header=LABELED_HEADER) -> Path:
    """A labeled log as CSV (labeled_rows() by default)."""
    rows = labeled_rows() if rows is None else rows
    path.write_text("\n".join([",".join(header)]
                              + [",".join(map(str, row)) for row in rows]) + "\n")
    return path
