"""Test session setup.

Without a GPU, the Triton kernels run in the interpreter on CPU tensors. The
variable must be set before any kernel is decorated (triton reads it then),
so before din_fast.kernels is imported by a test module.
"""

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Property tests draw the same examples on every run (CI must not pass or
# fail by chance); HYPOTHESIS_PROFILE=explore draws new ones each run.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output buffer of the fused forward starts as NaN, so an element
    the kernel skips fails the test."""
    from din_fast.kernels import din_forward

    def allocate(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(din_forward, "allocate", allocate)
