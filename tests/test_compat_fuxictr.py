"""din_fast.compat.fuxictr against FuxiCTR's own DIN_Attention, on every case
of fuxictr_cases.py: against results saved once from fuxictr 2.3.10
(data/make_fuxictr_reference.py), and live where fuxictr is installed. A
FuxiCTR state_dict loads with strict=True and gives the same outputs,
gradients and BatchNorm statistics; the fused path runs where it can."""

import pathlib

import pytest
import torch

import din_fast.compat.fuxictr as fuxictr_adapter
from din_fast.compat.fuxictr import DIN_Attention
from fuxictr_cases import CASES, make_inputs, run_case
from peers import fuxictr_din_attention, record_fused_calls

DATA = pathlib.Path(__file__).parent / "data" / "fuxictr_din_attention.pt"
SAVED = torch.load(DATA, weights_only=True)["cases"]


def _unpack(packed):
    tensors, start = {}, 0
    for name, shape, dtype in zip(packed["names"], packed["shapes"], packed["dtypes"]):
        count = int(torch.Size(shape).numel())
        flat = packed["flat"][start:start + count]
        tensors[name] = flat.view(shape).to(getattr(torch, dtype.removeprefix("torch.")))
        start += count
    return tensors


def _assert_same(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for name, expected in theirs.items():
        got = ours[name]
        assert got.shape == expected.shape, name
        # float64 on both sides; the floor covers values 0 in exact arithmetic.
        error = (got.double() - expected.double()).abs().max() if got.numel() else 0.0
        assert error <= 1e-12 * max(1.0, expected.double().abs().max()), f"{name}: {error:.3g}"


def _ours(backend):
    return lambda **options: DIN_Attention(backend=backend, **options)


def _pair(**options):
    """The peer's layer with embedding_dim 4, attention_units [8] and
    ``options``, and ours (torch backend) holding its state."""
    peer = fuxictr_din_attention()(embedding_dim=4, attention_units=[8], **options)
    ours = DIN_Attention(embedding_dim=4, attention_units=[8], backend="torch", **options)
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer, ours


def test_saved_results_cover_every_case():
    assert SAVED.keys() == CASES.keys()


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_saved_fuxictr(name, backend):
    saved = _unpack(SAVED[name])
    state = {k[len("state_dict/"):]: v for k, v in saved.items() if k.startswith("state_dict/")}
    _, ours = run_case(_ours(backend), name, make_inputs(), state)
    _assert_same(ours, {k: v for k, v in saved.items() if not k.startswith("state_dict/")})


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_live_fuxictr(name):
    peer_cls = fuxictr_din_attention()
    inputs = make_inputs()
    state, theirs = run_case(peer_cls, name, inputs)
    _, ours = run_case(_ours("torch"), name, inputs, state)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_wherever_din_attention_expresses_the_peer(name, monkeypatch):
    calls = record_fused_calls(monkeypatch, fuxictr_adapter)
    run_case(_ours("torch"), name, make_inputs())
    assert bool(calls) == CASES[name].fused


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_half_precision_result_dtype_as_the_peer(mask, dtype):
    """The peer applies a mask in float32: its half-precision result is then
    float32 (without a mask, the history's dtype), on the fused path too."""
    torch.manual_seed(4)
    peer, ours = _pair(use_softmax=True)
    peer.to(dtype)
    ours.to(dtype)
    target, history = torch.randn(3, 4, dtype=dtype), torch.randn(3, 5, 4, dtype=dtype)
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = {None: None, "bool": valid, "float": valid.to(dtype)}[mask]
    expected, got = peer(target, history, mask=mask), ours(target, history, mask=mask)
    assert got.dtype == expected.dtype
    assert torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("activation", ["relu", "tanh"])  # fused, general
def test_autocast_result_dtype_as_the_peer(activation):
    """Under autocast the peer's bfloat16 scores weight the float32 history
    as given: its result is float32, with or without a mask."""
    torch.manual_seed(5)
    peer, ours = _pair(hidden_activations=activation)
    target, history = torch.randn(3, 4), torch.randn(3, 5, 4)
    for mask in (None, torch.rand(3, 5) < 0.7):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected, got = peer(target, history, mask=mask), ours(target, history, mask=mask)
        assert got.dtype == expected.dtype == torch.float32
        assert torch.allclose(got, expected, rtol=2e-2, atol=5e-2)


def test_mask_that_requires_grad_gets_the_peer_gradient():
    """The peer multiplies the scores by a numeric mask: one of 0 and 1 that
    requires grad gets that gradient, which the fused path would not give."""
    torch.manual_seed(6)
    peer, ours = _pair(use_softmax=True)
    target, history = torch.randn(3, 4), torch.randn(3, 5, 4)
    grads = []
    for layer in (peer, ours):
        mask = (torch.arange(5) < torch.tensor([[5], [2], [0]])).double().requires_grad_()
        layer(target, history, mask=mask).sum().backward()
        grads.append(mask.grad)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("activation", ["tanh", "dice"])
def test_empty_batch_on_the_general_path_as_the_peer(activation):
    """B = 0 in training mode (the general path): an empty result and the
    peer's BatchNorm statistics, no reshape error."""
    peer, ours = _pair(hidden_activations=activation)
    target, history = torch.randn(0, 4), torch.randn(0, 5, 4)
    mask = torch.zeros(0, 5, dtype=torch.bool)
    expected, got = peer(target, history, mask=mask), ours(target, history, mask=mask)
    assert got.shape == expected.shape == (0, 4)
    for name, tensor in peer.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], tensor, equal_nan=True)


def test_errors_use_the_peer_argument_names():
    layer = DIN_Attention(embedding_dim=4, attention_units=[8])
    target, history = torch.randn(3, 4), torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="DIN_Attention: `target_item`"):
        layer(target[:2], history)
    with pytest.raises(ValueError, match="`history_sequence`"):
        layer(target, history[0])
    with pytest.raises(ValueError, match="`mask`"):
        layer(target, history, mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="`mask`"):
        layer(target, history, mask=torch.ones(3, 5, dtype=torch.complex64))
    general = DIN_Attention(embedding_dim=4, attention_units=[8], hidden_activations="Tanh")
    with pytest.raises(ValueError, match="DIN_Attention: `mask`"):
        general(target, history, mask=torch.full((3, 4), 0.5))
    with pytest.raises(ValueError, match="`hidden_activations`"):
        DIN_Attention(hidden_activations="no_such_activation")
    with pytest.raises(ValueError, match="`hidden_activations`"):
        DIN_Attention(attention_units=[4, 4], hidden_activations=["relu"])
    with pytest.raises(ValueError, match="`hidden_activations`"):
        DIN_Attention(hidden_activations=[torch.relu])
    with pytest.raises(ValueError, match="`output_activation`"):
        DIN_Attention(output_activation="prelu")
    with pytest.raises(ValueError, match="`dropout_rate`"):
        DIN_Attention(attention_units=[4, 4], dropout_rate=[0.1])
    with pytest.raises(ValueError, match="`attention_units`"):
        DIN_Attention(attention_units=[0])
