"""The fused backward kernel against float64 reference gradients, through
backend="triton" (fused forward, custom op, fused backward), in every launch
plan: one launch for everything, or the split one that wide layers take
(inputs, first layer in column blocks, deeper layers; each recomputes)."""

import pytest
import torch

from din_fast.kernels import din_backward as din_backward_module
from din_fast.kernels.din_backward import BackwardSpec
from helpers import DEVICE, assert_matches_reference, make_case, on_device, run_case

# (label, make_case arguments): every option of SPEC sections 1-3.
CASES = [
    ("sigmoid-none-lengths-2d", dict(batch=3, candidates=None, length=9, dim=5, hidden=(12, 6))),
    ("relu-softmax-mask-values", dict(batch=3, candidates=3, length=9, dim=5, hidden=(10,),
                                      activation="relu", normalization="softmax",
                                      masking="mask", value_dim=7)),
    ("prelu-softmax-3layers-scalar", dict(batch=3, candidates=2, length=9, dim=5,
                                          hidden=(9, 7, 5), activation="prelu",
                                          normalization="softmax", scalar_params=True)),
    ("dice-none-nomask-T1", dict(batch=3, candidates=2, length=1, dim=5, hidden=(12, 6),
                                 activation="dice", masking=None)),
    ("dice-softmax-lengths-3layers", dict(batch=3, candidates=1, length=20, dim=3,
                                          hidden=(6, 5, 3), activation="dice",
                                          normalization="softmax")),
    ("sigmoid-softmax-values-long", dict(batch=4, candidates=2, length=37, dim=5,
                                         hidden=(17, 3), normalization="softmax", value_dim=4)),
    ("prelu-none-mask", dict(batch=3, candidates=1, length=9, dim=16, hidden=(20,),
                             activation="prelu", masking="mask", scale=0.7)),
]
IDS = [label for label, _ in CASES]


@pytest.fixture
def fused_launches(monkeypatch):
    """The list of BackwardSpec parts the fused backward launched."""
    launched = []
    real = din_backward_module._launch_part

    def spy(part, programs, arguments):
        launched.append(part)
        real(part, programs, arguments)
    monkeypatch.setattr(din_backward_module, "_launch_part", spy)
    return launched


def case_of(arguments, dtype=torch.float32, **overrides):
    return on_device(make_case(**{**arguments, **overrides}, dtype=dtype, seed=4))


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split-launches"])
@pytest.mark.parametrize("arguments", [c for _, c in CASES], ids=IDS)
def test_fused_backward_matches_reference(arguments, split, monkeypatch, fused_launches):
    monkeypatch.setattr(BackwardSpec, "split_parts", lambda spec: split)
    assert_matches_reference(case_of(arguments), "triton")
    parts = {part.part for part in fused_launches}
    assert parts == ({"inputs", "first", "deeper"} if split else {"all"}) or \
        (split and parts == {"inputs", "first"} and len(arguments["hidden"]) == 1)


@pytest.mark.parametrize("arguments", [c for _, c in CASES], ids=IDS)
def test_torch_backward_matches_reference(arguments):
    assert_matches_reference(case_of(arguments, torch.float64), "torch")


def test_fused_backward_in_column_blocks(monkeypatch, fused_launches):
    """The first layer's P sums in 16-column blocks (one launch each), as wide D
    takes them: every block's columns, dq's W_p term, G once."""
    monkeypatch.setattr(din_backward_module, "accumulator_budget", lambda dtype: 256)
    monkeypatch.setattr(BackwardSpec, "split_parts", lambda spec: True)
    monkeypatch.setattr(din_backward_module, "backward_unsupported_shape", lambda *shape: None)
    assert_matches_reference(case_of(dict(batch=3, candidates=2, length=19, dim=40,
                                          hidden=(24, 8), activation="dice",
                                          normalization="softmax", value_dim=5)), "triton")
    assert [p.first_dc for p in fused_launches if p.part == "first"] == [16] * 4


@pytest.mark.parametrize("split", [False, True], ids=["one-launch", "split-launches"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_backward_half_inputs(dtype, split, monkeypatch, fused_launches):
    """Half-precision inputs, float32 parameters: against float64 on the rounded inputs."""
    monkeypatch.setattr(BackwardSpec, "split_parts", lambda spec: split)
    case = on_device(make_case(3, 2, 9, 16, (24, 8), normalization="softmax", value_dim=6,
                               dtype=dtype, param_dtype=torch.float32, seed=2))
    assert_matches_reference(case, "triton")
    assert fused_launches


def test_wide_first_layer_takes_the_torch_backward(fused_launches):
    """Widths past the fused backward's on-chip budget: fused forward, the
    torch backend's backward op, the same gradients."""
    assert_matches_reference(case_of(dict(batch=2, candidates=1, length=5, dim=64,
                                          hidden=(200,))), "triton")
    assert not fused_launches


def test_fused_backward_is_bitwise_deterministic():
    case = case_of(dict(batch=5, candidates=2, length=9, dim=5, hidden=(12, 6),
                        activation="prelu", normalization="softmax", value_dim=3))
    first, second = run_case(case, "triton"), run_case(case, "triton")
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.xfail(strict=DEVICE == "cpu", reason=(
    "known defect, not fixed: the fused kernels cast float32 parameters to the "
    "inputs' bfloat16 for their dots (kernels.common.fold_parameters: W_p, "
    "W_k - W_d and the deeper W_i), so a pre-activation within ~3e-3 of PReLU's kink (here -2.6e-3, unit 11) "
    "takes the other slope: grad W_1 is 49% off the float64 reference, grad "
    "keys 29%, against SPEC's 2e-2 for bfloat16 (the torch backend: 4e-3)"))
def test_bfloat16_inputs_near_a_kink_of_prelu():
    case = on_device(make_case(3, 2, 9, 16, (24, 8), activation="prelu",
                               normalization="softmax", value_dim=6, dtype=torch.bfloat16,
                               param_dtype=torch.float32, seed=2))
    assert_matches_reference(case, "triton")
