#!/usr/bin/env bash
# The GPU check of the Triton kernels: one prepared run, under 8
# minutes on one H100/H200 with the machine's own torch and triton.
#
#   1. the kernel tests on CUDA tensors (CUDA_TESTS below);
#   2. the forward benchmark and 3. the training-step benchmark
#      (python3 -m benchmarks.bench_gpu: din_fast triton against the eager
#      reference, torch.compile of it, the torch backend and DeepCTR-Torch,
#      headline shape and sweep, bfloat16 and float32, with peak memory, the
#      error against float64 and the bandwidth / FLOP rate against the
#      device's measured copy bandwidth and matmul peak);
#   4. the serving benchmark: one request (one user's history of T behaviours
#      against C candidates) at T in {1000, 10000} x C in {1, 64, 512},
#      bfloat16 then float32: exact DIN and the two-stage paths on the triton
#      and torch backends and DeepCTR-Torch's layer, p50/p99 latency per
#      request, peak memory, the error against float64 and the floor from the
#      measured ceilings (python3 -m benchmarks.bench_serving --device cuda);
#   5. compute-sanitizer memcheck and racecheck over a small problem per
#      kernel launch configuration (python3 -m benchmarks.sanitizer_workload);
#   6. the tuning sweep: the kernels' tile, warp, stage and backward-plan
#      choices timed side by side at the headline shape (benchmarks.tune_kernels);
#   7. the report: a markdown summary table and a plot (benchmarks.gpu_report).
#
# Each step has its own time limit (together 470 s on a GPU and in the dry
# run, plus a few seconds of setup) and a failing step does not stop the next:
# one run on a lent GPU should bring back every figure; the benchmarks write
# their CSV after every shape, so a step stopped at its limit keeps what it
# measured. The exit status is 1 when any step failed. Everything goes to $OUT
# when it is set, else to benchmarks/results/, named with the GPU:
# gpu_check_<gpu>.log (all output), bench_gpu_forward_<gpu>.csv,
# bench_gpu_train_<gpu>.csv, bench_serving_<gpu>.csv, bench_gpu_<gpu>.png,
# tune_kernels_<gpu>.csv, gpu_summary_<gpu>.md.
#
# DeepCTR-Torch's layer is one of the peers. Where deepctr_torch is not
# installed, the script installs the wheel found in benchmarks/wheels/
# (fetch it with `pip download --no-deps deepctr-torch -d benchmarks/wheels/`;
# the folder is not tracked by git, so carry it to the GPU machine), else the
# benchmarks leave that peer out and say so.
#
#     bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#     bash benchmarks/gpu_check.sh --dry-run  # every step on CPU (CI runs this):
#         the first test of each file, tiny shapes with the kernels in the Triton
#         interpreter, the sanitizer's workload without compute-sanitizer
set -uo pipefail

# The test files that run the kernels on CUDA (the lead adds new ones here).
CUDA_TESTS="tests/test_triton_forward.py tests/test_backward.py tests/test_ops.py
            tests/test_jagged_triton.py tests/test_jagged_ops.py tests/test_layouts.py
            tests/test_padding.py tests/test_sizes.py tests/test_scales.py
            tests/test_higher_order.py tests/test_launch_safety.py tests/test_aot.py
            tests/test_top_k.py"
SANITIZER_TOOLS="memcheck racecheck"

cd "$(dirname "$0")/.."
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "gpu_check.sh: unknown argument '$1' (takes --dry-run or nothing)" >&2; exit 2 ;;
esac
BENCH_ARGS=()
if [ "$DRY_RUN" = 1 ]; then
    # CPU only, even on a GPU machine; the kernels run in the Triton interpreter.
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    BENCH_ARGS=(--dry-run)
elif ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); --dry-run runs" \
         "every step on CPU" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
LABEL=$(python3 -c "import torch; from benchmarks.harness import results_label; \
print(results_label(torch.device('cuda' if torch.cuda.is_available() else 'cpu'), $DRY_RUN))") \
    || { echo "gpu_check.sh: cannot import torch and benchmarks.harness" >&2; exit 2; }
exec > >(tee "$RESULTS/gpu_check_$LABEL.log") 2>&1

echo "gpu_check.sh $* on $LABEL, $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
command -v nvidia-smi >/dev/null && [ "$DRY_RUN" = 0 ] && nvidia-smi -L
python3 -c "import din_fast.kernels" 2>/dev/null \
    || python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . \
    || echo "gpu_check.sh: installing din_fast failed; the steps below will say what is missing"
