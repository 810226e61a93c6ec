#!/usr/bin/env bash
# The GPU check of the Triton kernels (issues 3 and 4), in under 8 minutes on
# one H100: the kernel tests on CUDA tensors, the quick compile report, then
# the forward benchmark (CSV and plot into benchmarks/results/) and the
# training-step benchmark (forward + backward time, peak memory).
#
#     bash benchmarks/gpu_check.sh [extra bench_gpu.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import din_fast.kernels" 2>/dev/null \
    || python -m pip install -q --no-deps --no-build-isolation -e .
python -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
export TRITON_DEFAULT_FP_FUSION=1
# Each step has its own time limit (together 7.5 minutes; the tests compile every
# kernel variant they launch, the longest step) and a failing step
# does not stop the next: one run on a lent GPU should bring back every figure.
status=0
timeout 210 python -m pytest -q tests/test_triton_*.py tests/test_aot.py tests/test_backward.py \
    tests/test_ops.py || status=1
timeout 150 python benchmarks/bench_gpu.py --out benchmarks/results "$@" || status=1
timeout 90 python benchmarks/bench_gpu_train.py --out benchmarks/results || status=1
exit $status
