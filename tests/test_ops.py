"""The custom ops: gradients, opcheck, and torch.compile(fullgraph=True) on CPU."""

import copy

import pytest
import torch

import din_fast
from din_fast.ops import attention_backward, attention_forward, run_attention_op
from grad_cases import GradCase, call_kwargs, make_leaves, make_problem, output_grads, \
    reference_grads, rel_error

OP_CASES = [
    GradCase(label="sigmoid-none-lengths-2d", candidates=0),
    GradCase(label="dice-softmax-mask-values-scores", activation="dice", normalization="softmax",
             masking="mask", value_dim=3, return_scores=True, candidates=2, scalar_params=True),
    GradCase(label="prelu-none-nomask-3layers", activation="prelu", masking=None,
             hidden=(7, 5, 3)),
]


def op_arguments(case, dtype=torch.float64, requires_grad=False):
    leaves, lengths, mask = make_leaves(case, dtype)
    for leaf in leaves.values():
        leaf.requires_grad_(requires_grad)
    problem = make_problem(case, leaves, lengths, mask)
    act_params = [p for layer in problem.act_params for p in layer]
    return problem, (problem.query, problem.keys, problem.values, problem.lengths, problem.mask,
                     problem.weights, problem.biases, act_params, problem.activation,
                     problem.normalization or "none", problem.scale, problem.dice_eps)


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_op_gradients_match_reference(case):
    ref = reference_grads(case)
    leaves, lengths, mask = make_leaves(case)
    for leaf in leaves.values():
        leaf.requires_grad_(True)
    problem = make_problem(case, leaves, lengths, mask)
    pooled, scores = run_attention_op(problem, "torch", need_scores=case.return_scores)
    grad_pooled, grad_scores = output_grads(case, problem)
    loss = (pooled * grad_pooled).sum()
    if case.return_scores:
        loss = loss + (scores * grad_scores).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert rel_error(pooled.detach(), ref["pooled"]) <= 1e-10
    for name, got in zip(leaves, grads):
        assert rel_error(got, ref["grads"][name]) <= 1e-10, name


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_opcheck_forward(case):
    _, args = op_arguments(case, requires_grad=True)
    torch.library.opcheck(attention_forward, (*args, case.return_scores, "torch"))


def test_opcheck_forward_triton():
    case = OP_CASES[1]
    _, args = op_arguments(case, dtype=torch.float32, requires_grad=True)
    if torch.cuda.is_available():
        args = tuple(a.cuda() if isinstance(a, torch.Tensor) else
                     [t.cuda() for t in a] if isinstance(a, list) else a for a in args)
    torch.library.opcheck(attention_forward, (*args, case.return_scores, "triton"))


def test_opcheck_backward():
    case = OP_CASES[1]
    problem, args = op_arguments(case)
    grad_pooled, grad_scores = output_grads(case, problem)
    torch.library.opcheck(attention_backward, (grad_pooled, grad_scores, *args, "torch"))


class Ranker(torch.nn.Module):
    """A small model around DINAttention, as a CTR model would use it."""

    def __init__(self, dim=8):
        super().__init__()
        self.attention = din_fast.DINAttention(dim, hidden_units=(16, 8),
                                               normalization="softmax", scale=dim ** -0.5)
        self.head = torch.nn.Linear(2 * dim, 1)

    def forward(self, query, keys, lengths):
        pooled = self.attention(query, keys, lengths)
        return self.head(torch.cat([query, pooled], dim=-1)).squeeze(-1)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_compile_fullgraph_matches_eager(device):
    """On CPU the model runs the torch backend's op, on CUDA the triton one."""
    torch.manual_seed(0)
    model = Ranker().to(device)
    query, keys = torch.randn(6, 8, device=device), torch.randn(6, 11, 8, device=device)
    lengths = torch.tensor([11, 0, 3, 7, 1, 11], device=device)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(query, keys, lengths)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(query, keys, lengths)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out, eager_out, **tol)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, **tol)


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


TRITON_CASES = [
    GradCase(label="sigmoid-none-lengths-2d", candidates=0),
    GradCase(label="relu-softmax-mask-values-scores", activation="relu",
             normalization="softmax", masking="mask", value_dim=3, return_scores=True,
             candidates=3),
    GradCase(label="dice-softmax-lengths-3layers", activation="dice", normalization="softmax",
             hidden=(6, 5, 3), scalar_params=True, length=20),
    # A first layer too wide for the fused backward: the op takes the torch backward.
    GradCase(label="wide-first-layer", embed_dim=64, hidden=(200,), batch=2, length=5),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_backend_gradients_match_reference(case):
    """backend="triton" end to end: fused forward, custom op, fused backward."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = reference_grads(case)
    leaves = {k: v.float().to(device).requires_grad_(True) for k, v in ref["leaves"].items()}
    lengths = None if ref["lengths"] is None else ref["lengths"].to(device)
    mask = None if ref["mask"] is None else ref["mask"].to(device)
    out = din_fast.din_attention(**call_kwargs(case, leaves, lengths, mask),
                                 return_scores=case.return_scores, backend="triton")
    pooled, scores = out if case.return_scores else (out, None)
    grad_pooled = ref["grad_pooled"].float().to(device)
    loss = (pooled * (grad_pooled.squeeze(1) if case.candidates == 0 else grad_pooled)).sum()
    if scores is not None:
        loss = loss + (scores * ref["grad_scores"].float().to(device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    tol = 1e-5 if device == "cpu" else 5e-3
    for name, got in zip(leaves, grads):
        assert rel_error(got.cpu(), ref["grads"][name]) <= tol, name
