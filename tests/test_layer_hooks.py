"""DINAttention and the peer adapters read their layers' weights without
calling the layers: weight reparametrizations must still hold, through a
load_state_dict, in forward and backward, on every backend.

The oracle calls each layer (nn.Linear's own computation, hooks and all) to
find the weights it applies, then runs the reference backend on them."""

import pytest
import torch
from torch.nn.utils import parametrizations, prune, spectral_norm, weight_norm

import din_fast
from din_fast.compat.deepctr import AttentionSequencePoolingLayer
from din_fast.compat.fuxictr import DIN_Attention

D, HIDDEN = 5, (6, 4)


def _applied(linear, dtype):
    """(W, b) that calling ``linear`` applies: its own forward, hooks included."""
    eye = torch.eye(linear.in_features, dtype=dtype)
    bias = linear(torch.zeros(1, linear.in_features, dtype=dtype))[0]
    return (linear(eye) - bias).t(), bias


def _reparametrized(kind, seed, dtype):
    torch.manual_seed(seed)
    layer = din_fast.DINAttention(D, HIDDEN, activation="prelu", normalization="softmax")
    layer.to(dtype)
    if kind == "weight_norm":                    # the old API: a forward pre-hook
        weight_norm(layer.hidden[0])
        weight_norm(layer.output, name="bias", dim=0)
    elif kind == "prune":
        prune.l1_unstructured(layer.hidden[0], "weight", amount=0.5)
        prune.random_unstructured(layer.hidden[1], "bias", amount=0.5)
    elif kind == "spectral_norm":
        spectral_norm(layer.hidden[1])
    else:                                        # the new API: torch.nn.utils.parametrize
        parametrizations.weight_norm(layer.hidden[0])
        parametrizations.spectral_norm(layer.output)
    return layer


def _inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(4, D, generator=gen, dtype=torch.float64)
    keys = torch.randn(4, 7, D, generator=gen, dtype=torch.float64)
    return query.to(dtype), keys.to(dtype), torch.tensor([7, 0, 3, 5])


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("kind", ["weight_norm", "prune", "spectral_norm", "parametrize"])
def test_reparametrized_layers_after_load_state_dict(kind, backend):
    """Forward once (the old APIs cache ``weight``), load other values, and
    the forward and every gradient are those of the layers' own computation."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = _reparametrized(kind, 0, dtype).eval()
    layer.backend = backend
    query, keys, lengths = _inputs(dtype)
    layer(query, keys, lengths)
    layer.load_state_dict(_reparametrized(kind, 1, dtype).state_dict())
    out = layer(query, keys, lengths)
    weights, biases = zip(*(_applied(linear, dtype)
                            for linear in list(layer.hidden) + [layer.output]))
    expected = din_fast.din_attention(query, keys, lengths, weights=list(weights),
                                      biases=list(biases), activation="prelu",
                                      activation_params=list(layer.alphas),
                                      normalization="softmax", backend="reference")
    tolerance = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    parameters = list(layer.parameters())
    grads = torch.autograd.grad(out.sum(), parameters)
    expected_grads = torch.autograd.grad(expected.sum(), parameters)
    for grad, want in zip(grads, expected_grads):
        torch.testing.assert_close(grad, want, **tolerance)


def test_pruned_layer_in_jagged_and_dice_training_forwards():
    """forward_jagged and training-mode Dice (the torch backend's own path)
    read the pruned weights too: the layer equals its twin holding them."""
    torch.manual_seed(0)
    layer = din_fast.DINAttention(D, HIDDEN, activation="dice").double()
    twin = din_fast.DINAttention(D, HIDDEN, activation="dice").double()
    prune.random_unstructured(layer.hidden[0], "weight", amount=0.5)
    mask = (torch.rand(HIDDEN[0], 4 * D) < 0.5).double()
    layer.load_state_dict({**layer.state_dict(), "hidden.0.weight_mask": mask})
    state = {name.replace("_orig", ""): value for name, value in layer.state_dict().items()
             if not name.endswith("_mask")}
    twin.load_state_dict({**state, "hidden.0.weight": state["hidden.0.weight"] * mask})
    query, keys, lengths = _inputs(torch.float64)
    torch.testing.assert_close(layer(query, keys, lengths), twin(query, keys, lengths))
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    jagged = torch.cat([keys[b, :n] for b, n in enumerate(lengths.tolist())])
    layer.eval(), twin.eval()
    torch.testing.assert_close(layer.forward_jagged(query, jagged, offsets, 7),
                               twin.forward_jagged(query, jagged, offsets, 7))


def _needs_input(module, inputs):
    return inputs[0].shape


@pytest.mark.parametrize("register,hook_name", [
    (lambda linear: linear.register_forward_hook(lambda m, i, o: None), "<lambda>"),
    (lambda linear: linear.register_full_backward_hook(lambda m, gi, go: None), "<lambda>"),
    (lambda linear: linear.register_forward_pre_hook(_needs_input), "_needs_input"),
    (lambda linear: linear.register_forward_pre_hook(lambda m, i: (torch.zeros(1),)),
     "<lambda>")])
def test_hooks_that_cannot_run_are_named(register, hook_name):
    """A hook that needs the layer's input or output, which DINAttention
    never builds, is refused by name instead of silently skipped."""
    layer = din_fast.DINAttention(D, HIDDEN).double()
    register(layer.hidden[1])
    with pytest.raises(ValueError, match=rf"DINAttention: .*{hook_name}.*`hidden\.1`|"
                                         rf"DINAttention: `hidden\.1` has .*{hook_name}"):
        layer(*_inputs(torch.float64))


def _deepctr_pair(activation):
    from peers import deepctr_sequence_module
    options = dict(att_hidden_units=HIDDEN, att_activation=activation, embedding_dim=D)
    peer = deepctr_sequence_module().AttentionSequencePoolingLayer(**options)
    return peer, AttentionSequencePoolingLayer(**options), ("local_att.dnn.linears.0",
                                                            "local_att.dense")


def _fuxictr_pair(activation):
    from peers import fuxictr_din_attention
    options = dict(embedding_dim=D, attention_units=list(HIDDEN),
                   hidden_activations=activation, use_softmax=True)
    return fuxictr_din_attention()(**options), DIN_Attention(**options), (
        "attention_layer.mlp.0", "attention_layer.mlp.4")


@pytest.mark.parametrize("pair,activation", [  # fused, then general path
    (_deepctr_pair, "sigmoid"), (_deepctr_pair, "linear"),
    (_fuxictr_pair, "ReLU"), (_fuxictr_pair, "Tanh")])
def test_adapters_honour_reparametrized_layers(pair, activation):
    """Old-API weight_norm on the first Linear, pruning on the score Linear:
    after a load_state_dict the adapter scores as the peer, which calls them."""
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        peer, ours, (first, score) = pair(activation)
        for layer in (peer, ours):
            layer.double().eval()
            weight_norm(layer.get_submodule(first))
            prune.l1_unstructured(layer.get_submodule(score), "weight", amount=0.5)
        layers.append((peer, ours))
    (peer, ours), (other, _) = layers
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(4, D, generator=gen, dtype=torch.float64)
    keys = torch.randn(4, 7, D, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 3, 5])
    if isinstance(ours, DIN_Attention):
        inputs = (query, keys, torch.arange(7)[None, :] < lengths[:, None])
    else:
        inputs = (query[:, None], keys, lengths[:, None])
    ours(*inputs)
    for layer in (peer, ours):
        layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(ours(*inputs), peer(*inputs))
