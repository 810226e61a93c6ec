"""The benchmark scripts: their harness, their records and their command lines.

Benchmarks print and record figures; these tests check that what they record
is right (rows, columns, errors against float64), never how fast anything is.
CI runs the whole GPU check's dry run (bash benchmarks/gpu_check.sh --dry-run).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from cli_data import one_torch_thread, write_amazon  # noqa: F401 (a fixture)

from benchmarks import (bench_serving, default_recipe, harness, sanitizer_workload,
                        two_stage_quality)
from benchmarks.bench_gpu import GPU_SIZES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args, env=None):
    """python -m benchmarks.<args> from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)


def test_spread_of_measurements():
    spread = harness.Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (spread.median, spread.q1, spread.q3, spread.low, spread.high) == (3, 2, 4, 1, 5)
    assert harness.Spread.of([7.0]) == harness.Spread(7.0, 7.0, 7.0, 7.0, 7.0)
    assert all(math.isnan(v) for v in vars(harness.Spread.of([])).values())
    row = spread.fields("ms")
    assert harness.Spread.from_fields(row, "ms") == spread
    assert spread.text(".1f", "x") == "3.0x (2.0-4.0)"


def test_round_robin_rotates_the_order_and_times_every_round():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.time_round_robin(fns, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {name: len(ms) for name, ms in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for ms in times.values() for t in ms)


def test_peak_memory_counts_the_tensors_alive_at_once():
    def two_buffers():
        a = torch.ones(1000, dtype=torch.float64)     # 8000 bytes
        b = torch.ones(500, dtype=torch.float64)      # 4000 bytes, while a lives
        del a
        return b

    assert harness.peak_memory_bytes(two_buffers, torch.device("cpu")) == 12000


def test_gradient_error_is_relative_and_survives_exact_zeros():
    exact = [torch.tensor([2.0, -4.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    grads = [torch.tensor([2.0, -3.0]), torch.tensor([0.0, 4e-4, 0.0])]
    # 1 / 4 in the first; the zero gradient is measured on a thousandth of 4
    assert harness.worst_gradient_error(grads, exact) == pytest.approx(0.25)
    grads[1][0] = float("nan")
    assert math.isnan(harness.worst_gradient_error(grads, exact))
    assert math.isnan(harness.max_abs_error(torch.tensor([float("nan")]), torch.zeros(1)))


def test_csv_round_trip(tmp_path):
    rows = [dict(impl="triton", batch=4096, ms=0.125, note=""), dict(impl="torch", extra=1e-5)]
    path = tmp_path / "sub" / "rows.csv"
    harness.write_csv(rows, str(path))
    back = harness.read_csv(str(path))
    assert back[0] == dict(impl="triton", batch=4096, ms=0.125, note="", extra="")
    assert back[1]["extra"] == 1e-5 and back[1]["impl"] == "torch"


def test_gpu_sweep_shapes_keep_the_pair_count():
    shapes = GPU_SIZES.shapes()
    assert shapes[0] == (4096, 1, 200)
    assert len(shapes) == len(set(shapes)) == 8
    assert {(c, t) for _, c, t in shapes} == {(c, t) for c in (1, 100) for t in (50, 200, 1000, 10000)}
    for batch, candidates, length in shapes:
        assert batch == max(1, 4096 * 200 // (candidates * length))


def test_sanitizer_cases_run_every_backward_launch_configuration():
    covered = set()
    for case in sanitizer_workload.CASES:
        if case.backward:
            inputs = sanitizer_workload.case_inputs(case, torch.device("cpu"))
            covered.update(sanitizer_workload.fused_backward_launches(inputs, case.options))
    assert covered == sanitizer_workload.REQUIRED_LAUNCHES


def test_bench_cpu_records_every_implementation_and_pass(tmp_path):
    """Both shapes: the training shape's passes for every implementation, the
    serving shape's forward without the reference (over the memory budget
    given) and with DeepCTR-Torch in calls of fewer rows; the floor's rows."""
    out = tmp_path / "cpu.csv"
    result = run_module("benchmarks.bench_cpu", "--batch", "6", "--length", "5", "--dim", "8",
                        "--hidden", "6", "4", "--rounds", "3", "--compile-backend", "aot_eager",
                        "--serving-length", "400", "--serving-candidates", "16",
                        "--serving-rounds", "2", "--memory-budget-mb", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = harness.read_csv(str(out))
    peers = {"deepctr_torch", "deepctr_compiled"} if "deepctr" in rows[0]["baseline"] else set()
    training = {"torch", "torch_compiled", "reference", "flop_floor"} | peers
    assert {(r["shape"], r["impl"], r["pass"]) for r in rows} == {
        ("training", n, p) for n in training for p in ("forward", "forward+backward")} | {
        ("serving", n, "forward") for n in training - {"reference"}}
    assert "serving: reference left out" in result.stdout
    if peers:
        assert "serving: DeepCTR-Torch's layer takes 8 candidate rows per call" in result.stdout
    for row in rows:
        assert row["ms_q1"] <= row["ms"] <= row["ms_q3"]
        assert row["threads"] == 1 and "--rounds 3" in row["command"]
        assert row["x_floor"] > 0 and row["flops"] > 0 and row["gemm_gflops"] > 0
        if row["impl"] == "flop_floor":
            assert row["x_floor"] == 1.0 and math.isnan(row["peak_mb"])
            continue
        assert row["max_abs_error"] < 1e-4 and row["rel_error"] < 1e-5 and row["peak_mb"] > 0
        if row["pass"] == "forward+backward":
            assert row["grad_error"] < 1e-4
        if row["impl"] == row["baseline"]:
            assert row[f"speedup_vs_{row['baseline']}"] == 1.0
        if row["impl"] == "torch":
            assert row["speedup_vs_torch"] == 1.0
    serving = [r for r in rows if r["shape"] == "serving"]
    assert {(r["batch"], r["candidates"], r["length"], r["rounds"]) for r in serving} == {
        (1, 16, 400, 2)}
    assert "x floor" in result.stdout and "serving: B=1, C=16 candidates, T=400" in result.stdout


def test_bench_serving_records_the_grid_and_each_format(tmp_path):
    """The grid's paths per shape (exact, two-stage with each search,
    DeepCTR-Torch left out over the memory budget), their latency, memory and
    error against their own float64 reference; eager and ONNX Runtime (the .pt2
    export, a minute of C++ compiling, is left to the examples' test): one
    row each, logits as eager's."""
    out = tmp_path / "serving.csv"
    result = run_module("benchmarks.bench_serving", "--grid-lengths", "20", "400",
                        "--grid-candidates", "1", "24", "--seconds-per-shape", "0.2",
                        "--memory-budget-mb", "1", "--top-k", "5", "--history", "7",
                        "--candidates", "3",
                        "--items", "40", "--categories", "5", "--formats", "eager", "onnx",
                        "--rounds", "3", "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = harness.read_csv(str(out))
    grid = [r for r in rows if r["part"] == "grid"]
    deepctr = {"deepctr_torch"} if any(r["path"] == "deepctr_torch" for r in grid) else set()
    shapes = {(t, c) for t in (20, 400) for c in (1, 24)}
    assert {(r["length"], r["candidates"], r["path"]) for r in grid} == {
        (t, c, p) for t, c in shapes
        for p in {"exact", "two_stage_din_K5", "two_stage_dot_K5", "flop_floor"}
        | (deepctr if t * c <= 400 else set())}
    assert "T=400 C=24: deepctr_torch left out" in result.stdout
    for row in grid:
        assert 3 <= row["requests"] <= 50 and row["p50_ms"] <= row["p99_ms"]
        assert row["h100_fp32_floor_ms"] > row["h100_tf32_floor_ms"] > 0
        assert row["dtype"] == "float32" and row["note"] == ""
        if row["path"] != "flop_floor":
            assert row["rel_error"] < 1e-5 and row["peak_mb"] > 0
        assert row["backend"] == ("torch" if row["path"].startswith(("exact", "two_stage")) else "")
    assert "within the DIN paper's 10 ms per request:" in result.stdout
    reach = bench_serving.ten_ms_reach(grid)
    assert set(reach) == {"exact (torch)", "two_stage_din_K5 (torch)", "two_stage_dot_K5 (torch)",
                          "flop_floor"} | deepctr
    assert set(reach["exact (torch)"]) == set(reach["flop_floor"]) == {1, 24}
    formats = [r for r in rows if r["part"] == "formats"]
    assert [r["format"] for r in formats] == ["eager", "onnx"]
    for row in formats:
        assert row["max_abs_logit_error"] < 1e-5
        assert row["ms_q1"] <= row["ms"] <= row["ms_q3"]
        assert row["candidates"] == 3 and "--formats eager onnx" in row["command"]
    assert formats[0]["speedup_vs_eager"] == 1.0


def test_bench_gpu_dry_run_records_errors_beside_times(tmp_path):
    result = run_module("benchmarks.bench_gpu", "--pass", "train", "--dry-run", "--headline-only",
                        "--dtypes", "float32", "--implementations", "triton", "reference",
                        "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = harness.read_csv(str(tmp_path / "bench_gpu_train_dry-run-cpu.csv"))
    assert [r["impl"] for r in rows] == ["triton", "reference"]
    for row in rows:
        assert row["note"] == "" and row["ms"] > 0
        assert row["max_abs_error"] < 1e-4 and row["grad_error"] < 1e-4
        assert (row["batch"], row["candidates"], row["length"]) == (4, 1, 16)
    report = run_module("benchmarks.gpu_report", "--label", "dry-run-cpu", "--results",
                        str(tmp_path))
    # the forward pass was not run: reported as missing, exit status 1
    assert report.returncode == 1 and "bench_gpu_forward_dry-run-cpu.csv was not written" in report.stdout
    assert (tmp_path / "gpu_summary_dry-run-cpu.md").exists()
    assert (tmp_path / "bench_gpu_dry-run-cpu.png").exists()


def test_bench_serving_dry_run_runs_the_gpu_grid_and_its_report(tmp_path):
    """--dry-run: the --device cuda code on CPU (the triton backend in the
    interpreter): exact and two-stage on both backends, DeepCTR-Torch and the
    floor from the measured ceilings, each checked against float64; the CSV
    then reported by gpu_report (bench_gpu's CSVs missing: exit status 1)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "bench_serving_dry-run-cpu.csv"
    result = run_module("benchmarks.bench_serving", "--dry-run", "--dtypes", "float32",
                        "--out", str(out), env=env)
    assert result.returncode == 0, result.stderr
    rows = harness.read_csv(str(out))
    deepctr = {("deepctr_torch", "")} if any(r["path"] == "deepctr_torch" for r in rows) else set()
    paths = {(p, b) for p in ("exact", "two_stage_din_K4", "two_stage_dot_K4")
             for b in ("triton", "torch")} | deepctr | {("flop_floor", "")}
    assert {(r["length"], r["candidates"], r["path"], r["backend"]) for r in rows} == {
        (16, c, p, b) for c in (1, 4) for p, b in paths}
    for row in rows:
        assert row["part"] == "grid" and row["dtype"] == "float32" and row["note"] == ""
        assert row["requests"] == 2 and row["floor_ms"] > 0 and row["copy_gbps"] > 0
        assert "dry run" in row["device"]
        if row["path"] == "flop_floor":
            assert row["p50_ms"] == row["floor_ms"] and row["x_floor"] == 1.0
        else:
            assert row["rel_error"] < 1e-5 and row["peak_mb"] > 0
            assert row["x_floor"] == pytest.approx(row["p50_ms"] / row["floor_ms"], rel=0.5)
    report = run_module("benchmarks.gpu_report", "--label", "dry-run-cpu", "--results",
                        str(tmp_path))
    assert report.returncode == 1, report.stderr
    assert "bench_gpu_forward_dry-run-cpu.csv was not written" in report.stdout
    assert "| float32 | 16 | 4 | two_stage_dot_K4 (triton) | 2 |" in report.stdout
    assert "- T=10,000, C=512: not measured" in report.stdout


def test_bench_serving_records_a_failing_path_and_goes_on(monkeypatch, capsys):
    """A path that raises at a shape (on a GPU: out of memory, a kernel that
    does not compile) gets a row with the reason and no times; the others
    are measured."""
    two_stage = bench_serving.din_fast.din_attention_top_k

    def out_of_memory(*args, backend, **kwargs):
        if backend == "reference":    # the float64 reference still runs
            return two_stage(*args, backend=backend, **kwargs)
        raise RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB\nmore detail")

    monkeypatch.setattr(bench_serving.din_fast, "din_attention_top_k", out_of_memory)
    args = bench_serving.build_parser().parse_args(
        ["--dry-run", "--backends", "torch", "--dtypes", "float32"])
    grid = bench_serving.Grid.of(args)
    rows = bench_serving.measure_grid_shape(16, 4, torch.float32, args, grid)
    failed = [r for r in rows if r["note"]]
    assert {r["path"] for r in failed} == {"two_stage_din_K4", "two_stage_dot_K4"}
    for row in failed:
        assert row["note"] == "RuntimeError: CUDA out of memory. Tried to allocate 9.00 GiB"
        assert math.isnan(row["p50_ms"]) and math.isnan(row["rel_error"])
    exact = next(r for r in rows if r["path"] == "exact")
    assert exact["p50_ms"] > 0 and exact["rel_error"] < 1e-5 and exact["note"] == ""
    assert "T=16 C=4 two_stage_dot_K4 (torch): failed: RuntimeError" in capsys.readouterr().out


def test_bench_serving_records_a_failure_in_the_timed_requests_and_a_failed_shape(monkeypatch,
                                                                                 capsys):
    """A path whose timed requests fail (its first ones ran) keeps its error
    and gets the reason, the others their times; a shape that cannot be set
    up is one "all paths" row, and the next shape runs."""
    two_stage = bench_serving.din_fast.din_attention_top_k
    calls = []

    def fails_after_two(*args, backend, search, **kwargs):
        if backend == "torch" and search == "dot":
            calls.append(1)
            if len(calls) > 2:    # the first request and its warm second one pass
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return two_stage(*args, backend=backend, search=search, **kwargs)

    make_inputs = bench_serving.peers.make_inputs

    def no_memory_at_one_candidate(batch, candidates, *args, **kwargs):
        if candidates == 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return make_inputs(batch, candidates, *args, **kwargs)

    monkeypatch.setattr(bench_serving.din_fast, "din_attention_top_k", fails_after_two)
    monkeypatch.setattr(bench_serving.peers, "make_inputs", no_memory_at_one_candidate)
    args = bench_serving.build_parser().parse_args(
        ["--dry-run", "--backends", "torch", "--dtypes", "float32"])
    recorded = []
    rows = bench_serving.measure_grid(args, bench_serving.Grid.of(args),
                                      lambda so_far: recorded.append(len(so_far)))
    assert recorded[0] == 1 and recorded[1] == len(rows)    # written after each shape
    shape = rows[0]
    assert (shape["path"], shape["candidates"], shape["requests"]) == ("all paths", 1, 0)
    assert shape["note"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    by_path = {r["path"]: r for r in rows[1:]}
    dot = by_path["two_stage_dot_K4"]
    assert dot["note"] == ("timed requests: RuntimeError: CUDA error: an illegal memory "
                           "access was encountered")
    assert math.isnan(dot["p50_ms"]) and dot["rel_error"] < 1e-5
    for path in ("exact", "two_stage_din_K4", "flop_floor"):
        assert by_path[path]["p50_ms"] > 0 and by_path[path]["note"] == ""
    bench_serving.report_grid(rows)
    out = capsys.readouterr().out
    assert "float32 T=16 C=1: not measured: RuntimeError: CUDA out of memory" in out
    assert "T=16 C=4 two_stage_dot_K4 (torch): failed: timed requests: RuntimeError" in out


def test_bench_serving_runs_the_serving_target_first_and_one_k_on_the_torch_backend():
    """The serving target's shape in every dtype before the other shapes; on
    CUDA the torch backend's two-stage paths take the first K only."""
    args = bench_serving.build_parser().parse_args(
        ["--grid-lengths", "1000", "10000", "--grid-candidates", "1", "512", "--dtypes",
         "bfloat16", "float32", "--backends", "triton", "torch", "--top-k", "2", "3"])
    bf16, fp32 = torch.bfloat16, torch.float32
    assert bench_serving.grid_order(args) == [
        (bf16, 10000, 512), (fp32, 10000, 512), (bf16, 1000, 1), (bf16, 1000, 512),
        (bf16, 10000, 1), (fp32, 1000, 1), (fp32, 1000, 512), (fp32, 10000, 1)]
    inputs = bench_serving.peers.make_inputs(1, 3, 8, 64, (80, 40), fp32, "cpu")
    two_stage = {"two_stage_din_K2", "two_stage_dot_K2", "two_stage_din_K3", "two_stage_dot_K3"}
    on_cpu = {key for key in bench_serving.grid_paths(inputs, args) if key[1]}
    assert on_cpu == {(p, b) for p in two_stage | {"exact"} for b in ("triton", "torch")}
    args.device = "cuda"    # the paths are only built, never run, here
    on_cuda = {key for key in bench_serving.grid_paths(inputs, args) if key[1]}
    assert on_cuda == on_cpu - {("two_stage_din_K3", "torch"), ("two_stage_dot_K3", "torch")}


def test_csv_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write stopped midway (a step's time limit, Ctrl-C) leaves the
    previous file as it was and no temporary file beside it."""
    path = tmp_path / "rows.csv"
    harness.write_csv([dict(impl="triton", ms=1.0)], str(path))
    before = path.read_text()

    def interrupted(self, rows):
        self.writerow(rows[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(harness.csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        harness.write_csv([dict(impl="triton", ms=2.0), dict(impl="torch", ms=3.0)], str(path))
    assert path.read_text() == before and os.listdir(tmp_path) == ["rows.csv"]


def test_gpu_report_takes_a_partial_csv_with_notes(tmp_path, capsys):
    """A serving CSV cut off inside its last row, with a row that lacks what
    it measured: the report leaves that row out, shows the cut row's missing
    figures as '-' and says both."""
    from benchmarks import gpu_report

    setting = dict(part="grid", dtype="bfloat16", length=10000, candidates=512, requests=5,
                   copy_gbps=3000.0, device="NVIDIA H100 80GB HBM3")
    rows = [dict(path="exact", backend="triton", p50_ms=4.0, p99_ms=5.0, x_floor=2.0, peak_mb=9.5,
                 rel_error=1e-3, note="", **setting),
            dict(path="exact", backend="", p50_ms=1.0, p99_ms=1.0, x_floor=1.0, peak_mb=1.0,
                 rel_error=1e-3, note="", **dict(setting, dtype="")),
            dict(path="exact", backend="torch", p50_ms=40.0, p99_ms=50.0, x_floor=20.0,
                 peak_mb=9.5, rel_error=1e-3, note="", **setting)]
    path = tmp_path / "bench_serving_GPU.csv"
    harness.write_csv(rows, str(path))
    text = path.read_text()
    # the last row cut after its shape: no requests, ceilings or device
    path.write_text(text[:text.rindex(",bfloat16,10000,512,") + len(",bfloat16,10000,512")])
    assert gpu_report.main(["--label", "GPU", "--results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bench_serving_GPU.csv line 3 has no dtype: left out" in out
    assert "bench_serving_GPU.csv line 4 is cut short: its missing figures show as -" in out
    assert "| bfloat16 | 10000 | 512 | exact (triton) | 5 | 4.000 | 5.000 | 2.0 |" in out
    assert "| bfloat16 | 10000 | 512 | exact (torch) | - | 40.000 | 50.000 | 20.0 |" in out
    assert "exact (triton) 4.00 ms (met); exact (torch) 40.00 ms (NOT met)" in out
    assert (tmp_path / "gpu_summary_GPU.md").read_text() in out


def test_cuda_test_selection_leaves_the_reference_out_and_runs_torch_last():
    from types import SimpleNamespace

    from benchmarks import cuda_test_selection

    def item(name, backend=None):
        params = {} if backend is None else {"backend": backend, "other": 1}
        return SimpleNamespace(name=name, callspec=SimpleNamespace(params=params))

    items = [item("a", "torch"), item("b", "triton"), item("c", "reference"), item("d"),
             item("e", "auto"), item("f", "torch"), SimpleNamespace(name="g")]
    deselected = []
    config = SimpleNamespace(hook=SimpleNamespace(
        pytest_deselected=lambda items: deselected.extend(i.name for i in items)))
    cuda_test_selection.pytest_collection_modifyitems(config, items)
    assert [i.name for i in items] == ["b", "d", "e", "g", "a", "f"]
    assert deselected == ["c"]


def test_two_stage_quality_records_each_model_and_resumes(tmp_path, capsys):
    """One run per (dataset, model, seed), with the history options that make
    each model; a second call runs only what has no record yet."""
    lines = [" ".join(str(v) for v in [user] + [10 + (user * 7 + t) % 30 for t in range(3 + user % 9)])
             for user in range(1, 41)]
    (tmp_path / "data").mkdir()
    write_amazon(tmp_path / "data" / "tiny", "Tiny", lines,
                 {str(item): [item % 4] for item in range(10, 40)})
    results = tmp_path / "results" / "quality"
    common = ["--data-dir", str(tmp_path / "data"), "--datasets", "tiny", "--seeds", "3",
              "--top-k", "4", "--epochs", "1", "--results", str(results)]
    assert two_stage_quality.main(common + ["--models", "full", "last", "top-category"]) == 0
    first = capsys.readouterr().out
    assert "tiny: longest history 10" in first   # users with 11 behaviours, the last the test's target
    rows = {row["model"]: row for row in harness.read_csv(str(results) + ".csv")}
    assert set(rows) == {"full", "last4", "top4-category"}
    assert [(rows[m]["max_len"], rows[m]["top_k"], rows[m]["search"]) for m in sorted(rows)] == [
        (10, "", ""), (4, "", ""), (10, 4, "category")]
    assert "--max-len 10 --top-k 4 --search category --seed 3 --epochs 1" in rows["top4-category"]["command"]
    for row in rows.values():
        assert row["dataset"] == "tiny" and row["seed"] == 3 and row["epochs_run"] == 1
        assert 0 <= row["test_gauc"] <= 1 and 0 <= row["validation_auc"] <= 1
        assert row["commit"] != "unknown"
    summary = harness.read_csv(str(results) + "_summary.csv")
    assert {(s["model"], s["runs"], s["test_gauc_mean"]) for s in summary} == {
        (m, 1, rows[m]["test_gauc"]) for m in rows}
    gain = rows["top4-category"]["test_gauc"] - rows["last4"]["test_gauc"]
    assert f"| tiny | top4-category | 3 | {gain:+.4f} |" in first
    recorded = (results / "tiny" / "full_seed3.json").stat().st_mtime_ns
    assert two_stage_quality.main(common + ["--models", "full", "top-dot"]) == 0
    assert "1 of 2 runs recorded; running 1" in capsys.readouterr().out
    assert (results / "tiny" / "full_seed3.json").stat().st_mtime_ns == recorded
    assert {r["model"] for r in harness.read_csv(str(results) + ".csv")} == {"full", "top4-dot"}
    # --report-only tabulates the records there are and runs nothing.
    assert two_stage_quality.main(common + ["--models", "full", "top-din", "--report-only"]) == 0
    assert "1 of 2 runs not recorded yet" in capsys.readouterr().out
    assert not (results / "tiny" / "top4-din_seed3.json").exists()
    assert {r["model"] for r in harness.read_csv(str(results) + ".csv")} == {"full"}
    assert two_stage_quality.main(["--data-dir", str(tmp_path / "none")]) == 0
    assert "skipped: no data at" in capsys.readouterr().out


@pytest.mark.parametrize("args, status, message", [
    (["benchmarks.bench_cpu", "--threads", "0"], 2, "--threads: must be a positive integer; got '0'"),
    (["benchmarks.bench_cpu", "--rounds", "x"], 2, "--rounds: must be a positive integer; got 'x'"),
    (["benchmarks.bench_gpu"], 2, "the following arguments are required: --pass"),
    (["benchmarks.two_stage_quality", "--jobs", "0"], 2, "--jobs: must be a positive integer; got '0'"),
    (["benchmarks.bench_gpu", "--pass", "train", "--dry-run", "--implementations", "torch"], 2,
     "--implementations must include triton"),
    (["benchmarks.bench_serving", "--dry-run", "--parts", "formats"], 2,
     "--parts formats: the model formats run on CPU only"),
    (["benchmarks.gpu_report", "--label", "nothing", "--results", "/nonexistent"], 1,
     "gpu_report: no results: forward: /nonexistent/bench_gpu_forward_nothing.csv was not written"),
])
def test_command_line_failures_say_what_is_wrong(args, status, message):
    result = run_module(*args)
    assert result.returncode == status
    assert message in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_commands_without_cuda_point_to_the_dry_run():
    bench = run_module("benchmarks.bench_gpu", "--pass", "forward")
    assert bench.returncode == 2 and "--dry-run checks the script on CPU" in bench.stderr
    serving = run_module("benchmarks.bench_serving", "--device", "cuda")
    assert serving.returncode == 2 and "--dry-run checks its code on CPU" in serving.stderr
    check = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 2 and "--dry-run runs every step on CPU" in check.stderr


@pytest.mark.parametrize("args, env, message", [
    (["--dryrun"], {}, "unknown argument '--dryrun' (takes --dry-run or nothing)"),
    (["--dry-run"], {"GPU_CHECK_BUDGET_S": "7m"},
     "GPU_CHECK_BUDGET_S must be a whole number of seconds; got '7m'"),
])
def test_gpu_check_rejects_bad_arguments(args, env, message):
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, **env))
    assert result.returncode == 2
    assert message in result.stderr


def test_gpu_check_keeps_to_its_budget(tmp_path):
    """A budget the setup uses up: every step before the report is skipped
    (the report's time is held back), each failure said, and the log (in
    $OUT) ends with each step's limit, time and exit status and the total."""
    env = dict(os.environ, GPU_CHECK_BUDGET_S="15", OUT=str(tmp_path))
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1
    log = (tmp_path / "gpu_check_dry-run-cpu.log").read_text()
    assert log == result.stdout
    steps = ("CUDA tests", "forward benchmark", "training benchmark", "serving benchmark",
             "sanitizer workload", "tuning sweep")
    for name in steps:
        assert f"=== {name}: skipped: 0s of the budget left (under 5 s)" in log
        assert f"{name} (skipped)" in log
    table = log[log.index("=== times (seconds; budget 45):"):].splitlines()
    assert table[1].split() == ["step", "limit", "took", "exit"]
    assert table[2].split()[0] == "setup"
    assert [line[:26].strip() for line in table[3:9]] == list(steps)
    assert all(line.split()[-3:] == ["0", "0", "skipped"] for line in table[3:9])
    assert table[9].startswith("report") and table[10].startswith("total, setup included")


def test_movielens_log_and_the_logistic_regressions_input(tmp_path):
    """benchmarks.movielens on a few made-up ratings: label 1 from 4 stars,
    the first genre the category, genres multi-valued, hour and weekday of
    the UTC timestamp; the one-hot rows hold one user, item and category and
    1/n per value of an n-valued feature."""
    import pyarrow.csv as pacsv

    from benchmarks.movielens import FEATURES, build_log, one_hot
    from din_fast.ctr.training import TrainConfig, load_training_data

    movies = ["movieId,title,genres", "1,A,Drama|Comedy", "2,B,Crime", "3,C,Drama"]
    (tmp_path / "movies.csv").write_text("\n".join(movies) + "\n")
    # 2018-09-24 was a Monday; 86400 * 17798 is its midnight UTC.
    ratings = [f"{u},{1 + r % 3},{(3.5, 4.0, 5.0, 2.0)[r % 4]},{86400 * 17798 + 3600 * r}"
               for u in (1, 2, 3) for r in range(10)]
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                          + "\n".join(ratings) + "\n")
    log = pacsv.read_csv(build_log(tmp_path, tmp_path / "log.csv")).to_pylist()
    assert [r["label"] for r in log[:4]] == [0, 1, 1, 0]
    assert (log[0]["category"], log[0]["genres"]) == ("Drama", "Drama|Comedy")
    assert [(r["hour"], r["weekday"]) for r in log[:2]] == [(0, 0), (1, 0)]
    config = TrainConfig(data=str(tmp_path / "log.csv"), label_column="label",
                         features=FEATURES, validation_fraction=0.2, test_fraction=0.2)
    data, splits = load_training_data(config)
    matrix = one_hot(data, splits.train).toarray()
    assert matrix.shape[0] == len(splits.train) and (splits.train.target != 0).all()
    # 1 for the user, item and category each, 1 per feature (item 1's genres 1/2 each).
    assert (matrix.sum(1) == 3 + len(FEATURES)).all()
    assert sorted(set(matrix.ravel())) == [0, 0.5, 1]


def test_movielens_trains_the_models_asked_with_one_decay_and_length(tmp_path, monkeypatch,
                                                                     capsys, one_torch_thread):
    """benchmarks.movielens --ema 0.9 --base-max-len 3 --models "BaseModel +
    features" on made-up ratings: that model alone (and the logistic
    regression) trains, with the decay and history length recorded in its
    row; no verdict without DIN."""
    from benchmarks import movielens

    movies = ["movieId,title,genres"] + [f"{m},M{m},{('Drama|Comedy', 'Crime')[m % 2]}"
                                         for m in range(1, 21)]
    (tmp_path / "movies.csv").write_text("\n".join(movies) + "\n")
    ratings = [f"{u},{1 + (u * 7 + r) % 20},{(3.5, 4.0, 5.0, 2.0)[(u + r) % 4]},"
               f"{1_500_000_000 + 3600 * (r * 40 + u)}" for u in range(1, 41) for r in range(30)]
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n"
                                          + "\n".join(ratings) + "\n")
    out = tmp_path / "movielens.csv"
    monkeypatch.setattr(sys, "argv", ["movielens", "--data", str(tmp_path), "--seeds", "0",
                                      "--epochs", "1", "--threads", "1", "--ema", "0.9",
                                      "--base-max-len", "3", "--models", "BaseModel + features",
                                      "--ablate", "--out", str(out)])
    assert movielens.main() == 0
    assert "beat" not in capsys.readouterr().out
    rows = [r for r in harness.read_csv(str(out)) if r["seed"] != ""]
    assert [(r["model"], r["ema"], r["max_len"]) for r in rows] == [
        ("BaseModel + features", 0.9, 3), ("BaseModel + features, linear part alone", "", ""),
        ("BaseModel + features, histories emptied", "", ""), ("logistic regression", "", "")]
    assert all(0 <= r["test_gauc"] <= 1 for r in rows)
    rows = [rows[0], rows[3]]
    # --combine: another run's rows join, each model once per seed, in the table's order.
    other = [dict(rows[1], seed=1), dict(model="DIN", seed=0), dict(rows[1], test_auc=0.0)]
    assert [(r["model"], r["seed"]) for r in movielens.combined([rows, other])] == [
        ("DIN", 0), ("BaseModel + features", 0), ("logistic regression", 0),
        ("logistic regression", 1)]
    assert movielens.combined([rows, other])[2]["test_auc"] == rows[1]["test_auc"]


@pytest.mark.parametrize("kind", ["base", "din"])
def test_movielens_ablations_are_the_linear_part_and_the_model_without_history(kind):
    """benchmarks.movielens --ablate's models: the linear part alone is the
    model's logits less its deep part's (the scoring MLP's), and emptied
    histories score as the model does on histories of padding alone."""
    from benchmarks.movielens import EmptiedHistories, LinearPartAlone
    from din_fast.ctr.models import MODELS, score

    torch.manual_seed(0)
    model = MODELS[kind](7, 3, embed_dim=4, mlp_hidden=(6,), features={"f": 4},
                         linear=True, backend="reference").eval()
    for parameter in model.linear.parameters():
        torch.nn.init.normal_(parameter)
    history, categories = torch.randint(1, 8, (5, 6)), torch.randint(1, 4, (5, 6))
    lengths, targets = torch.tensor([0, 1, 6, 3, 2]), torch.randint(1, 8, (5,))
    target_categories, features = torch.randint(1, 4, (5,)), {"f": torch.randint(0, 5, (5, 2))}
    inputs = (history, categories, lengths, targets, target_categories)
    with torch.no_grad():
        candidate = model.embed(targets, target_categories)
        interest = model.pool(candidate, model.embed(history, categories), lengths,
                              (target_categories, categories))
        deep = score(model.mlp, model.mlp_input, interest, candidate,
                     model.side_features(candidate, features, None))
        torch.testing.assert_close(LinearPartAlone(model)(*inputs, features=features),
                                   model(*inputs, features=features) - deep)
        padding = (torch.zeros_like(history), torch.zeros_like(categories),
                   torch.zeros_like(lengths), targets, target_categories)
        torch.testing.assert_close(EmptiedHistories(model)(*inputs, features=features),
                                   model(*padding, features=features))


def test_movielens_recipe_file_is_a_tunes_best_config_less_what_the_benchmark_sets(tmp_path):
    """benchmarks.movielens --din-config / --base-config: a best_config.json
    of din-fast tune gives its recipe; the data, label, seed, epochs, model
    and features stay the benchmark's."""
    from benchmarks.movielens import NOT_RECIPE, recipe
    from din_fast.ctr.config import TrainConfig, write_config_file

    tuned = TrainConfig(data="elsewhere.csv", label_column="clicked", features=("a",),
                        model="base", seed=7, epochs=2, lr=2e-4, l2=0.0, linear=True,
                        linear_lr=3e-2, embed_dim=8, mlp_hidden=(80, 40), min_count=3)
    path = tmp_path / "best_config.json"
    write_config_file(str(path), tuned, "test")
    settings = recipe(path)
    assert not set(NOT_RECIPE) & set(settings)
    assert (settings["lr"], settings["l2"], settings["linear_lr"], settings["embed_dim"],
            settings["mlp_hidden"], settings["min_count"]) == (2e-4, 0.0, 3e-2, 8, (80, 40), 3)
    assert TrainConfig(**settings).lr == 2e-4

def test_default_recipe_selects_on_validation_and_tests_with_train(tmp_path, capsys,
                                                                   one_torch_thread):
    """benchmarks.default_recipe on a tiny Amazon set and its cold-start
    subsample: --select runs every (candidate, model) without test metrics
    and ranks the candidates by their worst dataset; without it, train's
    test metrics and the per-dataset verdict."""
    lines = [" ".join(str(v) for v in [user] + [10 + (user * 7 + t) % 30 for t in range(4 + user % 7)])
             for user in range(1, 61)]
    (tmp_path / "data").mkdir()
    write_amazon(tmp_path / "data" / "tiny", "Tiny", lines,
                 {str(item): [item % 4] for item in range(10, 40)})
    out = tmp_path / "recipe.csv"
    common = ["--data-dir", str(tmp_path / "data"), "--datasets", "tiny", "--cold-from", "tiny",
              "--cold-users", "30", "--epochs", "1", "--out", str(out)]
    assert default_recipe.main(common + ["--select", "--candidates", "default",
                                         "min-count 2"]) == 0
    printed = capsys.readouterr().out
    assert "skipped movielens" in printed
    rows = harness.read_csv(str(out))
    runs = [r for r in rows if r["model"]]
    assert sorted((r["dataset"], r["candidate"], r["model"]) for r in runs) == sorted(
        (d, c, m) for d in ("tiny", "cold-start") for c in ("default", "min-count 2")
        for m in ("din", "base"))
    assert all(r["test_auc"] == "" and 0 <= r["validation_gauc"] <= 1 for r in runs)
    table = [r for r in rows if not r["model"]]
    assert len(table) == 4 and all(r["seeds"] == 1 for r in table)
    ranked = default_recipe.ranking(default_recipe.summary(runs, "validation"))
    assert [r[1] for r in ranked] == sorted((r[1] for r in ranked), reverse=True)
    for candidate, worst, mean, where, _, din in ranked:
        mine = {r["dataset"]: r["relaimpr_gauc_mean"] for r in table if r["candidate"] == candidate}
        assert worst == min(mine.values()) == mine[where]
        assert mean == pytest.approx(sum(mine.values()) / 2)
        assert din == pytest.approx(sum(r["din_gauc_mean"] for r in table
                                        if r["candidate"] == candidate) / 2)
    assert f"| 1 | {ranked[0][0]} | {100 * ranked[0][1]:+.2f}% |" in printed
    assert default_recipe.main(common + ["--only", "tiny", "--candidates", "default",
                                         "--seeds", "0", "1"]) == 0
    runs = [r for r in harness.read_csv(str(out)) if r["model"]]
    assert len(runs) == 4 and all(0 <= r["test_gauc"] <= 1 for r in runs)
    (summary,) = default_recipe.summary(runs, "test")
    assert summary["seeds"] == 2 and summary["din_wins_every_seed"] == all(
        din["test_gauc"] > base["test_gauc"] for din, base in zip(runs[0::2], runs[1::2]))
    assert default_recipe.relaimpr(0.8, 0.75) == pytest.approx(0.2)
