"""The hidden-layer activations (sigmoid, relu, prelu, dice), shared by the PyTorch paths."""

from __future__ import annotations

import torch


def derivative_needs_input(activation: str) -> bool:
    """Whether :func:`activation_backward` needs the activation's input beside
    its output: prelu's and dice's do; sigmoid's and relu's follow from the
    output alone (so a backward may keep the outputs only)."""
    return activation in ("prelu", "dice")


def activate(x: torch.Tensor, activation: str, params: tuple, dice_eps: float) -> torch.Tensor:
    """Apply one hidden layer's activation; ``params`` as in DINProblem.act_params."""
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if activation == "relu":
        return torch.relu(x)
    if activation == "prelu":
        (a,) = params
        return torch.where(x > 0, x, a * x)
    a, mu, var = params
    return dice(x, a, (x - mu) * torch.rsqrt(var + dice_eps))


def dice(x: torch.Tensor, a: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Dice from its gate's logits: p = sigmoid(logits), f = p*x + (1-p)*a*x."""
    p = torch.sigmoid(gate_logits)
    return x * (a + p * (1 - a))


def activation_backward(x: torch.Tensor, grad: torch.Tensor, activation: str, params: tuple,
                        dice_eps: float, output=None):
    """The chain rule through ``activate``: (d x, gradients of ``params``).

    Parameter gradients are per unit (the last dimension), summed over the
    others; the same formulas as the fused backward kernel. ``output``, the
    activation's value if the caller has it, saves recomputing a sigmoid.
    """
    # aten's fused derivative ops: one pass and no temporaries of x's size.
    if activation == "sigmoid":
        output = torch.sigmoid(x) if output is None else output
        return torch.ops.aten.sigmoid_backward(grad, output), ()
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, x, 0), ()
    dims = tuple(range(x.dim() - 1))
    if activation == "prelu":
        (a,) = params
        negative = x <= 0  # where(x > 0, x, a * x) takes the a-branch at 0
        dx = torch.where(negative, grad * a, grad)
        return dx, (torch.where(negative, grad * x, torch.zeros_like(x)).sum(dims),)
    a, mu, var = params
    rstd = torch.rsqrt(var + dice_eps)
    p = torch.sigmoid((x - mu) * rstd)
    slope = (1 - a) * x * p * (1 - p)  # d f / d((x - mu) * rstd)
    dx = grad * (a + p * (1 - a) + slope * rstd)
    da = (grad * x * (1 - p)).sum(dims)
    dmu = -(grad * slope).sum(dims) * rstd
    dvar = -0.5 * (grad * slope * (x - mu)).sum(dims) * rstd ** 3
    return dx, (da, dmu, dvar)
