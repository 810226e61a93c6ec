"""Training and evaluation of the CTR models on DIN-protocol data, and checkpoints."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import (EncodedData, IdMaps, Samples, build_samples, encode, iterate_batches,
                   load_interactions, synthetic_interactions)
from .metrics import ctr_metrics
from .models import MODELS

CHECKPOINT_FORMAT = "din_fast.checkpoint/1"
EVAL_BATCH_SIZE = 4096
LOSS_SMOOTHING = 0.02  # the progress bar's loss: an exponential average over ~50 batches


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in checkpoints. ``data`` None is the
    seeded synthetic dataset."""

    data: Optional[str] = None
    model: str = "din"
    epochs: int = 2
    batch_size: int = 256
    lr: float = 1e-3
    embed_dim: int = 32
    max_len: Optional[int] = 50
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    attention_normalization: Optional[str] = "softmax"


def load_data(path: Optional[str], seed: int, id_maps: Optional[IdMaps] = None):
    """(EncodedData, train Samples, test Samples) of a data path or the synthetic set."""
    interactions = synthetic_interactions(seed=seed) if path is None else load_interactions(path)
    data = encode(interactions, id_maps)
    train, test = build_samples(data, seed)
    return data, train, test


def build_model(config: TrainConfig, data: EncodedData) -> torch.nn.Module:
    if config.model not in MODELS:
        raise ValueError(f"`model` must be one of {tuple(MODELS)}; got {config.model!r}")
    options = {"attention_normalization": config.attention_normalization} \
        if config.model == "din" else {}
    return MODELS[config.model](data.num_items, data.num_categories, embed_dim=config.embed_dim,
                                backend=config.backend, **options).to(config.device)


@torch.no_grad()
def evaluate(model, data: EncodedData, samples: Samples, max_len, device) -> dict:
    """test_auc, test_gauc, test_logloss of ``model`` on ``samples``."""
    model.eval()
    logits = np.empty(len(samples), dtype=np.float64)
    for indices, batch in iterate_batches(data, samples, EVAL_BATCH_SIZE, max_len=max_len):
        batch = batch.to(device)
        logits[indices] = model(*batch[:5]).double().cpu().numpy()
    return ctr_metrics(samples.user, samples.label, logits)


def train(config: TrainConfig, *, checkpoint: Optional[str] = None,
          metrics_out: Optional[str] = None, progress: bool = True, log=print) -> dict:
    """Train, evaluating on the test samples after every epoch; returns the
    final metrics (also written to ``metrics_out`` as JSON). Their ``backend``
    is the one the attention ran ("torch", "triton"; None for the base model),
    ``config`` the run's settings, the requested backend among them."""
    torch.manual_seed(config.seed)
    data, train_samples, test_samples = load_data(config.data, config.seed)
    if len(train_samples) == 0:
        raise ValueError(f"data {config.data!r} gives no training samples: the DIN protocol "
                         "needs users with at least 3 behaviours")
    log(f"data: {config.data or 'synthetic'}: {len(data.user_ids)} users, {data.num_items} "
        f"items, {data.num_categories} categories; {len(train_samples)} train and "
        f"{len(test_samples)} test samples")
    model = build_model(config, data)
    backend = model.attention_backend()  # what training runs: config.backend resolved
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    rng = np.random.default_rng([config.seed, 2])
    num_batches = -(-len(train_samples) // config.batch_size)
    epochs, train_seconds = [], 0.0
    for epoch in range(1, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        running = None
        bar = tqdm(iterate_batches(data, train_samples, config.batch_size, max_len=config.max_len,
                                   shuffle=True, rng=rng),
                   total=num_batches, desc=f"epoch {epoch}/{config.epochs}", disable=not progress,
                   leave=False)
        for _, batch in bar:
            batch = batch.to(config.device)
            loss = F.binary_cross_entropy_with_logits(model(*batch[:5]), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            running = value if running is None else running + LOSS_SMOOTHING * (value - running)
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        seconds = time.perf_counter() - started
        train_seconds += seconds
        metrics = evaluate(model, data, test_samples, config.max_len, config.device)
        metrics.update(epoch=epoch, train_loss=running, epoch_seconds=seconds,
                       samples_per_second=len(train_samples) / seconds)
        epochs.append(metrics)
        log(f"epoch {epoch}: test AUC {metrics['test_auc']:.4f}  GAUC {metrics['test_gauc']:.4f}  "
            f"logloss {metrics['test_logloss']:.4f}  train loss {running:.4f}  "
            f"{metrics['samples_per_second']:.0f} samples/s ({seconds:.1f} s)")
    result = {key: epochs[-1][key] for key in ("test_auc", "test_gauc", "test_logloss")}
    result.update(model=config.model, backend=backend, train_seconds=train_seconds,
                  samples_per_second=len(train_samples) * config.epochs / train_seconds,
                  train_samples=len(train_samples), test_samples=len(test_samples),
                  config=asdict(config), epochs=epochs)
    if checkpoint:
        save_checkpoint(checkpoint, model, data.id_maps, config, result)
    if metrics_out:
        with open(metrics_out, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def save_checkpoint(path: str, model, id_maps: IdMaps, config: TrainConfig, metrics: dict):
    torch.save({"format": CHECKPOINT_FORMAT, "config": asdict(config),
                "state_dict": model.state_dict(), "id_maps": id_maps.to_state(),
                "metrics": {k: metrics[k] for k in ("test_auc", "test_gauc", "test_logloss")}},
               path)


def evaluate_checkpoint(path: str, data: Optional[str] = None, *,
                        backend: Optional[str] = None, device: Optional[str] = None) -> dict:
    """Rebuild the model and the test samples of a checkpoint and evaluate.

    The test set is rebuilt from ``data`` (default: the training run's data)
    with the saved id maps and seed, so on the training data it is the same
    test set and the metrics are the ones the run reported.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a din_fast checkpoint "
                         f"(expected format {CHECKPOINT_FORMAT!r})")
    config = TrainConfig(**state["config"])
    if data is not None:
        config.data = data
    if backend is not None:
        config.backend = backend
    if device is not None:
        config.device = device
    encoded, _, test_samples = load_data(config.data, config.seed,
                                         IdMaps.from_state(state["id_maps"]))
    model = build_model(config, encoded)
    model.load_state_dict(state["state_dict"])
    metrics = evaluate(model, encoded, test_samples, config.max_len, config.device)
    metrics.update(model=config.model, backend=model.attention_backend(),
                   test_samples=len(test_samples))
    return metrics
