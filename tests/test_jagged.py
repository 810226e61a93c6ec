"""din_attention_jagged: equal to din_attention on the same histories padded,
never builds the padding, and rejects bad offsets by name."""

import pytest
import torch

import din_fast

B, MAX_LEN, D, HIDDEN = 5, 6, 4, (8, 4)
LENGTHS = [3, 0, 6, 1, 4]


def _parameters(activation, generator):
    widths = (4 * D,) + HIDDEN + (1,)
    weights = [torch.randn(o, i, generator=generator, dtype=torch.float64) / i ** 0.5
               for i, o in zip(widths[:-1], widths[1:])]
    biases = [torch.randn(o, generator=generator, dtype=torch.float64) for o in widths[1:]]
    if activation == "prelu":
        params = [torch.rand(h, generator=generator, dtype=torch.float64) for h in HIDDEN]
    elif activation == "dice":
        params = [tuple(torch.rand(h, generator=generator, dtype=torch.float64) + 0.1
                        for _ in range(3)) for h in HIDDEN]
    else:
        params = None
    return weights, biases, params


def _leaves(weights, biases, params):
    flat = list(weights) + list(biases)
    for entry in params or []:
        flat.extend(entry if isinstance(entry, tuple) else (entry,))
    return flat


def _padded(jagged, offsets):
    dense = jagged.new_zeros(B, MAX_LEN, jagged.shape[1])
    for b in range(B):
        dense[b, :offsets[b + 1] - offsets[b]] = jagged[offsets[b]:offsets[b + 1]]
    return dense


def _unpadded(weights, offsets):
    return torch.cat([weights[b, ..., :offsets[b + 1] - offsets[b]].transpose(0, -1)
                      for b in range(B)])


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("activation,normalization,candidates,separate_values", [
    ("sigmoid", None, None, False),
    ("relu", "softmax", 3, True),
    ("prelu", "softmax", None, True),
    ("dice", None, 2, False),
])
def test_equals_padded_call(activation, normalization, candidates, separate_values, backend):
    generator = torch.Generator().manual_seed(len(activation) + (candidates or 0))
    weights, biases, params = _parameters(activation, generator)
    lengths = torch.tensor(LENGTHS)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    total = int(offsets[-1])
    shape = (B, D) if candidates is None else (B, candidates, D)
    query = torch.randn(shape, generator=generator, dtype=torch.float64)
    keys = torch.randn(total, D, generator=generator, dtype=torch.float64)
    values = torch.randn(total, 3, generator=generator, dtype=torch.float64) \
        if separate_values else None
    leaves = [query, keys] + ([values] if separate_values else []) + \
        _leaves(weights, biases, params)
    kwargs = dict(weights=weights, biases=biases, activation=activation,
                  activation_params=params, normalization=normalization, scale=0.7,
                  return_scores=True)
    for leaf in leaves:
        leaf.requires_grad_()

    pooled, scores = din_fast.din_attention_jagged(query, keys, offsets, MAX_LEN,
                                                   values=values, backend=backend, **kwargs)
    cotangent = torch.randn(pooled.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((pooled * cotangent).sum() + scores.square().sum(), leaves)

    expected_pooled, expected_scores = din_fast.din_attention(
        query, _padded(keys, offsets), lengths,
        values=None if values is None else _padded(values, offsets), backend="reference",
        **kwargs)
    expected_scores = _unpadded(expected_scores, offsets)
    expected = torch.autograd.grad((expected_pooled * cotangent).sum()
                                   + expected_scores.square().sum(), leaves)

    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_never_builds_the_padding(backend):
    """max_len = 10**12: anything padded to it could not even be allocated."""
    generator = torch.Generator().manual_seed(0)
    weights, biases, _ = _parameters("sigmoid", generator)
    weights = [w.float() for w in weights]
    biases = [b.float() for b in biases]
    offsets = torch.tensor([0, 2, 2, 5, 6, 9])
    keys = torch.randn(9, D, requires_grad=True)
    query = torch.randn(B, D, requires_grad=True)
    for normalization in (None, "softmax"):
        out = din_fast.din_attention_jagged(query, keys, offsets, 10**12, weights=weights,
                                            biases=biases, normalization=normalization,
                                            backend=backend)
        out.sum().backward()
        assert out.shape == (B, D)
        assert torch.equal(out[1], torch.zeros(D))  # the empty row


@pytest.mark.parametrize("offsets,max_len,error,match", [
    (torch.tensor([0, 2, 5], dtype=torch.float32), 6, TypeError,
     "`offsets` must be int32 or int64"),
    (torch.tensor([[0, 2, 5]]), 6, ValueError, "`offsets` must be a 1-D"),
    (torch.tensor([1, 2, 5]), 6, ValueError, r"`offsets\[0\]`"),
    (torch.tensor([0, 2, 4]), 6, ValueError, r"`offsets\[-1\]`"),
    (torch.tensor([0, 4, 3, 5]), 6, ValueError, "non-decreasing"),
    (torch.tensor([0, 1, 5]), 3, ValueError, "max_len = 3"),
    (torch.tensor([0, 2, 5]), 2.5, TypeError, "`max_len`"),
    (torch.tensor([0, 2, 5]).to("meta"), 6, ValueError, "`offsets` is on meta"),
])
def test_bad_offsets_raise(offsets, max_len, error, match):
    generator = torch.Generator().manual_seed(1)
    weights, biases, _ = _parameters("sigmoid", generator)
    batch = offsets.shape[-1] - 1
    query = torch.randn(batch, D, dtype=torch.float64)
    keys = torch.randn(5, D, dtype=torch.float64)
    with pytest.raises(error, match=match) as raised:
        din_fast.din_attention_jagged(query, keys, offsets, max_len, weights=weights,
                                      biases=biases)
    assert str(raised.value).startswith("din_attention_jagged: ")


def test_int32_offsets_as_int64():
    """TorchRec's offsets may be int32: taken as int64 offsets are."""
    generator = torch.Generator().manual_seed(1)
    weights, biases, _ = _parameters("sigmoid", generator)
    query, keys = torch.randn(2, D, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 5])
    want = din_fast.din_attention_jagged(query, keys, offsets, 3, weights=weights, biases=biases)
    got = din_fast.din_attention_jagged(query, keys, offsets.int(), 3, weights=weights,
                                        biases=biases)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_triton_says_why_it_cannot_run_float64():
    """The fused jagged forward takes float32 / float16 / bfloat16 (its tests:
    test_jagged_triton.py); float64 raises by name on backend='triton'."""
    generator = torch.Generator().manual_seed(2)
    weights, biases, _ = _parameters("sigmoid", generator)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: .*float64"):
        din_fast.din_attention_jagged(torch.randn(1, D, dtype=torch.float64),
                                      torch.randn(2, D, dtype=torch.float64),
                                      torch.tensor([0, 2]), 2, weights=weights, biases=biases,
                                      backend="triton")