if ! python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('deepctr_torch') is None)"; then
    wheel=$(ls benchmarks/wheels/deepctr_torch-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ]; then
        python3 -m pip install -q --no-deps --no-index "$wheel"
    else
        echo "gpu_check.sh: deepctr-torch is not installed and benchmarks/wheels/ holds no" \
             "wheel of it: the benchmarks leave DeepCTR-Torch's layer out"
    fi
fi
python3 -c "import torch, triton; print('python', __import__('sys').version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__)"

status=0
failed=()
# step SECONDS NAME COMMAND...: run COMMAND under a time limit; a failure is
# recorded and the next step runs.
step() {
    local limit=$1 name=$2 start=$SECONDS rc
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s$([ $rc = 124 ] && echo ' (time limit)')"
    if [ $rc != 0 ]; then
        status=1
        failed+=("$name (exit $rc)")
    fi
}

find_sanitizer() {
    local triton_bin sites candidate
    triton_bin=$(python3 -c "import os, triton; print(os.path.dirname(triton.__file__))" 2>/dev/null)/backends/nvidia/bin
    sites=$(python3 -c "import site; print(' '.join(site.getsitepackages()))" 2>/dev/null)
    for candidate in "$(command -v compute-sanitizer)" \
            "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
            /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer \
            /opt/nvidia/*/compute-sanitizer /opt/nvidia/*/*/compute-sanitizer "$triton_bin/compute-sanitizer" \
            $(for site in $sites; do echo "$site"/nvidia/*/bin/compute-sanitizer \
                  "$site"/nvidia/*/compute-sanitizer/compute-sanitizer; done); do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

TESTS=($CUDA_TESTS)   # split on white space: the file names hold none
if [ "$DRY_RUN" = 1 ]; then
    # The first test of every file (CI runs them all in the interpreter anyway);
    # when a file does not collect, the step runs the whole list and fails on it.
    if collected=$(python3 -m pytest --collect-only -q "${TESTS[@]}" 2>/dev/null); then
        mapfile -t TESTS < <(awk -F'::' '/::/ && !seen[$1]++' <<< "$collected")
    fi
fi

# The limits add up to 470 s either way (memcheck and racecheck 35 s each on a
# GPU, the workload alone 70 s in the dry run); rebalance them when adding a step.
step 95 "CUDA tests" python3 -m pytest -q "${TESTS[@]}"
step 75 "forward benchmark" python3 -m benchmarks.bench_gpu --pass forward --label "$LABEL" --out "$RESULTS" "${BENCH_ARGS[@]}"
step 85 "training benchmark" python3 -m benchmarks.bench_gpu --pass train --label "$LABEL" --out "$RESULTS" "${BENCH_ARGS[@]}"
# The serving target is one user, T=10,000 x 512 candidates, in under 10 ms; at
# two seconds of requests per shape the 12 shapes leave time for compiling.
# DeepCTR-Torch's tiled history at 10,000 x 512 takes 6-12 GB: within 16 GB it
# is measured there too.
step 70 "serving benchmark" python3 -m benchmarks.bench_serving --device cuda \
    --grid-lengths 1000 10000 --grid-candidates 1 64 512 --seconds-per-shape 2 \
    --memory-budget-mb 16384 --out "$RESULTS/bench_serving_$LABEL.csv" "${BENCH_ARGS[@]}"
if [ "$DRY_RUN" = 1 ]; then
    echo
    echo "=== dry run: compute-sanitizer ($SANITIZER_TOOLS) skipped; its workload runs without it"
    step 70 "sanitizer workload" python3 -m benchmarks.sanitizer_workload --device cpu
elif SANITIZER=$(find_sanitizer); then
    for tool in $SANITIZER_TOOLS; do
        # Without the caching allocator every tensor is its own allocation, so
        # memcheck sees an access past a tensor's end.
        step 35 "compute-sanitizer $tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
            --tool "$tool" --error-exitcode 1 --print-limit 20 \
            python3 -m benchmarks.sanitizer_workload --device cuda
    done
else
    echo
    echo "=== compute-sanitizer skipped: no binary found (looked on PATH, in \$CUDA_HOME," \
         "/usr/local/cuda*, /opt/nvidia, triton's bundled tools and the nvidia Python packages)"
fi
step 60 "tuning sweep" python3 -m benchmarks.tune_kernels --label "$LABEL" --out "$RESULTS" "${BENCH_ARGS[@]}"
step 15 "report" python3 -m benchmarks.gpu_report --label "$LABEL" --results "$RESULTS"

echo
if [ $status = 0 ]; then
    echo "gpu_check.sh: every step passed; results in $RESULTS (*$LABEL*)"
else
    echo "gpu_check.sh: failed steps: ${failed[*]}; results in $RESULTS (*$LABEL*)"
fi
exec >&- 2>&-
wait
exit $status
