"""Padding (SPEC section 1): whatever keys and values hold at invalid
positions (NaN, Inf, huge finite values, the garbage of torch.empty), every
output, score and gradient is exactly what it is with zeros there, on every
backend, and the gradients at those positions are 0."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import din_fast
from helpers import (BACKENDS, DEVICE, backend_dtype, backend_settings, call_din_attention,
                        cases, leaf_copy, outputs_and_grads, tensor_slots)

POISONS = (float("nan"), float("inf"), float("-inf"), 3e38, -3e38)


def valid_positions(case) -> torch.Tensor:
    keys = case["keys"]
    if case.get("mask") is not None:
        return case["mask"]
    return torch.arange(keys.shape[1], device=DEVICE) < case["lengths"][:, None]


def with_padding(case, fill):
    """The case with ``fill`` at every invalid position of keys and values."""
    invalid = ~valid_positions(case)[..., None]
    filled = dict(case, keys=case["keys"].masked_fill(invalid, fill))
    if case.get("values") is not None:
        filled["values"] = case["values"].masked_fill(invalid, fill)
    return filled


def run(case, call):
    """(outputs and gradients, the gradients of keys and values) of call(case),
    which returns (outputs, further leaves to differentiate)."""
    case, leaves = leaf_copy(case)
    outputs, more_leaves = call(case)
    results = outputs_and_grads(outputs, leaves + more_leaves)
    floats = [slot for slot in tensor_slots(case) if
              case[slot[0]] is not None and _is_float(case, slot)]
    outputs = len(results) - len(leaves) - len(more_leaves)
    history = [results[outputs + i] for i, slot in enumerate(floats)
               if slot[0] in ("keys", "values")]
    return results, history


def _is_float(case, slot):
    key, i, j = slot
    value = case[key] if i is None else case[key][i]
    value = value if j is None else value[j]
    return value.is_floating_point()


def assert_padding_ignored(case, poison, call):
    clean, _ = run(with_padding(case, 0.0), call)
    dirty, history_grads = run(with_padding(case, poison), call)
    for i, (d, c) in enumerate(zip(dirty, clean)):
        assert torch.equal(d, c), f"result {i} differs with padding {poison}"
    invalid = ~valid_positions(case)
    for grad in history_grads:
        assert torch.equal(grad[invalid], torch.zeros_like(grad[invalid]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_din_attention_ignores_padding(backend):
    @backend_settings(backend)
    @given(cases(dtype=backend_dtype(backend), masking=("lengths", "mask")),
           st.sampled_from(POISONS))
    def check(case, poison):
        assert_padding_ignored(case, poison, lambda c: (call_din_attention(c, backend), []))
    check()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("training", [False, True])
def test_dinattention_module_ignores_padding(backend, activation, training):
    """The module too: outputs, parameter gradients, and Dice's batch and
    running statistics in training mode."""
    dtype = backend_dtype(backend)

    @backend_settings(backend, 0.4)
    @given(cases(dtype=dtype, masking=("lengths", "mask")), st.sampled_from(POISONS))
    def check(case, poison):
        def call(c):
            torch.manual_seed(0)
            layer = din_fast.DINAttention(c["keys"].shape[-1], (5, 3), activation,
                                          normalization=c["normalization"], return_scores=True,
                                          backend=backend).to(DEVICE, dtype)
            layer.train(training)
            outputs = layer(c["query"], c["keys"], c.get("lengths"), c.get("mask"),
                            c.get("values"))
            # Dice's running statistics (training mode) must not see the padding either.
            return [*outputs, *layer.buffers()], list(layer.parameters())
        assert_padding_ignored(case, poison, call)
    check()
