"""Values (SPEC sections 3 and 4): any finite scale, up to +-1e30, with softmax
gives finite outputs and gradients equal to the float64 reference wherever the
reference is finite.

How close float32 can be depends on the scale: an error e in a score moves
its softmax weight by about |scale| e. Between the regimes where the weights
are exact (|scale| * |s| small) and where they are one-hot (every row's top
two scores apart by far more than 1 / |scale|) the tolerance grows with
|scale| * max |s|, which is what float32 scores can promise there.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import din_fast
from helpers import (BACKENDS, backend_dtype, backend_settings, call_din_attention, cases,
                     leaf_copy, make_case, map_tensors, outputs_and_grads, tolerance)

SCALES = [sign * 10.0 ** e for e in (-30, -3, 0, 1, 3, 10, 30) for sign in (1, -1)]
# The relative error of float32 results at well-conditioned scales: twice the
# bound of one result (the fused backward's TF32 on a GPU included).
FLOAT32 = 2 * tolerance(torch.float32, gradients=True)


def conditioning(case):
    """(max |scale * s|, smallest |scale| * (top1 - top2) over the rows) from
    the float64 reference's raw scores."""
    raw = dict(map_tensors(case, torch.Tensor.double), normalization=None, scale=1.0)
    _, scores = call_din_attention(raw, "reference")
    scale = abs(case["scale"])
    if scores.numel() == 0:
        return 0.0, float("inf")
    valid = scores != 0
    spread = (scale * scores.abs()).max().item()
    top = torch.where(valid, scores * case["scale"], torch.tensor(float("-inf"),
                                                                 dtype=scores.dtype))
    top2 = top.topk(min(2, top.shape[-1]), dim=-1).values
    gaps = (top2[..., 0] - top2[..., -1]).abs() if top.shape[-1] > 1 else top2[..., 0]
    gaps = gaps[torch.isfinite(gaps) & (gaps > 0)]
    return spread, gaps.min().item() if gaps.numel() else float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_softmax_scales(backend):
    dtype = backend_dtype(backend)

    @backend_settings(backend, 1.5)
    @given(cases(dtype=dtype, min_length=1, normalization=("softmax",)), st.sampled_from(SCALES))
    def check(case, scale):
        case = dict(case, scale=scale)
        mine, leaves = leaf_copy(case)
        got = outputs_and_grads(call_din_attention(mine, backend), leaves)
        exact, exact_leaves = leaf_copy(map_tensors(case, torch.Tensor.double))
        want = outputs_and_grads(call_din_attention(exact, "reference"), exact_leaves)
        spread, gap = conditioning(case)
        base = 1e-9 if dtype == torch.float64 else FLOAT32
        tolerance = base if gap > 60 else base * (1 + spread)
        for i, (g, w) in enumerate(zip(got, want)):
            assert torch.isfinite(g[torch.isfinite(w)]).all(), f"result {i}: NaN or Inf"
            error = (g.double() - w).norm() / max(w.norm(), 1e-30)
            if w.norm() > 1e-12 and tolerance < 0.1:
                assert error <= tolerance, f"result {i}: relative error {error:.2e}"
    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("jagged", [False, True])
def test_scale_beyond_float32(backend, jagged):
    """A finite scale float32 cannot hold is refused for inputs scored in
    float32, naming the range; float64 inputs take it: finite, as the reference."""
    case = make_case(3, None, 4, 4, (5,), normalization="softmax", scale=1e39)

    def run(case, on):
        args = dict(case)
        query, keys, lengths = args.pop("query"), args.pop("keys"), args.pop("lengths")
        if not jagged:
            return din_fast.din_attention(query, keys, lengths, backend=on, **args)
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        rows = torch.cat([keys[b, :n] for b, n in enumerate(lengths.tolist())])
        return din_fast.din_attention_jagged(query, rows, offsets, 4, backend=on, **args)
    with pytest.raises(ValueError, match=r"`scale` must lie in \[-3\.4028e\+38, 3\.4028e\+38\] "
                                         r"for torch\.float32 `keys(_values)?`.*got 1\.0000e\+39"):
        run(case, backend)
    if backend != "triton":                      # float64 runs on torch and reference
        case = map_tensors(case, torch.Tensor.double)
        got = run(case, backend)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, run(case, "reference"))
