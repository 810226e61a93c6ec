"""din_fast.ctr.weight_average (train --ema): the average's arithmetic, its
buffers, its state, and the option's checks."""

import math

import pytest
import torch

from din_fast.ctr.config import TrainConfig
from din_fast.ctr.errors import InputError
from din_fast.ctr.weight_average import WeightAverage


def model_with_statistics() -> torch.nn.Module:
    """Weights, float buffers (running statistics) and an integer one (a count)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def train_step(model, optimizer, rows: int = 5) -> None:
    model.train()
    optimizer.zero_grad()
    (model(torch.randn(rows, 3)) - torch.randn(rows, 4)).square().sum().backward()
    optimizer.step()


def test_the_average_follows_the_weights_and_their_statistics():
    """The first step's weights start the average; each later step moves it
    1 - decay of the way. Running statistics are averaged alike; the batch
    count is the trained model's."""
    model, decay = model_with_statistics(), 0.75
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    average = WeightAverage(model, decay)
    seen = []
    for _ in range(3):
        train_step(model, optimizer)
        average.update(model)
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
    averaged = average.model.state_dict()
    for key, value in averaged.items():
        if key.endswith("num_batches_tracked"):
            assert value == seen[-1][key] == 3
            continue
        expected = seen[0][key]
        for later in seen[1:]:
            expected = decay * expected + (1 - decay) * later[key]
        torch.testing.assert_close(value, expected)
        assert not torch.equal(value, seen[-1][key]), key
    # The trained model is left alone, and the average is a copy of it.
    assert all(torch.equal(model.state_dict()[k], seen[-1][k]) for k in seen[-1])
    assert average.model is not model


def test_the_average_continues_from_its_state():
    """An average loaded from another's state (a resumed run's) goes on as
    the other does."""
    model = model_with_statistics()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = WeightAverage(model, 0.9)
    for _ in range(2):
        train_step(model, optimizer)
        first.update(model)
    second = WeightAverage(model, 0.9)
    second.load_state_dict({k: v for k, v in first.state_dict().items()})
    assert second.state_dict()["steps"] == 2
    train_step(model, optimizer)
    for average in (first, second):
        average.update(model)
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1, math.nan, math.inf, 1, True, "0.9"])
def test_train_config_refuses_a_decay_outside_zero_to_one(decay):
    with pytest.raises(InputError, match=r"`ema` must be None \(no weight averaging\) or a "
                       r"number in \(0, 1\); got"):
        TrainConfig(ema=decay)
    assert TrainConfig(ema=0.999).ema == 0.999 and TrainConfig().ema is None
