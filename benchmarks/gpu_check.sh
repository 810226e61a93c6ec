#!/usr/bin/env bash
# The GPU check of the Triton kernels: one prepared run, within 7 minutes
# (BUDGET_S) on one H100/H200 with the machine's own torch and triton.
#
#   1. the kernel tests on CUDA tensors (CUDA_TESTS below, chosen and ordered
#      by benchmarks/cuda_test_selection.py: the Triton kernels against the
#      float64 reference first, the torch backend's tests last, the literal
#      reference's left to CI), in 8 processes with pytest-xdist and a per-test
#      and whole-session limit with pytest-timeout where they are installed;
#   2. the forward benchmark and 3. the training-step benchmark
#      (python3 -m benchmarks.bench_gpu: din_fast triton against the eager
#      reference, torch.compile of it, the torch backend and DeepCTR-Torch,
#      the headline shape in every dtype first, then the sweep, bfloat16 and
#      float32, with peak memory, the error against float64 and the bandwidth
#      / FLOP rate against the device's measured copy bandwidth and matmul peak);
#   4. the serving benchmark: one request (one user's history of T behaviours
#      against C candidates), T=10,000 x C=512 in each dtype first, then
#      T in {1000, 10000} x C in {1, 64, 512}, bfloat16 then float32: exact DIN
#      and the two-stage paths on the triton backend (the torch backend: exact
#      and one K) and DeepCTR-Torch's layer, p50/p99 latency per request, peak
#      memory, the error against float64 and the floor from the measured
#      ceilings (python3 -m benchmarks.bench_serving --device cuda);
#   5. compute-sanitizer memcheck and racecheck over a small problem per
#      kernel launch configuration (python3 -m benchmarks.sanitizer_workload);
#   6. the tuning sweep: the kernels' tile, warp, stage and backward-plan
#      choices timed side by side at the headline shape (benchmarks.tune_kernels);
#   7. the report: a markdown summary table and a plot (benchmarks.gpu_report).
#
# Each step has its own time limit and a failing step does not stop the next:
# one run on a lent GPU should bring back every figure; the benchmarks write
# their CSV (atomically) after every shape, so a step stopped at its limit
# keeps what it measured. The limits, the setup (~20 s) and the 5 s a stopped
# step may take to die fit in BUDGET_S; where the setup runs long, the steps'
# limits shrink so that the run still ends within it (the report's time kept).
# The log ends with each step's limit, time and exit status and the total.
# The exit status is 1 when any step failed. Everything goes to $OUT
# when it is set, else to benchmarks/results/, named with the GPU:
# gpu_check_<gpu>.log (all output), bench_gpu_forward_<gpu>.csv,
# bench_gpu_train_<gpu>.csv, bench_serving_<gpu>.csv, bench_gpu_<gpu>.png,
# tune_kernels_<gpu>.csv, gpu_summary_<gpu>.md (seven files: a lent machine
# returns at most eight).
#
# DeepCTR-Torch's layer is one of the peers. Where deepctr_torch is not
# installed, the script installs the wheel found in benchmarks/wheels/
# (fetch it with `pip download --no-deps deepctr-torch -d benchmarks/wheels/`;
# fetch `setuptools>=77` there too, which builds din_fast where the
# interpreter's setuptools is older);
# without it the log says DeepCTR-Torch is absent and the benchmarks leave
# that peer out. The folder is ignored by git, so a runner that copies the
# working tree to the GPU machine must be told to take it along. With this
# workplace's device runner (files under $OUT come back; 480 s leaves the
# run's 420 s room):
#
#     run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels"],
#         timeout_s=480)
#
#     bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU
#     bash benchmarks/gpu_check.sh --dry-run  # every step on CPU (CI runs this):
#         the first test of each file, tiny shapes with the kernels in the Triton
#         interpreter, the sanitizer's workload without compute-sanitizer; the
#         limits and the budget three times the GPU's (a loaded 2-core machine)
#
# GPU_CHECK_BUDGET_S overrides BUDGET_S: a small one rehearses steps stopped
# at their limits (GPU_CHECK_BUDGET_S=40 bash benchmarks/gpu_check.sh --dry-run).
set -uo pipefail

