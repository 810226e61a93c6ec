"""The custom ops: their fake implementations against the real ops
(torch.library.opcheck), and torch.compile(fullgraph=True) of models that use
them, matching eager."""

import copy
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import din_fast
from din_fast import torch_backend, triton_backend
from din_fast.op_args import AttentionArgs, JaggedAttentionArgs
from din_fast.problem import validate, validate_jagged
from helpers import DEVICE, loss_probes, make_case, map_tensors, on_device

OP_CASES = [
    dict(batch=3, candidates=None, length=6, dim=5, hidden=(7,)),
    dict(batch=3, candidates=2, length=6, dim=5, hidden=(6, 4), activation="dice",
         normalization="softmax", masking="mask", value_dim=3, scalar_params=True),
    dict(batch=3, candidates=1, length=6, dim=5, hidden=(7, 5, 3), activation="prelu",
         masking=None),
]


def problem_of(arguments, dtype, requires_grad=True):
    case = on_device(make_case(**arguments, dtype=dtype, seed=1))
    case = map_tensors(case, lambda t: t.requires_grad_(requires_grad))
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}
    kwargs.setdefault("mask", None)
    kwargs.setdefault("values", None)
    return validate(case["query"], case["keys"], case["lengths"], dice_eps=1e-8, **kwargs)


def jagged_of(problem):
    """The same histories as jagged values (lengths masking, or all valid)."""
    valid = problem.valid_mask()
    lengths = valid.sum(1)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    values = None if problem.values is None else problem.values[valid]
    return validate_jagged(problem.query, problem.keys[valid], offsets, problem.keys.shape[1],
                           weights=problem.weights, biases=problem.biases,
                           activation=problem.activation,
                           activation_params=_activation_params(problem),
                           normalization=problem.normalization, scale=problem.scale,
                           values=values, dice_eps=problem.dice_eps)


def _activation_params(problem):
    if problem.activation == "prelu":
        return [layer[0] for layer in problem.act_params]
    if problem.activation == "dice":
        return [tuple(layer) for layer in problem.act_params]
    return None


def output_probes(problem, scores_shape):
    batch, candidates = problem.query.shape[:2]
    value_dim = problem.value_tensor.shape[-1]
    pooled, scores = loss_probes([torch.empty(batch, candidates, value_dim),
                                  torch.empty(scores_shape)])
    return pooled.to(DEVICE, problem.query.dtype), scores.to(DEVICE, problem.query.dtype)


@pytest.mark.parametrize("arguments", OP_CASES)
def test_opcheck_triton_forward(arguments):
    problem = problem_of(arguments, torch.float32)
    torch.library.opcheck(triton_backend.triton_attention_forward,
                          (*AttentionArgs.of(problem), True))


@pytest.mark.parametrize("arguments", OP_CASES)
def test_opcheck_triton_jagged_forward(arguments):
    problem = jagged_of(problem_of(arguments, torch.float32))
    torch.library.opcheck(triton_backend.triton_attention_jagged_forward,
                          (*JaggedAttentionArgs.of(problem), True))


@pytest.mark.parametrize("arguments", OP_CASES)
def test_opcheck_backward_ops(arguments):
    """The fused backward (float32) and the torch backend's (float64), padded
    and jagged."""
    fused = problem_of(arguments, torch.float32, requires_grad=False)
    probes = output_probes(fused, fused.keys.shape[:1] + fused.query.shape[1:2]
                           + fused.keys.shape[1:2])
    torch.library.opcheck(triton_backend.triton_attention_backward,
                          (*probes, *AttentionArgs.of(fused)))
    exact = problem_of(arguments, torch.float64, requires_grad=False)
    probes = tuple(p.double() for p in probes)
    torch.library.opcheck(torch_backend.backward_op, (*probes, [], *AttentionArgs.of(exact)))
    # What the forward op saves for its backward: the kept activations, the
    # softmax statistics.
    pooled, w, row_max, row_sum, kept = torch_backend.forward_op(*AttentionArgs.of(exact), True,
                                                                 True)
    saved = [kept] + ([pooled, row_max, row_sum, w] if exact.normalization == "softmax" else [])
    torch.library.opcheck(torch_backend.backward_op, (*probes, saved, *AttentionArgs.of(exact)))
    jagged = jagged_of(exact)
    jagged_probes = output_probes(jagged, (jagged.keys_values.shape[0],
                                           jagged.query.shape[1]))
    torch.library.opcheck(torch_backend.jagged_backward_op,
                          (*jagged_probes, [], *JaggedAttentionArgs.of(jagged)))


@pytest.mark.parametrize("need_scores,keep", [(True, False), (False, True)])
@pytest.mark.parametrize("arguments", OP_CASES)
def test_opcheck_torch_forward(arguments, need_scores, keep):
    """The blocked forward ops, padded and jagged: without the scores they
    return empty tensors in their place (and in the statistics' without
    softmax, and in the kept activations' without keep_activations)."""
    problem = problem_of(arguments, torch.float64)
    torch.library.opcheck(torch_backend.forward_op,
                          (*AttentionArgs.of(problem), need_scores, keep))
    torch.library.opcheck(torch_backend.jagged_forward_op,
                          (*JaggedAttentionArgs.of(jagged_of(problem)), need_scores, keep))


