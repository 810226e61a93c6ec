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