# The test files that run the kernels on CUDA, most important first (the lead
# adds new ones here). tests/test_aot.py compiles for named architectures
# whatever the machine, so CI's run covers it.
CUDA_TESTS="tests/test_triton_forward.py tests/test_backward.py tests/test_top_k.py
            tests/test_jagged_triton.py tests/test_higher_order.py tests/test_ops.py
            tests/test_launch_safety.py tests/test_padding.py tests/test_layouts.py
            tests/test_scales.py tests/test_sizes.py tests/test_jagged_ops.py"
SANITIZER_TOOLS="memcheck racecheck"
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
KILL_AFTER_S=5        # after a step's limit, SIGTERM; this much later, SIGKILL
REPORT_S=10           # the report's limit, kept back from the steps before it
TEST_WORKERS=8        # pytest-xdist processes (the machine has 16 cores)
TEST_TIMEOUT_S=60     # pytest-timeout's limit per test
# The tests stop starting new ones this long before the step's limit: the
# workers start up to ~10 s after the step, and the test in flight (a cold
# compile: ~10-20 s) ends before pytest prints its summary.
SESSION_MARGIN_S=30

cd "$(dirname "$0")/.."
DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "gpu_check.sh: unknown argument '$1' (takes --dry-run or nothing)" >&2; exit 2 ;;
esac
case "$BUDGET_S" in
    ''|*[!0-9]*) echo "gpu_check.sh: GPU_CHECK_BUDGET_S must be a whole number of seconds;" \
                      "got '$BUDGET_S'" >&2; exit 2 ;;
esac
BENCH_ARGS=()
SLACK=1
if [ "$DRY_RUN" = 1 ]; then
    # CPU only, even on a GPU machine; the kernels run in the Triton interpreter.
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    BENCH_ARGS=(--dry-run)
    SLACK=3
elif ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); --dry-run runs" \
         "every step on CPU" >&2
    exit 2
fi
export PYTHONUNBUFFERED=1
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
# din_fast itself where it is not installed (a bare GPU machine), before
# anything imports it (the benchmarks do): editable, offline; said in the log.
# The build needs setuptools >= 77 (pyproject's SPDX license): the
# interpreter's own where it has one, else a wheel of it carried in
# benchmarks/wheels/ (offline, in pip's isolated build environment).
installed=""
if ! python3 -c "import din_fast.kernels" 2>/dev/null; then
    if installed=$(python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . 2>&1); then
        installed="din_fast: installed from this checkout (pip install -e .) $installed"
    elif installed=$(python3 -m pip install -q --no-deps --no-index \
                     --find-links benchmarks/wheels -e . 2>&1); then
        installed="din_fast: installed from this checkout (pip install -e ., setuptools from benchmarks/wheels/) $installed"
    else
        installed="gpu_check.sh: installing din_fast failed (the interpreter's setuptools is older than 77 and benchmarks/wheels/ holds no setuptools wheel): ${installed: -2000}"
    fi
fi
# The file names' label, then the versions (one interpreter start for both).
mapfile -t SETTING < <(python3 -c "import sys, torch, triton; from benchmarks.harness import \
results_label; print(results_label(torch.device('cuda' if torch.cuda.is_available() else 'cpu'), \
$DRY_RUN)); print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__)")
if [ "${#SETTING[@]}" != 2 ]; then
    echo "gpu_check.sh: cannot import torch, triton and benchmarks.harness${installed:+; $installed}" >&2
    exit 2
fi
LABEL=${SETTING[0]}
exec > >(tee "$RESULTS/gpu_check_$LABEL.log") 2>&1

echo "gpu_check.sh $* on $LABEL, $(date -u '+%Y-%m-%d %H:%M UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "${SETTING[1]}"
[ -n "$installed" ] && echo "$installed"
command -v nvidia-smi >/dev/null && [ "$DRY_RUN" = 0 ] && nvidia-smi -L
if version=$(python3 -c "import importlib.metadata as m; print(m.version('deepctr-torch'))" 2>/dev/null); then
    echo "DeepCTR-Torch $version: installed"
