"""Which tests the GPU check runs on CUDA, and in what order: a pytest plugin.

``python3 -m pytest -p benchmarks.cuda_test_selection FILES`` (gpu_check.sh's
CUDA-tests step). The step has a minute and a half on a lent GPU, with a cold
Triton cache, while CI runs the whole suite on CPU (the kernels in the Triton
interpreter). So, of the files given:

- the ``backend="reference"`` parametrizations are left out: the literal
  PyTorch reference, which the CPU run checks the same way;
- the ``backend="torch"`` parametrizations run after all the others: PyTorch's
  own operators (on CUDA only the torch backend's block budget differs), so
  that a step stopped at its limit has run every Triton kernel test first;
- the rest (the Triton kernels against the float64 reference, ``"triton"``
  and ``"auto"``) keeps the order of the files on the command line.

The order holds under pytest-xdist too: every worker collects the same list.
"""

from __future__ import annotations

LEFT_OUT = "reference"
LAST = "torch"


def backend_of(item) -> str | None:
    """The test's ``backend`` parameter, or None where it has none."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


def pytest_collection_modifyitems(config, items):
    left_out = [item for item in items if backend_of(item) == LEFT_OUT]
    kept = [item for item in items if backend_of(item) != LEFT_OUT]
    # sorted is stable: within each group the command line's order stays.
    items[:] = sorted(kept, key=lambda item: backend_of(item) == LAST)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
