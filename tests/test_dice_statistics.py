"""din_fast.synchronize_dice_statistics in one process: a group of one gives
what the unsynchronized layers give (the two-process case is in
tests/test_torchrec.py, against a single-process replay)."""

import copy
import io

import pytest
import torch
import torch.distributed as dist

import din_fast
from din_fast.ctr.models import Dice


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def dice_din():
    torch.manual_seed(0)
    return din_fast.DIN(20, 5, embed_dim=4, attention_hidden=(6, 3), mlp_hidden=(8, 4),
                        attention_activation="dice", mlp_activation="dice").double()


def a_step(model):
    """Logits, every gradient and the buffers after one training step's forward
    and backward on a batch with an empty history."""
    gen = torch.Generator().manual_seed(1)
    items = torch.randint(1, 21, (5, 7), generator=gen)
    lengths = torch.tensor([7, 0, 3, 1, 5])
    logits = model.train()(items, items % 5 + 1, lengths, items[:, 0], items[:, 0] % 5 + 1)
    logits.square().sum().backward()
    return (logits.detach(), {name: p.grad for name, p in model.named_parameters()},
            dict(model.named_buffers()))


def test_a_group_of_one_trains_as_the_unsynchronized_model(group_of_one):
    plain = dice_din()
    synchronized = din_fast.synchronize_dice_statistics(dice_din())
    layers = [m for m in synchronized.modules() if isinstance(m, (Dice, din_fast.DINAttention))]
    assert len(layers) == 3 and all(m.statistics_group is dist.group.WORLD for m in layers)
    for got, want in zip(a_step(synchronized), a_step(plain), strict=True):
        torch.testing.assert_close(got, want)


def test_false_turns_the_synchronization_off(group_of_one):
    model = din_fast.synchronize_dice_statistics(dice_din())
    din_fast.synchronize_dice_statistics(model, process_group=False)
    assert all(getattr(m, "statistics_group", None) is None for m in model.modules())


def test_synchronized_models_copy_and_pickle(group_of_one):
    """A process group cannot be copied: a deepcopy (AveragedModel's, as
    din-fast's weight averaging takes it) and torch.save of the whole model
    raised TypeError. A copy shares the group and trains as the original; a
    pickled model loads with per-process statistics."""
    model = din_fast.synchronize_dice_statistics(dice_din())
    averaged = torch.optim.swa_utils.AveragedModel(model)
    copied = copy.deepcopy(model)
    for twin in (averaged.module, copied):
        assert all(m.statistics_group is dist.group.WORLD for m in twin.modules()
                   if isinstance(m, (Dice, din_fast.DINAttention)))
    for got, want in zip(a_step(copied), a_step(model), strict=True):
        torch.testing.assert_close(got, want)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(getattr(m, "statistics_group", None) is None for m in loaded.modules())
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_it_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        din_fast.synchronize_dice_statistics(dice_din())


def test_double_backward_through_the_synchronized_statistics(group_of_one):
    """Second derivatives (the gradient of a gradient's norm) through the
    collectives are the unsynchronized model's."""
    def second_derivatives(model):
        gen = torch.Generator().manual_seed(2)
        items = torch.randint(1, 21, (4, 5), generator=gen)
        logits = model.train()(items, items % 5 + 1, torch.tensor([5, 2, 0, 4]), items[:, 0],
                               items[:, 0] % 5 + 1)
        params = list(model.parameters())
        grads = torch.autograd.grad(logits.square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum(g.square().sum() for g in grads), params)

    got = second_derivatives(din_fast.synchronize_dice_statistics(dice_din()))
    torch.testing.assert_close(got, second_derivatives(dice_din()))
