"""din_fast.compat.deepctr against the real DeepCTR-Torch layer: a peer
checkpoint loads with strict=True and gives the same outputs, gradients and
(Dice, training) BatchNorm statistics, for every activation the peer takes,
every option and every keys_length the peer reads; the fused path runs where
it can."""

import pytest
import torch
from torch import nn

import din_fast.compat.deepctr as deepctr_adapter
from din_fast.compat.deepctr import AttentionSequencePoolingLayer
from peers import deepctr_sequence_module, record_fused_calls

B, T, E, HIDDEN = 5, 6, 4, (8, 4)
LENGTHS = [6, 0, 3, 1, 5]  # a full row and an empty one


def _randomize(module, generator):
    """Peer parameters and BatchNorm buffers away from their near-constant init."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith("bn.weight"):
                values = values.abs() + 0.5
            tensor.copy_(values)


def _pair(activation, generator, **options):
    peer_cls = deepctr_sequence_module().AttentionSequencePoolingLayer
    peer = peer_cls(att_hidden_units=HIDDEN, att_activation=activation, embedding_dim=E,
                    **options).double()
    _randomize(peer, generator)
    ours = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, att_activation=activation,
                                         embedding_dim=E, **options).double()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer, ours


def _inputs(generator):
    query = torch.randn(B, 1, E, generator=generator, dtype=torch.float64)
    keys = torch.randn(B, T, E, generator=generator, dtype=torch.float64)
    lengths = torch.tensor(LENGTHS)[:, None]
    mask = torch.arange(T)[None, :] < lengths
    mask[3] = torch.tensor([False, True, False, True, True, False])  # not a prefix
    return query, keys, lengths, mask


def _run(layer, query, keys, lengths, mask, cotangent):
    query = query.clone().requires_grad_()
    keys = keys.clone().requires_grad_()
    layer.zero_grad()
    out = layer(query, keys, lengths, mask)
    (out * cotangent).sum().backward()
    grads = {"query": query.grad, "keys": keys.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return out, grads


def _assert_close(ours, theirs, what, tolerance=1e-12):
    assert ours.shape == theirs.shape, what
    assert ours.dtype == theirs.dtype, what
    # Relative, with a floor of 1 for values 0 in exact arithmetic (the score
    # bias's gradient under a softmax) that round to ~1e-15.
    error = (ours.double() - theirs.double()).norm()
    assert error <= tolerance * max(theirs.double().norm(), 1.0), f"{what}: error {error:.3g}"


def _assert_matches(peer, ours, query, keys, lengths, mask, generator, tolerance=1e-12):
    """Same output, gradients and buffers after one forward and backward from
    equal states."""
    ours.load_state_dict(peer.state_dict())
    shape = (B, 1, T) if peer.return_score else (B, 1, E)
    cotangent = torch.randn(shape, generator=generator, dtype=torch.float64).to(keys.dtype)
    expected, expected_grads = _run(peer, query, keys, lengths, mask, cotangent)
    got, got_grads = _run(ours, query, keys, lengths, mask, cotangent)
    _assert_close(got, expected, "output", tolerance)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        _assert_close(got_grads[name], grad, f"gradient of {name}", tolerance)
    for name, buffer in peer.state_dict().items():
        _assert_close(ours.state_dict()[name], buffer, name, tolerance)


# Every activation the peer takes: its names (any case) and nn.Module
# classes, fused or not.
FUSED = ["sigmoid", "relu", "prelu", "Dice", nn.Sigmoid, nn.ReLU, nn.PReLU]
GENERAL = ["linear", "LINEAR", nn.Tanh, nn.LeakyReLU, nn.ELU, nn.Identity, nn.SiLU]
# An orthogonal array of (weight_normalization, return_score, supports_masking):
# every pair of option values meets at least once.
FLAGS = ((False, False, False), (False, True, True), (True, False, True), (True, True, False))


def _name(activation):
    return activation if isinstance(activation, str) else activation.__name__


# The general path runs the peer's layers whatever the backend: one is enough.
BACKENDS = [(a, backend) for a in FUSED for backend in ("torch", "reference")] \
    + [(a, "torch") for a in GENERAL]


@pytest.mark.parametrize("flags", FLAGS, ids=str)
@pytest.mark.parametrize("activation,backend", BACKENDS,
                         ids=[f"{_name(a)}-{b}" for a, b in BACKENDS])
def test_matches_peer(activation, backend, flags):
    weight_normalization, return_score, supports_masking = flags
    generator = torch.Generator().manual_seed(len(_name(activation)) + FLAGS.index(flags))
    peer, ours = _pair(activation, generator, weight_normalization=weight_normalization,
                       return_score=return_score, supports_masking=supports_masking)
    ours.backend = backend
    query, keys, lengths, mask = _inputs(generator)
    for mode in ("train", "eval"):
        for layer in (peer, ours):
            layer.train(mode == "train")
        _assert_matches(peer, ours, query, keys, lengths, mask, generator)


@pytest.mark.parametrize("activation", FUSED + GENERAL, ids=_name)
def test_fused_wherever_din_attention_expresses_the_peer(activation, monkeypatch):
    calls = record_fused_calls(monkeypatch, deepctr_adapter)
    _, ours = _pair(activation, torch.Generator().manual_seed(0))
    query, keys, lengths, _ = _inputs(torch.Generator().manual_seed(1))
    ours.train()(query, keys, lengths)
    ours.eval()(query, keys, lengths)
    spec = {nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.PReLU: "prelu"}.get(activation)
    spec = spec or (activation.lower() if activation in FUSED else None)
    runs_fused = [spec is not None and spec != "dice", spec is not None]  # train, eval
    assert calls == [spec] * sum(runs_fused)


# keys_length as DeepCTR-Torch's models pass it ([B] from DIN's
# squeeze, [B, 1] from DIEN's unsqueeze, a strided slice of a wider id
# tensor) and as the peer reads any: above T, negative, fractional, NaN, one
# length for every row, any integer dtype.
def _wide(lengths):
    """The lengths as column 1 of a [B, 3] int64 tensor: a strided [B, 1] view."""
    wide = torch.zeros(len(lengths), 3, dtype=torch.int64)
    wide[:, 1] = torch.tensor(lengths)
    return wide[:, 1:2]


KEYS_LENGTHS = {
    "column": lambda: torch.tensor(LENGTHS)[:, None],
    "flat": lambda: torch.tensor(LENGTHS),
    "strided_column": lambda: _wide(LENGTHS),
    "strided_flat": lambda: _wide(LENGTHS)[:, 0],
    "above_t_and_negative": lambda: torch.tensor([[T + 3], [-2], [3], [10 ** 12], [-(10 ** 12)]]),
    "one_for_all": lambda: torch.tensor([[T + 1]]),
    "one_for_all_expanded": lambda: torch.tensor([2]).expand(B),
    "int32": lambda: torch.tensor(LENGTHS, dtype=torch.int32)[:, None],
    "uint8": lambda: torch.tensor([6, 0, 3, 200, 5], dtype=torch.uint8)[:, None],
    "float": lambda: torch.tensor([[2.5], [float("nan")], [float("inf")], [-0.5], [7.0]],
                                  dtype=torch.float64),
    "float32_strided": lambda: torch.tensor([[0.0, 1.2], [0.0, -3.0], [0.0, 4.0], [0.0, 9.9],
                                             [0.0, 0.0]])[:, 1:],
}


@pytest.mark.parametrize("form", sorted(KEYS_LENGTHS))
@pytest.mark.parametrize("activation,backend", [("sigmoid", "torch"), ("sigmoid", "reference"),
                                                ("sigmoid", "triton"), ("linear", "torch")])
def test_keys_length_read_as_the_peer_reads_it(activation, backend, form):
    generator = torch.Generator().manual_seed(sorted(KEYS_LENGTHS).index(form))
    peer, ours = _pair(activation, generator, weight_normalization=True)
    ours.backend = backend
    query, keys, _, _ = _inputs(generator)
    tolerance = 1e-12
    if backend == "triton":  # the kernels take float32
        peer.float()
        ours.float()
        query, keys, tolerance = query.float(), keys.float(), 1e-5
    _assert_matches(peer, ours, query, keys, KEYS_LENGTHS[form](), None, generator, tolerance)


def test_dice_with_a_negative_batchnorm_weight_matches_peer():
    """A BatchNorm weight <= 0 cannot fold into din_fast's Dice: the adapter then
    scores over the padding as the peer does, in eval mode too."""
    generator = torch.Generator().manual_seed(7)
    peer, ours = _pair("dice", generator, weight_normalization=True)
    with torch.no_grad():
        peer.local_att.dnn.activation_layers[1].bn.weight[0] = -0.7
    peer.eval()
    ours.eval()
    query, keys, lengths, mask = _inputs(generator)
    _assert_matches(peer, ours, query, keys, lengths, mask, generator)


@pytest.mark.parametrize("layer_mode,batch_norm_mode", [("eval", "train"), ("train", "eval")])
def test_dice_batchnorm_mode_decides_not_the_layer_mode(layer_mode, batch_norm_mode):
    """A model may set its BatchNorms apart from the rest (frozen statistics
    while fine-tuning, or the reverse): Dice follows its BatchNorm's mode, as
    the peer's does."""
    generator = torch.Generator().manual_seed(8)
    peer, ours = _pair("dice", generator, weight_normalization=True)
    for layer in (peer, ours):
        layer.train(layer_mode == "train")
        for module in layer.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.train(batch_norm_mode == "train")
    query, keys, lengths, mask = _inputs(generator)
    _assert_matches(peer, ours, query, keys, lengths, mask, generator)