else
    wheel=$(ls benchmarks/wheels/deepctr[-_]torch-*.whl 2>/dev/null | tail -n 1)
    if [ -z "$wheel" ]; then
        echo "DeepCTR-Torch: ABSENT: not installed and benchmarks/wheels/ holds no wheel of it" \
             "(carry that folder: see the top of this script); the benchmarks leave its layer out"
    elif python3 -m pip install -q --no-deps --no-index "$wheel"; then
        echo "DeepCTR-Torch: installed from $wheel"
    else
        echo "DeepCTR-Torch: ABSENT: installing $wheel failed (above); the benchmarks leave" \
             "its layer out"
    fi
fi

status=0
failed=()
step_times=()
END_S=$((SLACK * (BUDGET_S - REPORT_S - KILL_AFTER_S)))   # the steps before the report end by then
# fit SECONDS: a step's limit, SECONDS times the slack, or what is left
# before END_S once the step's kill margin is counted, whichever is less.
fit() {
    local limit=$((SLACK * $1)) left=$((END_S - SECONDS - KILL_AFTER_S))
    left=$((left < 0 ? 0 : left))
    echo $((limit < left ? limit : left))
}
# step SECONDS NAME COMMAND...: run COMMAND under a time limit (fit); a failure
# is recorded and the next step runs; a step with under 5 s left is skipped.
step() {
    local limit name=$2 start=$SECONDS rc
    limit=$(fit "$1")
    shift 2
    echo
    if [ "$limit" -lt 5 ]; then
        echo "=== $name: skipped: ${limit}s of the budget left (under 5 s)"
        rc=skipped
    else
        echo "=== $name (limit ${limit}s): $*"
        timeout --kill-after=$KILL_AFTER_S "$limit" "$@"
        rc=$?
        # A write stopped by the kill leaves its temporary file (see harness.write_csv).
        rm -f -- "$RESULTS"/.*"$LABEL"*.tmp.*
        if [ $rc = 124 ] || [ $rc = 137 ]; then
            # On a line of its own: the test in flight was printed without its outcome.
            echo
            echo "=== $name: exit $rc after $((SECONDS - start))s (time limit)"
        else
            echo "=== $name: exit $rc after $((SECONDS - start))s"
        fi
    fi
    step_times+=("$(printf '%-26s %6s %6s  %s' "$name" "$limit" $((SECONDS - start)) "$rc")")
    if [ "$rc" != 0 ]; then
        status=1
        failed+=("$name ($([ "$rc" = skipped ] && echo skipped || echo "exit $rc"))")
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

# The tests CUDA_TESTS holds that run on CUDA, in their order (the plugin).
SELECTION=(-p no:cacheprovider -p benchmarks.cuda_test_selection)
TESTS=($CUDA_TESTS)   # split on white space: the file names hold none
if [ "$DRY_RUN" = 1 ]; then
    # The first test of every file (CI runs them all in the interpreter anyway);
    # when a file does not collect, the step runs the whole list and fails on it.
    if collected=$(python3 -m pytest --collect-only -q "${SELECTION[@]}" "${TESTS[@]}" 2>/dev/null); then
        mapfile -t TESTS < <(awk -F'::' '/::/ && !seen[$1]++' <<< "$collected")
    fi
fi
# -v names each test as it starts and as it ends (a step stopped at its limit
# still shows which ran and which failed), -rfE lists the failures at the end;
# pytest-xdist and pytest-timeout (--session-timeout from 2.3) where installed.
PYTEST=(python3 -m pytest -v -rfE "${SELECTION[@]}")
read -r has_xdist session_timeout < <(python3 -c "import importlib.metadata as m
def version(name):
    try:
        return tuple(int(p) for p in m.version(name).split('.')[:2])
    except (m.PackageNotFoundError, ValueError):
        return None
timeout = version('pytest-timeout')
print(int(version('pytest-xdist') is not None), -1 if timeout is None else int(timeout >= (2, 3)))")
workers=$(( $(nproc) < TEST_WORKERS ? $(nproc) : TEST_WORKERS ))
if [ "$has_xdist" = 1 ] && [ "$workers" -gt 1 ]; then
    PYTEST+=(-n "$workers")
else
    echo "CUDA tests in one process ($([ "$has_xdist" = 1 ] && echo 'one core' \
         || echo 'pytest-xdist is not installed'))"
fi
tests_limit=$(fit 100)
if [ "$session_timeout" = 0 ] || [ "$session_timeout" = 1 ]; then
    PYTEST+=(--timeout $((SLACK * TEST_TIMEOUT_S)))
    # The session stops starting tests in time to print its summary.
    margin=$((SLACK * SESSION_MARGIN_S))
    [ "$session_timeout" = 1 ] && [ "$tests_limit" -gt $((2 * margin)) ] \
        && PYTEST+=(--session-timeout $((tests_limit - margin)))
else
    echo "CUDA tests without a per-test limit (pytest-timeout is not installed): the step's" \
         "limit stops them"
fi
step_times+=("$(printf '%-26s %6s %6s' setup - "$SECONDS")")

# The limits add up to 360 s on a GPU (memcheck and racecheck 25 s each; the
# workload alone 50 s in the dry run): with the setup and a kill margin per
# step, within BUDGET_S. Rebalance them when adding a step.
step 100 "CUDA tests" "${PYTEST[@]}" "${TESTS[@]}"
step 55 "forward benchmark" python3 -m benchmarks.bench_gpu --pass forward --label "$LABEL" --out "$RESULTS" "${BENCH_ARGS[@]}"
step 60 "training benchmark" python3 -m benchmarks.bench_gpu --pass train --label "$LABEL" --out "$RESULTS" "${BENCH_ARGS[@]}"
# The serving target is one user, T=10,000 x 512 candidates, in under 10 ms:
# that shape runs first in each dtype. At two seconds of requests per shape
# the 12 shapes leave time for compiling. DeepCTR-Torch's tiled history at
# 10,000 x 512 takes 6-12 GB: within 16 GB it is measured there too.
step 55 "serving benchmark" python3 -m benchmarks.bench_serving --device cuda \
    --grid-lengths 1000 10000 --grid-candidates 1 64 512 --seconds-per-shape 2 \
    --memory-budget-mb 16384 --out "$RESULTS/bench_serving_$LABEL.csv" "${BENCH_ARGS[@]}"
if [ "$DRY_RUN" = 1 ]; then
    echo
    echo "=== dry run: compute-sanitizer ($SANITIZER_TOOLS) skipped; its workload runs without it"
    step 50 "sanitizer workload" python3 -m benchmarks.sanitizer_workload --device cpu
elif SANITIZER=$(find_sanitizer); then
    for tool in $SANITIZER_TOOLS; do
        # Without the caching allocator every tensor is its own allocation, so
        # memcheck sees an access past a tensor's end.
        step 25 "compute-sanitizer $tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
            --tool "$tool" --error-exitcode 1 --print-limit 20 \
            python3 -m benchmarks.sanitizer_workload --device cuda
    done
else
    echo
    echo "=== compute-sanitizer skipped: no binary found (looked on PATH, in \$CUDA_HOME," \
         "/usr/local/cuda*, /opt/nvidia, triton's bundled tools and the nvidia Python packages)"
fi
step 30 "tuning sweep" python3 -m benchmarks.tune_kernels --label "$LABEL" --out "$RESULTS" "${BENCH_ARGS[@]}"
END_S=$((SLACK * BUDGET_S))
step $REPORT_S "report" python3 -m benchmarks.gpu_report --label "$LABEL" --results "$RESULTS"

echo
echo "=== times (seconds; budget $((SLACK * BUDGET_S))):"
printf '%-26s %6s %6s  %s\n' step limit took exit
for line in "${step_times[@]}"; do
    echo "$line"
done
printf '%-26s %6s %6s\n' "total, setup included" "" "$SECONDS"
if [ $status = 0 ]; then
    echo "gpu_check.sh: every step passed; results in $RESULTS (*$LABEL*)"
else
    echo "gpu_check.sh: failed steps: ${failed[*]}; results in $RESULTS (*$LABEL*)"
fi
exec >&- 2>&-
wait
exit $status
