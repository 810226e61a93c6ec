"""The kernel launchers' own guarantees, which no public call can reach
through validation: nothing is read outside the tensors whatever the
offsets hold, every launch runs on the tensors' device, and the TF32 choice
is read in a way that works under either of PyTorch's precision APIs."""

import dataclasses

import pytest
import torch

import din_fast
from din_fast.kernels import din_backward as bwd
from din_fast.kernels import common, din_forward as fwd
from din_fast.problem import validate_jagged
from helpers import DEVICE, make_case, on_device


def jagged_problem(offsets, total=7, max_len=6):
    case = on_device(make_case(2, 2, 1, 3, (4, 2), normalization="softmax", seed=2))
    keys = torch.randn(total, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    good = torch.tensor([0, 3, total], device=DEVICE)
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
    problem = validate_jagged(case["query"], keys, good, max_len, dice_eps=1e-8, values=None,
                              **{k: v for k, v in kwargs.items() if k != "values"})
    return dataclasses.replace(problem, offsets=torch.tensor(offsets, device=DEVICE))


@pytest.mark.parametrize("bad, clamped", [
    ([0, 3, 100], [0, 3, 7]),        # an end past the L rows
    ([-5, 3, 7], [0, 3, 7]),         # a negative start
    ([0, 9, 4], [0, 7, 7]),          # a start past L, an end before its start
])
def test_jagged_kernel_clamps_offsets(bad, clamped):
    """Validation rejects such offsets (on CUDA only asynchronously); the
    kernel itself clamps each row into the L rows, so it never reads outside
    keys_values even when called with them."""
    got = fwd.din_forward_jagged(jagged_problem(bad), need_scores=False)[0]
    want = fwd.din_forward_jagged(jagged_problem(clamped), need_scores=False)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_jagged_reference_pads_to_the_longest_row_not_max_len():
    """max_len is only a bound: the oracle must not build [B, max_len, D]."""
    case = make_case(3, None, 4, 3, (4,), seed=1)
    keys = torch.randn(6, 3, dtype=case["keys"].dtype)
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths", "values")}
    offsets = torch.tensor([0, 2, 2, 6])
    huge = din_fast.din_attention_jagged(case["query"], keys, offsets, 10 ** 12,
                                         backend="reference", **kwargs)
    tight = din_fast.din_attention_jagged(case["query"], keys, offsets, 4, backend="reference",
                                          **kwargs)
    torch.testing.assert_close(huge, tight, rtol=0, atol=0)


def test_every_launch_runs_under_the_tensors_device(monkeypatch):
    """Triton launches on the current device: each launcher must enter the
    tensors' device first (a model on cuda:1 without torch.cuda.set_device)."""
    entered = []
    real = common.launch_device

    def recording(device):
        entered.append(torch.device(device))
        return real(device)
    monkeypatch.setattr(fwd, "launch_device", recording)
    monkeypatch.setattr(bwd, "launch_device", recording)
    case = on_device(make_case(3, 2, 5, 4, (4, 2), normalization="softmax", seed=3))
    case = {k: v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v for k, v in case.items()}
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
    out = din_fast.din_attention(case["query"], case["keys"], case["lengths"], backend="triton",
                                 **kwargs)
    out.sum().backward()
    offsets = torch.tensor([0, 2, 2, 5], device=DEVICE)
    din_fast.din_attention_jagged(case["query"], case["keys"][0].detach(), offsets, 5,
                                  backend="triton", **kwargs)
    assert len(entered) >= 3       # forward, backward, jagged forward
    assert all(device == case["keys"].device for device in entered)


@pytest.fixture
def restore_precision():
    """The precision flags as they were (the test sets the new API, after which
    reading the legacy flag would raise)."""
    matmul = torch.backends.cuda.matmul
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="this torch has only the legacy allow_tf32 flag")
@pytest.mark.parametrize("matmul, overall, expected", [
    ("tf32", "none", True), ("ieee", "none", False), ("none", "tf32", True),
    ("none", "ieee", False), ("none", "none", False)])
def test_tf32_read_through_the_new_precision_api(restore_precision, matmul, overall, expected):
    torch.backends.fp32_precision = overall
    torch.backends.cuda.matmul.fp32_precision = matmul
    assert common.cuda_matmul_tf32() is expected
