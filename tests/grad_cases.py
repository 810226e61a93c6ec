"""Gradient test cases: random DIN problems and their float64 reference gradients."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from din_fast.problem import validate
from din_fast.reference import reference_din_attention


@dataclass
class GradCase:
    batch: int = 3
    candidates: int = 1          # 0 means a 2-D query
    length: int = 9
    embed_dim: int = 5
    hidden: tuple = (12, 6)
    activation: str = "sigmoid"
    normalization: str | None = None
    masking: str | None = "lengths"   # "lengths" | "mask" | None
    value_dim: int | None = None      # separate values of this width
    return_scores: bool = False
    scalar_params: bool = False       # [1]-shaped activation parameters
    scale: float = 0.7
    zero_rows: bool = True            # some rows with no valid position
    seed: int = 0
    label: str = field(default="", compare=False)

    def __str__(self):
        return self.label or f"{self.activation}-{self.normalization}-{self.masking}"


def make_leaves(case: GradCase, dtype=torch.float64, device="cpu"):
    """The inputs of din_attention as leaf tensors, and the non-differentiable masks."""
    gen = torch.Generator().manual_seed(case.seed)

    def rand(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * (hi - lo) + lo)

    query_shape = (case.batch, case.embed_dim) if case.candidates == 0 else \
        (case.batch, case.candidates, case.embed_dim)
    leaves = {"query": rand(*query_shape), "keys": rand(case.batch, case.length, case.embed_dim)}
    if case.value_dim is not None:
        leaves["values"] = rand(case.batch, case.length, case.value_dim)
    fan_in = 4 * case.embed_dim
    widths = list(case.hidden) + [1]
    for i, width in enumerate(widths):
        bound = fan_in ** -0.5 * 2.0
        leaves[f"w{i}"] = rand(width, fan_in, lo=-bound, hi=bound)
        leaves[f"b{i}"] = rand(width, lo=-0.5, hi=0.5)
        fan_in = width
    for i, width in enumerate(case.hidden):
        n = 1 if case.scalar_params else width
        if case.activation in ("prelu", "dice"):
            leaves[f"a{i}"] = rand(n, lo=-0.5, hi=0.5)
        if case.activation == "dice":
            leaves[f"mu{i}"] = rand(n, lo=-0.3, hi=0.3)
            leaves[f"var{i}"] = rand(n, lo=0.3, hi=1.5)
    leaves = {k: v.to(dtype=dtype, device=device) for k, v in leaves.items()}

    lengths = mask = None
    if case.masking == "lengths":
        lengths = torch.randint(0, case.length + 1, (case.batch,), generator=gen)
        lengths[0] = case.length
        if case.zero_rows and case.batch > 1:
            lengths[-1] = 0
        lengths = lengths.to(device)
    elif case.masking == "mask":
        mask = torch.rand(case.batch, case.length, generator=gen) < 0.6
        if case.zero_rows and case.batch > 1:
            mask[-1] = False
        mask = mask.to(device)
    return leaves, lengths, mask


def call_kwargs(case: GradCase, leaves, lengths, mask):
    """din_attention's arguments built from the leaves."""
    layers = len(case.hidden)
    params = None
    if case.activation == "prelu":
        params = [leaves[f"a{i}"] for i in range(layers)]
    elif case.activation == "dice":
        params = [(leaves[f"a{i}"], leaves[f"mu{i}"], leaves[f"var{i}"]) for i in range(layers)]
    return dict(
        query=leaves["query"], keys=leaves["keys"], lengths=lengths,
        weights=[leaves[f"w{i}"] for i in range(layers + 1)],
        biases=[leaves[f"b{i}"] for i in range(layers + 1)],
        activation=case.activation, activation_params=params, mask=mask,
        normalization=case.normalization, scale=case.scale, values=leaves.get("values"),
    )


def make_problem(case: GradCase, leaves, lengths, mask):
    kwargs = call_kwargs(case, leaves, lengths, mask)
    query, keys, lengths = kwargs.pop("query"), kwargs.pop("keys"), kwargs.pop("lengths")
    return validate(query, keys, lengths, dice_eps=1e-8, **kwargs)


def output_grads(case: GradCase, problem, seed=1):
    """Random d loss / d pooled [B, C, Dv] and, with return_scores, d loss / d w [B, C, T]."""
    gen = torch.Generator().manual_seed(seed)
    batch, candidates = problem.query.shape[:2]
    length = problem.keys.shape[1]
    value_dim = problem.value_tensor.shape[2]
    grad_pooled = torch.randn(batch, candidates, value_dim, generator=gen, dtype=torch.float64)
    grad_scores = torch.randn(batch, candidates, length, generator=gen, dtype=torch.float64) \
        if case.return_scores else None
    return grad_pooled, grad_scores


def reference_grads(case: GradCase, leaves=None):
    """Float64 reference: pooled, w, the output grads and d loss / d every leaf
    (the case's random leaves, or the given float64 ones)."""
    made, lengths, mask = make_leaves(case)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in (leaves or made).items()}
    problem = make_problem(case, leaves, lengths, mask)
    pooled, scores = reference_din_attention(problem)
    grad_pooled, grad_scores = output_grads(case, problem)
    loss = (pooled * grad_pooled).sum()
    if grad_scores is not None:
        loss = loss + (scores * grad_scores).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(pooled=pooled.detach(), scores=scores.detach(), grad_pooled=grad_pooled,
                grad_scores=grad_scores, grads=dict(zip(leaves.keys(), grads)),
                leaves={k: v.detach() for k, v in leaves.items()}, lengths=lengths, mask=mask)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||; absolute where the reference is (analytically) zero,
    as the output bias's gradient under softmax, which is shift invariant."""
    got, want = got.double(), want.double()
    scale = want.norm().item()
    return (got - want).norm().item() / (scale if scale > 1e-9 else 1.0)
