"""benchmarks.train_vs_deepctr: DeepCTR-Torch's DIN trained by din_fast's protocol."""

import pytest
import torch

from din_fast.ctr.config import TrainConfig
from din_fast.ctr.data import build_samples, encode, iterate_batches
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.training import fit

from benchmarks import train_vs_deepctr as bench
from benchmarks.peers import deepctr_module


@pytest.fixture(scope="module")
def din_class():
    module = deepctr_module("models.din")
    if module is None:
        pytest.skip("deepctr-torch is not installed (pip install --no-deps deepctr-torch)")
    return module.DIN


@pytest.mark.parametrize("matched", [True, False])
def test_deepctr_din_scores_din_fast_batches(din_class, matched):
    data = encode(synthetic_interactions(num_users=30, seed=2))
    splits = build_samples(data, seed=0)
    config = TrainConfig(epochs=1, batch_size=64, embed_dim=4, max_len=20, l2=0.01)
    torch.manual_seed(0)
    model = bench.DeepCTRDIN(din_class, data.num_items, data.num_categories, config.embed_dim,
                             config.max_len, **bench.deepctr_options(config, matched))
    _, batch = next(iterate_batches(data, splits.test, 16, max_len=config.max_len))
    logits = model(*batch[:5])
    assert logits.shape == (16,) and torch.isfinite(logits).all()
    if matched:
        # The candidate columns reach DeepCTR's embeddings: other candidates,
        # other scores (its defaults start with 1e-4 weights, below float32's
        # resolution of the output).
        other = model(*batch[:3], batch.target_items.flip(0), batch.target_categories.flip(0))
        assert not torch.equal(logits, other)
    result = fit(model, data, splits, config, progress=False, log=lambda *_: None)
    assert 0.0 <= result["test_gauc"] <= 1.0 and result["epochs_run"] == 1
