"""din_fast without triton (pyproject installs it on Linux only), or with a
triton whose import fails: the package imports, the torch backend runs, "auto"
takes it, and backend="triton" says why it cannot run. A subprocess, whose
imports make triton look absent or broken."""

import subprocess
import sys
import textwrap

import pytest

# The first lines of the subprocess: what makes triton unusable.
ABSENT = """
    import sys

    class NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoTriton())
"""
# Found, but its import fails (a missing shared library, say).
BROKEN = """
    import os, sys, tempfile

    root = tempfile.mkdtemp()
    os.mkdir(os.path.join(root, "triton"))
    with open(os.path.join(root, "triton", "__init__.py"), "w") as init:
        init.write("raise ImportError('libcuda.so.1: cannot open shared object file')")
    sys.path.insert(0, root)
"""

SCRIPT = """
    import torch
    import din_fast

    layer = din_fast.DINAttention(4, (5,))
    query, keys, lengths = torch.randn(2, 4), torch.randn(2, 3, 4), torch.tensor([3, 0])
    layer(query, keys, lengths).sum().backward()
    assert layer.resolved_backend() == "torch"
    try:
        din_fast.DINAttention(4, (5,), backend="triton")(query, keys, lengths)
    except ValueError as error:
        assert "triton package is not installed" in str(error), error
    else:
        raise AssertionError("backend='triton' ran without triton")
    print("ok")
"""


@pytest.mark.parametrize("triton", [ABSENT, BROKEN], ids=["absent", "import-fails"])
def test_package_works_without_triton(triton):
    script = textwrap.dedent(triton) + textwrap.dedent(SCRIPT)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert "Triton not available" not in run.stderr, run.stderr