def test_forward_under_fake_tensor_mode_gives_the_shapes():
    """A FakeTensorMode forward (what memory estimators and shape inference
    run): the checks of lengths and offsets read no values (bool() of a fake
    tensor raised DataDependentOutputException), the ops' fakes give the
    shapes, padded and jagged; training-mode Dice too, and on meta tensors."""
    layer = din_fast.DINAttention(4, (6, 3), activation="dice", normalization="softmax",
                                  return_scores=True).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        pooled, scores = layer(torch.empty(3, 2, 4), torch.empty(3, 5, 4),
                               torch.zeros(3, dtype=torch.int32))
        jagged_pooled, jagged_scores = layer.forward_jagged(
            torch.empty(3, 2, 4), torch.empty(7, 4), torch.zeros(4, dtype=torch.long), 5)
    assert (pooled.shape, scores.shape) == ((3, 2, 4), (3, 2, 5))
    assert (jagged_pooled.shape, jagged_scores.shape) == ((3, 2, 4), (7, 2))
    # Training-mode Dice packs the valid positions by nonzero() in eager mode
    # (a size that is data): on fake and meta tensors it keeps every position.
    layer.train()
    with FakeTensorMode(allow_non_fake_inputs=True):
        pooled, _ = layer(torch.empty(3, 2, 4), torch.empty(3, 5, 4), torch.zeros(3).long())
    with torch.device("meta"):
        on_meta = copy.deepcopy(layer).to("meta")
        meta_pooled, _ = on_meta(torch.empty(3, 2, 4), torch.empty(3, 5, 4),
                                 torch.zeros(3).long())
    assert pooled.shape == meta_pooled.shape == (3, 2, 4)


class Ranker(torch.nn.Module):
    """A small model around DINAttention, as a CTR model would use it."""

    def __init__(self, dim=8, backend="auto"):
        super().__init__()
        self.attention = din_fast.DINAttention(dim, hidden_units=(16, 8),
                                               normalization="softmax", scale=dim ** -0.5,
                                               backend=backend)
        self.head = torch.nn.Linear(2 * dim, 1)

    def forward(self, query, keys, lengths):
        pooled = self.attention(query, keys, lengths)
        return self.head(torch.cat([query, pooled], dim=-1)).squeeze(-1)


# On CPU: the torch backend (aten ops) under inductor, and the triton ops under
# aot_eager (the interpreter's kernels cannot be traced, so they stay opaque
# ops there); on CUDA the triton ops under inductor, kernels traced.
COMPILE_RUNS = [("auto", "inductor"), ("triton", "aot_eager")]


@pytest.mark.parametrize("backend,compiler", COMPILE_RUNS)
def test_compile_fullgraph_matches_eager(backend, compiler):
    if DEVICE == "cuda":
        compiler = "inductor"
    torch.manual_seed(0)
    model = Ranker(backend=backend).to(DEVICE)
    query, keys = torch.randn(6, 8, device=DEVICE), torch.randn(6, 11, 8, device=DEVICE)
    lengths = torch.tensor([11, 0, 3, 7, 1, 11], device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    eager_out = model(query, keys, lengths)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(query, keys, lengths)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    tol = dict(rtol=1e-5, atol=1e-6) if DEVICE == "cpu" else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out, eager_out, **tol)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, **tol)


def test_compiling_the_triton_backend_warns_of_no_cache_wrapper():
    """The check that triton is installed was lru_cache-wrapped: dynamo then
    warned of "silent incorrectness" on every compile of the triton backend."""
    layer = din_fast.DINAttention(4, (6, 3), backend="triton").to(DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(3, 4, device=DEVICE), torch.randn(3, 5, 4, device=DEVICE),
                 torch.tensor([5, 0, 2], device=DEVICE))
    assert not [w for w in caught if "lru_cache" in str(w.message)]


def test_compile_fullgraph_dice_training_matches_eager():
    """Training-mode Dice (batch statistics over the valid positions, running
    statistics updated in place) traces without a graph break. aot_eager runs
    the same dynamo and AOTAutograd graphs as inductor without its slow CPU
    code generation."""
    torch.manual_seed(0)
    layer = din_fast.DINAttention(4, hidden_units=(6, 3), activation="dice",
                                  normalization="softmax").train()
    with torch.no_grad():
        for alpha in layer.alphas:
            alpha.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(layer)
    query, keys = torch.randn(5, 4), torch.randn(5, 7, 4)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for lengths in (torch.tensor([7, 0, 3, 5, 1]), torch.zeros(5, dtype=torch.long)):
        out, eager_out = compiled(query, keys, lengths), twin(query, keys, lengths)
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        eager_grads = torch.autograd.grad(eager_out.square().sum(), list(twin.parameters()))
        torch.testing.assert_close(out, eager_out)
        for got, want in zip(grads, eager_grads):
            torch.testing.assert_close(got, want)
        # The second batch has no valid position: both leave the statistics as they were.
        for got, want in zip(layer.buffers(), twin.buffers()):
            torch.testing.assert_close(got, want)
