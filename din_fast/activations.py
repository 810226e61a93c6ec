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
    return dice(x, a, (x - mu) * torch.rsqrt(var + dice_eps))


def dice(x: torch.Tensor, a: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Dice from its gate's logits: p = sigmoid(logits), f = p*x + (1-p)*a*x."""
    p = torch.sigmoid(gate_logits)
    return x * (a + p * (1 - a))
