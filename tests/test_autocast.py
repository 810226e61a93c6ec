"""torch.autocast (bfloat16 on CPU) with float32 parameters: din_fast takes
the query, keys and values in the autocast dtype, keeps float32 accumulation,
and its outputs and gradients stay within SPEC's bfloat16 tolerance of the
float64 reference on the same (bfloat16) inputs; parameter gradients stay
float32."""

import pytest
import torch

import din_fast
from din_fast.compat.deepctr import AttentionSequencePoolingLayer

B, T, D = 6, 9, 8
BF16_TOLERANCE = 2e-2


def _within(got, expected):
    """SPEC's relative bfloat16 tolerance; the floor covers gradients that are
    0 in exact arithmetic (a score bias under a softmax)."""
    return (got.double() - expected).norm() <= BF16_TOLERANCE * expected.norm() + 1e-6


@pytest.mark.parametrize("activation,normalization", [("sigmoid", None), ("prelu", "softmax"),
                                                      ("dice", "softmax")])
def test_dinattention_under_autocast(activation, normalization):
    torch.manual_seed(0)
    layer = din_fast.DINAttention(D, (16, 8), activation=activation, normalization=normalization,
                                  backend="torch").eval()
    project = torch.nn.Linear(D, D)           # makes a bfloat16 query under autocast
    features = torch.randn(B, D)
    keys = torch.randn(B, T, D, requires_grad=True)   # an embedding lookup: float32
    lengths = torch.tensor([9, 0, 4, 1, 7, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        query = project(features)
        assert query.dtype == torch.bfloat16
        query.retain_grad()
        out = layer(query, keys, lengths)
    assert out.dtype == torch.bfloat16
    cotangent = torch.randn(out.shape)
    (out.float() * cotangent).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad.dtype == torch.float32, name

    # The oracle: the same bfloat16 inputs, everything in float64.
    reference = din_fast.DINAttention(D, (16, 8), activation=activation,
                                      normalization=normalization, backend="reference")
    reference.load_state_dict(layer.state_dict())
    reference.double().eval()
    query64 = query.detach().double().requires_grad_()
    keys64 = keys.detach().bfloat16().double().requires_grad_()
    expected = reference(query64, keys64, lengths)
    (expected * cotangent.double()).sum().backward()

    assert _within(out, expected)
    assert _within(query.grad, query64.grad)
    assert _within(keys.grad, keys64.grad)
    expected_grads = dict(reference.named_parameters())
    for name, parameter in layer.named_parameters():
        assert _within(parameter.grad, expected_grads[name].grad), name


def test_jagged_and_peer_adapter_under_autocast():
    torch.manual_seed(1)
    layer = AttentionSequencePoolingLayer(att_hidden_units=(16, 8), embedding_dim=D,
                                          weight_normalization=True)
    for parameter in layer.parameters():   # away from the peer's N(0, 1e-4) init
        torch.nn.init.normal_(parameter, std=0.3)
    query, keys = torch.randn(B, 1, D), torch.randn(B, T, D)
    lengths = torch.tensor([[9], [0], [4], [1], [7], [2]])
    expected = layer.double()(query.bfloat16().double(), keys.bfloat16().double(), lengths)
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(query, keys, lengths)
    assert out.dtype == torch.bfloat16
    assert _within(out, expected)

    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.view(-1).cumsum(0)])
    values = torch.cat([keys[b, :n] for b, n in enumerate(lengths.view(-1).tolist())])
    weights = [layer.local_att.dnn.linears[i].weight for i in range(2)] + \
        [layer.local_att.dense.weight]
    biases = [layer.local_att.dnn.linears[i].bias for i in range(2)] + \
        [layer.local_att.dense.bias]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        jagged = din_fast.din_attention_jagged(query.squeeze(1), values, offsets, T,
                                               weights=weights, biases=biases,
                                               normalization="softmax")
    assert jagged.dtype == torch.bfloat16
    nonempty = lengths.view(-1) > 0     # the peer averages the padding of an empty row
    assert _within(jagged[nonempty], expected.squeeze(1)[nonempty])
