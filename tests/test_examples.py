"""Every script in examples/ runs to the end (each checks its own results:
the drop-in layers against their peers, jagged against padded, the exported
models against eager), as a user would run it: python examples/NAME.py."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script):
    # One thread, as din-fast defaults to (the examples' small batches gain
    # nothing from more, and CI's two cores are shared).
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True,
                            text=True, timeout=600, env=environment, cwd=EXAMPLES.parent)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


def test_the_examples_are_there():
    assert {p.name for p in EXAMPLES.glob("*.py")} >= {
        "deepctr_din.py", "fuxictr_din.py", "torchrec_jagged.py", "train_from_table.py",
        "serve_exported.py"}
