"""din_attention_jagged under torch.compile: torch.compile(fullgraph=True) of
a function calling it matches eager on both backends (triton in the
interpreter on CPU; its ops pass opcheck in test_ops)."""

import pytest
import torch

import din_fast
from helpers import DEVICE, make_case
LENGTHS = [3, 0, 5, 1]


def jagged_call(dtype):
    """(query, keys_values, offsets, max_len, keyword arguments) of a small
    problem with every kind of input that takes a gradient: Dice parameters,
    separate values, two candidates, and the scores returned."""
    case = make_case(len(LENGTHS), 2, max(LENGTHS), 4, (6, 3), activation="dice",
                     normalization="softmax", value_dim=3, dtype=dtype)
    valid = torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]
    offsets = torch.tensor([0] + LENGTHS).cumsum(0)
    kwargs = dict(weights=case["weights"], biases=case["biases"], activation="dice",
                  activation_params=case["activation_params"], normalization="softmax",
                  values=case["values"][valid], return_scores=True)
    return case["query"], case["keys"][valid], offsets, max(LENGTHS), kwargs


def on_device_leaves(query, keys_values, kwargs):
    """The call's tensors on DEVICE, every float one a leaf requiring grad, and the leaves."""
    leaves = []

    def leaf(t):
        leaves.append(t.to(DEVICE).requires_grad_())
        return leaves[-1]

    kwargs = dict(kwargs, weights=[leaf(w) for w in kwargs["weights"]],
                  biases=[leaf(b) for b in kwargs["biases"]], values=leaf(kwargs["values"]),
                  activation_params=[tuple(map(leaf, p)) for p in kwargs["activation_params"]])
    return leaf(query), leaf(keys_values), kwargs, leaves


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_fullgraph_jagged_matches_eager(backend):
    """torch traces the jagged torch path as it is; triton runs the custom op.
    aot_eager runs the same dynamo and AOTAutograd graphs as inductor without
    its slow CPU code generation."""
    query, keys_values, offsets, max_len, kwargs = jagged_call(torch.float32)
    query, keys_values, kwargs, leaves = on_device_leaves(query, keys_values, kwargs)
    offsets = offsets.to(DEVICE)

    def loss(query, keys_values, offsets):
        pooled, scores = din_fast.din_attention_jagged(query, keys_values, offsets, max_len,
                                                       backend=backend, **kwargs)
        return pooled.square().sum() + scores.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(query, keys_values, offsets)
    got_grads = torch.autograd.grad(got, leaves)
    want = loss(query, keys_values, offsets)
    want_grads = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad)
