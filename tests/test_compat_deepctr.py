"""din_fast.compat.deepctr against the real DeepCTR-Torch layer: a peer
checkpoint loads with strict=True and gives the same outputs, gradients and
(Dice, training) BatchNorm statistics, for every activation and option."""

import pytest
import torch

from din_fast.compat.deepctr import AttentionSequencePoolingLayer
from peers import deepctr_sequence_module

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


def _assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, what
    # float64 on both sides; the floor covers gradients that are 0 in exact
    # arithmetic (the score bias under a softmax) and round to ~1e-17.
    error = (ours - theirs).norm()
    assert error <= 1e-10 * theirs.norm() + 1e-12, f"{what}: error {error:.3g}"


# Every activation (the peer's names, any case) with an orthogonal array of
# (weight_normalization, return_score, supports_masking): every pair of
# option values meets at least once.
OPTIONS = [(activation,) + flags
           for activation in ("sigmoid", "relu", "prelu", "Dice")
           for flags in ((False, False, False), (False, True, True),
                         (True, False, True), (True, True, False))]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("activation,weight_normalization,return_score,supports_masking",
                         OPTIONS)
def test_matches_peer(activation, weight_normalization, return_score, supports_masking,
                      backend):
    generator = torch.Generator().manual_seed(len(activation) + 2 * weight_normalization
                                              + 4 * return_score + 8 * supports_masking)
    options = dict(weight_normalization=weight_normalization, return_score=return_score,
                   supports_masking=supports_masking)
    peer, ours = _pair(activation, generator, **options)
    ours.backend = backend
    query, keys, lengths, mask = _inputs(generator)
    modes = ("train", "eval") if activation == "Dice" else ("eval",)
    for mode in modes:
        for layer in (peer, ours):
            layer.train(mode == "train")
        shape = (B, 1, T) if return_score else (B, 1, E)
        cotangent = torch.randn(shape, generator=generator, dtype=torch.float64)
        # Dice in training moves the running statistics: start from equal states.
        ours.load_state_dict(peer.state_dict())
        expected, expected_grads = _run(peer, query, keys, lengths, mask, cotangent)
        got, got_grads = _run(ours, query, keys, lengths, mask, cotangent)
        _assert_close(got, expected, f"{mode} output")
        assert got_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            _assert_close(got_grads[name], grad, f"{mode} gradient of {name}")
        for name, buffer in peer.state_dict().items():
            assert torch.allclose(ours.state_dict()[name], buffer, rtol=1e-12, atol=0), name


def test_dice_with_a_negative_batchnorm_weight_matches_peer():
    """A BatchNorm weight <= 0 cannot fold into SPEC's Dice: the adapter then
    scores over the padding as the peer does, in eval mode too."""
    generator = torch.Generator().manual_seed(7)
    peer, ours = _pair("dice", generator, weight_normalization=True)
    with torch.no_grad():
        peer.local_att.dnn.activation_layers[1].bn.weight[0] = -0.7
    ours.load_state_dict(peer.state_dict(), strict=True)
    peer.eval()
    ours.eval()
    query, keys, lengths, mask = _inputs(generator)
    cotangent = torch.randn(B, 1, E, generator=generator, dtype=torch.float64)
    expected, expected_grads = _run(peer, query, keys, lengths, mask, cotangent)
    got, got_grads = _run(ours, query, keys, lengths, mask, cotangent)
    _assert_close(got, expected, "output")
    for name, grad in expected_grads.items():
        _assert_close(got_grads[name], grad, f"gradient of {name}")


def test_same_seed_same_initialization():
    peer_cls = deepctr_sequence_module().AttentionSequencePoolingLayer
    for activation in ("sigmoid", "prelu", "dice"):
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


def test_errors_use_the_peer_argument_names():
    layer = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, embedding_dim=E)
    query, keys = torch.randn(B, 1, E), torch.randn(B, T, E)
    with pytest.raises(ValueError, match="AttentionSequencePoolingLayer: `keys_length`"):
        layer(query, keys, torch.full((B, 1), T + 1))
    with pytest.raises(TypeError, match="`keys_length`"):
        layer(query, keys, torch.ones(B, 1))
    with pytest.raises(ValueError, match="`query`"):
        layer(query.squeeze(1), keys, torch.ones(B, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="`att_activation`"):
        AttentionSequencePoolingLayer(att_activation="linear")
    masked = AttentionSequencePoolingLayer(att_hidden_units=HIDDEN, embedding_dim=E,
                                           supports_masking=True)
    with pytest.raises(ValueError, match="`mask`"):
        masked(query, keys, None)