@pytest.mark.parametrize("weight,running_var", [(1e8, 0.0), (1e-200, 1.0)])
def test_dice_with_extreme_batchnorm_weights_matches_peer(weight, running_var):
    """Dice's BatchNorm weight g folds into din_fast's Dice as the variance
    (v + eps) / g^2: far below the peer's eps (g large on a constant unit,
    v = 0, whose normalized input is the BatchNorm bias alone) or past the
    dtype's range (g tiny), in eval mode."""
    generator = torch.Generator().manual_seed(9)
    peer, ours = _pair("dice", generator)
    first = peer.local_att.dnn.linears[0]
    bn = peer.local_att.dnn.activation_layers[0].bn
    with torch.no_grad():
        bn.weight[1] = weight
        bn.running_var[1] = running_var
        if running_var == 0:  # the unit's input 0, its mean 0
            first.weight[1] = 0.0
            first.bias[1] = 0.0
            bn.running_mean[1] = 0.0
    peer.eval()
    ours.eval()
    query, keys, lengths, mask = _inputs(generator)
    _assert_matches(peer, ours, query, keys, lengths, mask, generator)


@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice", "linear", nn.ELU, nn.PReLU],
                         ids=_name)
def test_same_seed_same_initialization(activation):
    peer_cls = deepctr_sequence_module().AttentionSequencePoolingLayer
    torch.manual_seed(3)
    peer = peer_cls(att_hidden_units=HIDDEN, att_activation=activation, embedding_dim=E)
    torch.manual_seed(3)
    ours = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, att_activation=activation,
                                         embedding_dim=E)
    assert ours.state_dict().keys() == peer.state_dict().keys()
    for name, tensor in peer.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_float32_default_backend_matches_peer():
    """The float32 call on the default backend, as a user would make it."""
    generator = torch.Generator().manual_seed(11)
    peer, ours = _pair("sigmoid", generator, weight_normalization=True)
    peer.float()
    ours.float()
    query, keys, lengths, mask = (t.float() if t.is_floating_point() else t
                                  for t in _inputs(generator))
    error = (ours(query, keys, lengths) - peer(query, keys, lengths)).norm()
    assert error <= 1e-5 * peer(query, keys, lengths).norm()


