"""An exponential moving average of a model's weights (``din-fast train --ema``).

After every optimizer step the average moves ``1 - decay`` of the way to the
trained weights (torch.optim.swa_utils.AveragedModel with
get_ema_multi_avg_fn; the first step's weights start it). It is a copy of the
model, which validation, early stopping, the saved checkpoint and the test
metrics use in place of the trained weights, whose step-to-step noise it
smooths: with a time split, the epoch that validates best, and with it the
test metrics, otherwise depend on the seed more than on the model.

Buffers: the floating-point ones, Dice's running means and variances (the
attention unit's and the MLP's batch-normalization statistics, which scoring
in eval mode normalizes by), are averaged with the weights. They are running
averages of the trained weights' activations; averaged again at the weights'
decay they lag as the averaged weights do, which fits those weights better
than the trained model's latest statistics, and, unlike recomputing them
(torch.optim.swa_utils.update_bn), costs no pass over the training data. An
integer buffer (BatchNorm's ``num_batches_tracked``, a count that the models'
fixed momentum never reads) is the trained model's, copied: a count has no
average.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _averaging(decay: float):
    """AveragedModel's ``multi_avg_fn``: the EMA of floating-point tensors,
    a copy of the others (it is called once per device and dtype)."""
    ema = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def average(averaged: list, current: list, steps) -> None:
        if averaged[0].is_floating_point():
            ema(averaged, current, steps)
        else:
            for mine, theirs in zip(averaged, current, strict=True):
                mine.copy_(theirs)
    return average


class WeightAverage:
    """The EMA of a model's weights and floating-point buffers.

    Args:
        model: the model to average (copied now: build this before the
            model is compiled, and compile :attr:`model` alike).
        decay: the share of the average kept at each step, in (0, 1)
            (TrainConfig checks it).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=_averaging(decay), use_buffers=True)

    @property
    def model(self) -> torch.nn.Module:
        """The averaged copy of the model, to score with."""
        return self.averaged.module

    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s weights; after every
        optimizer step.

        Args:
            model: the trained model (the one this average copied).
        """
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict:
        """What continues the average exactly: {"weights": the averaged
        model's state dict, "steps": the steps averaged, an int}."""
        return {"weights": self.model.state_dict(), "steps": int(self.averaged.n_averaged)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state of :meth:`state_dict`.

        Args:
            state: {"weights", "steps"}.

        Raises:
            KeyError, TypeError, RuntimeError: ``state`` does not fit the
                model (the caller names the file).
        """
        self.model.load_state_dict(state["weights"])
        self.averaged.n_averaged.fill_(state["steps"])
