"""The hidden-layer activations of SPEC section 1, shared by the PyTorch paths."""

from __future__ import annotations

import torch


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
    p = torch.sigmoid((x - mu) * torch.rsqrt(var + dice_eps))
    return x * (a + p * (1 - a))
