"""Dice's batch statistics in training: over this process's batch, or over
every process's share of a data-parallel global batch.

Dice normalizes each hidden unit by the mean and variance of the batch's
(valid) pre-activations, as BatchNorm does in training, and keeps running
estimates for evaluation. Under data parallelism (DDP, or TorchRec's sharded
DIN) each process holds only a share of the global batch, so its statistics,
and with them every output and gradient, differ from a single-process step on
the whole batch. ``synchronize_dice_statistics(model)`` makes a model's Dice
layers (``DINAttention``'s and the scoring MLP's) take the statistics over
the process group instead, as ``nn.SyncBatchNorm`` does for BatchNorm on GPUs:
one all-gather of every process's (count, mean, variance) per layer and step,
and one all-reduce of their gradients in the backward. A step then equals the
single-process step on the global batch, up to floating-point rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _AllGather(torch.autograd.Function):
    """Every process's ``tensor``, stacked [world, ...], differentiable: the
    gradient of a process's tensor is the sum over the processes of their
    gradients of its row (_SumRow, so that double backward is exact too)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(rows, tensor.contiguous(), group=group)
        return torch.stack(rows)

    @staticmethod
    def backward(ctx, grad):
        return _SumRow.apply(grad, ctx.group), None


class _SumRow(torch.autograd.Function):
    """This process's row of the sum over the processes of a [world, ...]
    tensor: _AllGather's adjoint, whose own adjoint is _AllGather."""

    @staticmethod
    def forward(ctx, stacked, group):
        ctx.group = group
        total = stacked.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total[dist.get_rank(group)].clone()

    @staticmethod
    def backward(ctx, grad):
        return _AllGather.apply(grad, ctx.group), None


def batch_moments(x: torch.Tensor, keep, group=None):
    """Mean and biased variance per unit (the last dimension) of the rows of
    ``x`` [N, H] that ``keep`` [N, 1] (bool; None: every row) marks, and the
    number of rows they cover (an int64 tensor). With ``group`` (a process
    group, see synchronize_dice_statistics) over every process's rows."""
    if keep is None:
        count = torch.tensor(x.shape[0], device=x.device)
    else:
        x = torch.where(keep, x, torch.zeros_like(x))
        count = keep.sum()
    mean = x.sum(0) / count.clamp(min=1)
    centered = x - mean
    if keep is not None:
        centered = torch.where(keep, centered, torch.zeros_like(centered))
    var = centered.square().sum(0) / count.clamp(min=1)
    if group is None:
        return mean, var, count
    return _combined_moments(mean, var, count, group)


def _combined_moments(mean, var, count, group):
    """The group's moments from every process's (mean, var, count), in one
    all-gather (one all-reduce in the backward), in float64: the mean weighted
    by the counts, the variance as the counts' weighted sum of each process's
    variance and its squared distance to that mean (Chan et al.'s parallel
    algorithm, exact where a sum of squares less the squared mean cancels)."""
    width = mean.shape[0]
    local = torch.cat([count.to(torch.float64).reshape(1), mean.double(), var.double()])
    every = _AllGather.apply(local, group)
    counts, means, variances = every[:, :1], every[:, 1:1 + width], every[:, 1 + width:]
    total = counts.sum()
    weights = counts / total.clamp(min=1)
    group_mean = (weights * means).sum(0)
    group_var = (weights * (variances + (means - group_mean).square())).sum(0)
    return group_mean.to(mean.dtype), group_var.to(var.dtype), total.to(torch.int64)


@torch.no_grad()
def update_running(running_mean, running_var, mean, var, count, momentum: float) -> None:
    """BatchNorm's running estimates: each moves ``momentum`` of the way to the
    batch's mean and unbiased variance; a batch with no rows leaves them (a
    select, not a Python branch, so that torch.compile traces it)."""
    seen = count > 0
    count = count.to(var.dtype)
    unbiased = var * (count / (count - 1).clamp(min=1))
    running_mean.copy_(torch.where(
        seen, running_mean.lerp(mean.to(running_mean.dtype), momentum), running_mean))
    running_var.copy_(torch.where(
        seen, running_var.lerp(unbiased.to(running_var.dtype), momentum), running_var))


class _GroupHandle:
    """A process group in a copied or pickled module's state. A deepcopy (an
    ``AveragedModel``, a copy to train beside the original) shares the group:
    it is a handle on the processes, not state, and cannot be copied. A
    pickle (``torch.save`` of the whole module) drops it, as a group exists
    in its processes only: the loaded module takes per-process statistics
    until synchronize_dice_statistics runs again."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_GroupHandle, (None,))


class DiceStatistics:
    """Marks a module that takes Dice batch statistics in training
    (``DINAttention``, the DIN models' MLP ``Dice``): synchronize_dice_statistics
    sets its ``statistics_group``. A marker rather than a list of classes, so
    that this module imports neither the layer nor the models, which import it."""

    statistics_group = None

    def __getstate__(self):
        state = super().__getstate__()
        if state.get("statistics_group") is None:
            return state
        return dict(state, statistics_group=_GroupHandle(state["statistics_group"]))

    def __setstate__(self, state):
        handle = state.get("statistics_group")
        if isinstance(handle, _GroupHandle):
            state = dict(state, statistics_group=handle.group)
        super().__setstate__(state)


def synchronize_dice_statistics(model: nn.Module, process_group=None) -> nn.Module:
    """Make every Dice layer of ``model`` (``DINAttention`` with
    activation="dice", and the DIN models' MLP ``Dice``) take its training
    statistics over ``process_group`` (default: the whole world) rather than
    this process's batch alone; returns ``model``.

    Call it on every process, after torch.distributed is initialized and
    before training (before or after wrapping the model in DDP). Every
    process must then run each training forward (an empty share of a batch
    included), since each Dice layer is a collective. Evaluation is
    unchanged: running statistics, no communication. ``process_group=False``
    turns the synchronization off again. A deepcopy of the model
    (``AveragedModel``) shares the group; a pickled one (``torch.save`` of the
    whole model) loads with per-process statistics.

    Args:
        model: any module; its ``DINAttention`` and ``Dice`` submodules change.
        process_group: a torch.distributed process group, None for the whole
            world, or False to go back to per-process statistics.

    Returns:
        ``model`` itself (changed in place).

    Raises:
        RuntimeError: ``process_group`` None while torch.distributed is not
            initialized.
    """
    if process_group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("synchronize_dice_statistics: torch.distributed is not "
                               "initialized; call torch.distributed.init_process_group first")
        process_group = dist.group.WORLD
    group = None if process_group is False else process_group
    for module in model.modules():
        if isinstance(module, DiceStatistics):
            module.statistics_group = group
    return model
