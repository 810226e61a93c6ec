"""The benchmarks of din_fast, run as modules from the repository root:

    python -m benchmarks.bench_cpu            # the main job: CPU, torch backend vs peers
    python -m benchmarks.bench_gpu --pass forward|train [--dry-run]
    bash benchmarks/gpu_check.sh [--dry-run]  # the whole GPU check, one prepared run

harness.py measures and records, peers.py says what is measured.
"""

import os

import torch

# Without a GPU the triton backend runs in the Triton interpreter (as the tests
# do). Triton reads the variable when a kernel is decorated, i.e. when din_fast
# is first imported, so it is set here, before any benchmark module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
