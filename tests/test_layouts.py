"""Layouts (SPEC section 4): every tensor argument may have any strides, a
stride of 0 and a storage offset; the results and gradients are those of its
contiguous copy, on every backend and through every entry point."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import din_fast
from helpers import (BACKENDS, DEVICE, LAYOUTS, backend_dtype, backend_settings,
                     call_din_attention, cases, leaf_copy, make_case, on_device,
                     outputs_and_grads, relayout, tensor_slots, with_slots)

# A contiguous call and a relaid one compute the same numbers, up to BLAS
# choosing another summation order for another layout.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}


def assert_same(got, want, dtype):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"result {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        torch.testing.assert_close(g, w, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype],
                                   msg=lambda m: f"result {i}: {m}")


def both_layouts(case, layouts):
    """(leaves, the case with each tensor relaid, the case with each made contiguous
    again): both are functions of the same leaves. Offsets keep their values
    (an expand would repeat its first one: no longer offsets)."""
    case, leaves = leaf_copy(case)
    slots = tensor_slots(case)
    chosen = {slot: "strided" if slot[0] == "offsets" and layout == "expanded" else layout
              for slot, layout in zip(slots, layouts)}
    relaid = with_slots(case, lambda slot, t: relayout(t, chosen[slot]))
    return leaves, relaid, with_slots(relaid, lambda slot, t: t.contiguous())


layout_lists = st.lists(st.sampled_from(LAYOUTS), min_size=40, max_size=40)


@pytest.mark.parametrize("backend", BACKENDS)
def test_din_attention_any_layout(backend):
    @backend_settings(backend)
    @given(cases(dtype=backend_dtype(backend)), layout_lists)
    def check(case, layouts):
        leaves, relaid, contiguous = both_layouts(case, layouts)
        got = outputs_and_grads(call_din_attention(relaid, backend), leaves)
        want = outputs_and_grads(call_din_attention(contiguous, backend), leaves)
        assert_same(got, want, backend_dtype(backend))
    check()


def jagged_call(case, backend):
    """din_attention_jagged on the case's valid prefixes (lengths masking)."""
    kwargs = dict(case)
    query, keys = kwargs.pop("query"), kwargs.pop("keys")
    del kwargs["lengths"]                        # the offsets carry them
    return din_fast.din_attention_jagged(query, keys, kwargs.pop("offsets"), keys.shape[0],
                                         return_scores=True, backend=backend, **kwargs)


def as_jagged(case):
    """The case's history as jagged values: keys [L, D], values [L, Dv], offsets."""
    lengths = case["lengths"]
    valid = torch.arange(case["keys"].shape[1], device=DEVICE) < lengths[:, None]
    offsets = torch.zeros(lengths.shape[0] + 1, dtype=torch.int64, device=DEVICE)
    offsets[1:] = lengths.cumsum(0)
    jagged = dict(case, keys=case["keys"][valid], offsets=offsets, lengths=None)
    if case.get("values") is not None:
        jagged["values"] = case["values"][valid]
    return jagged


@pytest.mark.parametrize("backend", BACKENDS)
def test_din_attention_jagged_any_layout(backend):
    @backend_settings(backend, 0.6)
    @given(cases(dtype=backend_dtype(backend), masking=("lengths",)), layout_lists)
    def check(case, layouts):
        leaves, relaid, contiguous = both_layouts(as_jagged(case), layouts)
        got = outputs_and_grads(jagged_call(relaid, backend), leaves)
        want = outputs_and_grads(jagged_call(contiguous, backend), leaves)
        assert_same(got, want, backend_dtype(backend))
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinattention_module_any_layout(backend):
    """The module's inputs relaid, and one parameter stored transposed."""
    dtype = backend_dtype(backend)

    @backend_settings(backend, 0.6)
    @given(cases(dtype=dtype), layout_lists)
    def check(case, layouts):
        dim = case["keys"].shape[-1]
        torch.manual_seed(0)
        layer = din_fast.DINAttention(dim, (5, 3), "prelu", normalization=case["normalization"],
                                      return_scores=True, backend=backend).to(DEVICE, dtype)
        weight = layer.hidden[1].weight
        layer.hidden[1].weight = torch.nn.Parameter(weight.detach().mT.contiguous().mT)
        inputs = {k: case.get(k) for k in ("query", "keys", "lengths", "mask", "values")}
        leaves, relaid, contiguous = both_layouts(inputs, layouts)
        params = list(layer.parameters())
        got = outputs_and_grads(layer(**relaid), leaves + params)
        want = outputs_and_grads(layer(**contiguous), leaves + params)
        assert_same(got, want, dtype)
    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_sliced_from_a_column_or_expanded(backend):
    """Defect 1 of the reliability pass: DeepCTR-Torch squeezes a [B, 1] slice
    of a wider table into lengths, and an expand gives stride 0; the triton
    path read both as if contiguous."""
    case = on_device(make_case(5, 2, 6, 3, (4, 3), normalization="softmax",
                               dtype=backend_dtype(backend), seed=3))
    lengths = case["lengths"]
    table = torch.stack([lengths, torch.full_like(lengths, 99)], dim=1)   # [B, 2]
    want = call_din_attention(case, backend)
    for strided in (table[:, 0], lengths[:1].expand(lengths.shape[0])):
        if strided.stride(0) == 0:
            want = call_din_attention(dict(case, lengths=strided.contiguous()), backend)
        got = call_din_attention(dict(case, lengths=strided), backend)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
