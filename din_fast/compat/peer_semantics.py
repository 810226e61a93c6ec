"""What the peer adapters share: their argument names in errors, and the
scores of every history position for the peer behaviours SPEC does not cover."""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..functional import run_problem
from ..problem import DINProblem


@contextlib.contextmanager
def peer_argument_names(layer: str, names: dict):
    """Re-raise din_fast's ValueError/TypeError in the peer's words.

    din_fast's messages name arguments in backticks (`keys`); inside an
    adapter they read with the peer's names (`history_sequence`) and the
    adapter's class in front.
    """
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error).replace("din_attention:", f"{layer}:", 1)
        for ours, theirs in names.items():
            message = message.replace(f"`{ours}`", f"`{theirs}`")
        raise type(error)(message) from error


def batchnorm_gate(norms):
    """A torch-backend Dice gate that normalizes layer i with ``norms[i]``, a
    BatchNorm1d: batch statistics over every scored position in training
    (updating its running ones as BatchNorm does), its running ones in eval.
    Every position is valid here (all_position_scores), so ``valid`` is None."""
    def gate(layer, x, valid):
        return norms[layer](x.flatten(0, 1)).view_as(x)
    return gate


def all_position_scores(problem: DINProblem, dice_gate=None) -> torch.Tensor:
    """Raw scores s of every history position, padding included: [B, C, T]
    ([B, T] for a 2-D query), on the torch backend.

    The peers run their MLP (and its BatchNorm statistics) over the padding
    too and mask afterwards; this is that MLP, still folded.
    """
    unmasked = dataclasses.replace(problem, lengths=None, mask=None, normalization=None,
                                   scale=1.0)
    _, scores = run_problem(unmasked, "torch", dice_gate=dice_gate)
    return scores
