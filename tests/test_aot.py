"""The compile report on its quick subset: compiles for sm_80 and sm_90, no spills."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_quick_compile_report_is_clean():
    # A subprocess: this session may have decorated the kernels for the
    # interpreter (TRITON_INTERPRET=1), which triton.compile cannot take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "din_fast.kernels.aot", "--quick",
                          "--arch", "80", "90", "--jobs", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for kernel in ("forward ", "backward["):
        rows = [line for line in run.stdout.splitlines() if line.startswith(kernel)]
        # "ok", or "ok (preferred warps spill: ...)" where the launcher takes its fallback.
        assert len(rows) >= 6 and all(re.search(r"\d  ok( \(.*\))?$", line) for line in rows), \
            run.stdout
        assert {"sm_80", "sm_90"} <= {word for line in rows for word in line.split()}


def test_first_spill_free_takes_the_first_clean_warp_count(monkeypatch):
    from din_fast.kernels import compiled

    stack = {4: 16, 8: 0, 2: 0}
    monkeypatch.setattr(compiled, "resource_usage",
                        lambda kernel, sig, const, aligned, warps, stages, arch:
                        dict(warps=warps, stack=stack[warps], local=0))
    pick = compiled.first_spill_free
    assert pick(None, {}, {}, (), (4, 8, 2), 1, 80)["warps"] == 8
    assert pick(None, {}, {}, (), (8, 4), 1, 80)["warps"] == 8
    stack[8] = 8
    assert pick(None, {}, {}, (), (4, 8), 1, 80)["warps"] == 4   # none clean: the preferred


def test_launcher_warp_count_is_the_preferred_in_the_interpreter():
    import torch

    from din_fast.kernels.din_forward import ForwardSpec

    spec = ForwardSpec(dtype=torch.float32, activation="dice", softmax=True, has_lengths=True,
                       has_mask=False, need_scores=False, hidden=(200, 80), embed_dim=256,
                       value_dim=256, candidates=1, split=False, interpret=True)
    assert spec.num_warps(None) == spec.warp_choices()[0]
    assert sorted(spec.warp_choices()) == [4, 8]
