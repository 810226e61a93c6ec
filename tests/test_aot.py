"""The compile report on its quick subset (compiles for sm_80 and sm_90, no
spills), and the forward's warp choice taken from the spec alone."""

import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from din_fast.kernels import din_forward, forward_warps  # noqa: E402


def test_quick_compile_report_is_clean():
    # A subprocess: this session may have decorated the kernels for the
    # interpreter (TRITON_INTERPRET=1), which triton.compile cannot take.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "din_fast.kernels.aot", "--quick",
                          "--arch", "80", "90", "--jobs", "1"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    for kernel, least in (("forward ", 6), ("backward[", 6), ("search[", 2)):
        rows = [line for line in run.stdout.splitlines() if line.startswith(kernel)]
        # "ok", or "ok (preferred warps spill: ...)" where the launcher takes its fallback.
        assert len(rows) >= least and all(re.search(r"\d  ok( \(.*\))?$", line) for line in rows), \
            run.stdout
        assert {"sm_80", "sm_90"} <= {word for line in rows for word in line.split()}


SPEC = din_forward.ForwardSpec(dtype=torch.float32, activation="dice", softmax=True,
                               has_lengths=True, has_mask=False, need_scores=False,
                               hidden=(200, 80), embed_dim=256, value_dim=256, candidates=1,
                               split=False)


def test_warp_count_comes_from_the_table(monkeypatch):
    """No compile on the launch path: the preferred count, or the other where
    the table lists the spec for the device's family; the interpreter takes
    the preferred."""
    preferred, other = SPEC.warp_choices()
    assert sorted((preferred, other)) == [4, 8]
    monkeypatch.setattr(din_forward, "FALLBACK", {80: {}, 90: {SPEC.key(): "listed"}})
    assert SPEC.num_warps(None) == preferred
    assert SPEC.num_warps(80) == SPEC.num_warps(86) == preferred
    assert SPEC.num_warps(90) == other


def test_warp_table_keys_name_whole_specializations():
    """A key changes with anything that selects another kernel."""
    import dataclasses

    keys = {SPEC.key(), dataclasses.replace(SPEC, has_mask=True).key(),
            dataclasses.replace(SPEC, embed_dim=250).key(),
            dataclasses.replace(SPEC, dtype=torch.bfloat16).key()}
    assert len(keys) == 4
    assert all(isinstance(entries, dict) for entries in forward_warps.FALLBACK.values())