@pytest.mark.parametrize("activation", ["sigmoid", "linear"])  # fused, general
def test_float16_weight_normalization_matches_peer_where_it_is_finite(activation):
    """The peer's softmax fill -(2**32) + 1 overflows float16 to -inf: its
    rows with a valid position are still right, its empty rows NaN. The
    adapter gives the former as the peer and the mean of the keys to the
    latter, on both paths."""
    generator = torch.Generator().manual_seed(12)
    peer, ours = _pair(activation, generator, weight_normalization=True)
    peer.half()
    ours.half()
    query, keys, lengths, _ = _inputs(generator)
    query, keys = query.half(), keys.half()
    expected, got = peer(query, keys, lengths), ours(query, keys, lengths)
    assert got.dtype == torch.float16
    full = lengths[:, 0] > 0
    torch.testing.assert_close(got[full], expected[full], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[~full], keys[~full].mean(dim=1, keepdim=True),
                               rtol=1e-3, atol=1e-3)


def test_errors_use_the_peer_argument_names():
    layer = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, embedding_dim=E)
    query, keys = torch.randn(B, 1, E), torch.randn(B, T, E)
    with pytest.raises(ValueError, match="AttentionSequencePoolingLayer: `keys_length`"):
        layer(query, keys, torch.ones(B + 1, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="`keys_length`"):
        layer(query, keys, torch.ones(B, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="`keys_length`"):
        layer(query, keys, None)
    with pytest.raises(ValueError, match="`query`"):
        layer(query.squeeze(1), keys, torch.ones(B, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="`att_activation`"):
        AttentionSequencePoolingLayer(att_activation="tanh")
    with pytest.raises(ValueError, match="`att_activation`"):
        AttentionSequencePoolingLayer(att_activation=nn.Tanh())
    with pytest.raises(ValueError, match="`att_activation`"):
        AttentionSequencePoolingLayer(att_activation=nn.Linear)
    masked = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, embedding_dim=E,
                                           supports_masking=True)
    with pytest.raises(ValueError, match="`mask`"):
        masked(query, keys, None)
    general = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, embedding_dim=E,
                                            att_activation="linear", supports_masking=True)
    with pytest.raises(TypeError, match="AttentionSequencePoolingLayer: `mask`"):
        general(query, keys, None, mask=torch.ones(B, T))
