"""Random DIN problems for the kernel tests, and their float64 reference."""

from __future__ import annotations

import torch

from din_fast.problem import validate
from din_fast.reference import reference_din_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-3,
             torch.float16: 5e-3, torch.bfloat16: 2e-2}


def make_problem(batch=3, candidates=1, length=7, dim=5, hidden=(7, 3), activation="sigmoid",
                 normalization=None, dtype=torch.float32, valid="lengths", value_dim=None,
                 scale=0.7, empty_rows=(), seed=0, requires_grad=False):
    """A validated problem with float32 parameters; `valid` is lengths | mask | None."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        tensor = (torch.randn(*shape, generator=gen) * std).to(DEVICE)
        return tensor.requires_grad_(requires_grad)

    query = rand(batch, candidates, dim).to(dtype).detach().requires_grad_(requires_grad)
    keys = rand(batch, length, dim).to(dtype).detach().requires_grad_(requires_grad)
    values = None
    if value_dim is not None:
        values = rand(batch, length, value_dim).to(dtype).detach().requires_grad_(requires_grad)
    widths = (4 * dim,) + tuple(hidden) + (1,)
    weights = [rand(n_out, n_in, std=n_in ** -0.5) for n_in, n_out in zip(widths, widths[1:])]
    biases = [rand(n_out, std=0.1) for n_out in widths[1:]]
    params = None
    if activation == "prelu":
        params = [rand(h, std=0.3) for h in hidden]
    elif activation == "dice":
        params = [(rand(h, std=0.3), rand(h, std=0.1),
                   (torch.rand(h, generator=gen) + 0.5).to(DEVICE)) for h in hidden]
    lengths = mask = None
    if valid == "lengths":
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)
        lengths[list(empty_rows)] = 0
        lengths = lengths.to(DEVICE)
    elif valid == "mask":
        mask = torch.rand(batch, length, generator=gen) > 0.3
        mask[list(empty_rows)] = False
        mask = mask.to(DEVICE)
    return validate(query, keys, lengths, weights=weights, biases=biases,
                    activation=activation, activation_params=params, mask=mask,
                    normalization=normalization, scale=scale, values=values, dice_eps=1e-8)


def reference64(problem):
    """The reference on float64 copies of every input: (pooled, w)."""
    return reference_din_attention(problem.with_float_tensors(
        [t.detach().double() for t in problem.float_tensors()]))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values in the output"
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
