"""Training and evaluation of the CTR models on DIN-protocol data."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, build_model
from .data import (EncodedData, Samples, build_samples, encode, iterate_batches,
                   known_test_samples, load_interactions, synthetic_interactions)
from .errors import InputError
from .metrics import ctr_metrics
from .modules import DINAttention

EVAL_BATCH_SIZE = 4096
LOSS_SMOOTHING = 0.02  # the progress bar's loss: an exponential average over ~50 batches
METRICS = ("test_auc", "test_gauc", "test_logloss")


def check_device(device: str) -> None:
    """InputError when this machine has no such device (CUDA, say)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device 'cuda': CUDA is not available here (torch {torch.__version__}"
                         f"{'' if torch.version.cuda else ', a CPU-only build'}); use device 'cpu'")


def check_device_and_backend(config: TrainConfig) -> None:
    """InputError, before any data is read, when this machine cannot run the
    config's device or attention backend (say, --device cuda without CUDA,
    or backend "triton" on CPU tensors without TRITON_INTERPRET)."""
    check_device(config.device)
    if config.model != "din":
        return
    # One small forward of the attention unit with the run's settings on the
    # run's device: it fails exactly as the first training step would.
    probe = DINAttention(2 * config.embed_dim, normalization=config.attention_normalization,
                         backend=config.backend).to(config.device).eval()
    query = torch.zeros(1, 2 * config.embed_dim, device=config.device)
    try:
        with torch.no_grad():
            probe(query, query[:, None], torch.ones(1, dtype=torch.long, device=config.device))
    except ValueError as error:
        raise InputError(f"backend {config.backend!r} on device {config.device!r}: {error}") \
            from None


def load_data(path: Optional[str], seed: int):
    """(EncodedData, train Samples, test Samples) of a data path or the synthetic set."""
    interactions = synthetic_interactions(seed=seed) if path is None else load_interactions(path)
    data = encode(interactions)
    train, test = build_samples(data, seed)
    return data, train, test


@torch.no_grad()
def evaluate(model, data: EncodedData, samples: Samples, max_len, device) -> dict:
    """test_auc, test_gauc, test_logloss of ``model`` on ``samples``."""
    model.eval()
    logits = np.empty(len(samples), dtype=np.float64)
    for indices, batch in iterate_batches(data, samples, EVAL_BATCH_SIZE, max_len=max_len):
        batch = batch.to(device)
        logits[indices] = model(*batch[:5]).double().cpu().numpy()
    if not np.isfinite(logits).all():
        raise InputError(f"the model's scores of {int((~np.isfinite(logits)).sum())} sample(s) "
                         "are NaN or Inf: its weights diverged (try a lower learning rate) or "
                         "are corrupt")
    return {f"test_{k}": v for k, v in ctr_metrics(samples.user, samples.label, logits).items()}


def train(config: TrainConfig, *, checkpoint: Optional[str] = None,
          metrics_out: Optional[str] = None, progress: bool = True, log=print) -> dict:
    """Train, evaluating on the test samples after every epoch; returns the
    final metrics (also written to ``metrics_out`` as JSON). Their ``backend``
    is the one the attention ran ("torch", "triton"; None for the base model),
    ``config`` the run's settings, the requested backend among them."""
    check_device_and_backend(config)
    torch.manual_seed(config.seed)
    data, train_samples, test_samples = load_data(config.data, config.seed)
    if len(train_samples) == 0:
        raise InputError(f"{data.source}: no training samples: the DIN protocol needs users "
                         "with at least 3 behaviours")
    log(f"data: {data.source}: {len(data.user_ids)} users, {data.num_items} "
        f"items, {data.num_categories} categories; {len(train_samples)} train and "
        f"{len(test_samples)} test samples")
    model = build_model(config, data.num_items, data.num_categories).to(config.device)
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
    result = {key: epochs[-1][key] for key in METRICS}
    result.update(model=config.model, backend=backend, train_seconds=train_seconds,
                  samples_per_second=len(train_samples) * config.epochs / train_seconds,
                  train_samples=len(train_samples), test_samples=len(test_samples),
                  config=asdict(config), epochs=epochs)
    if checkpoint:
        save_checkpoint(checkpoint, model, data.id_maps, config)
    if metrics_out:
        write_json(metrics_out, result)
    return result


def write_json(path: str, values: dict) -> None:
    with open(path, "w") as handle:
        json.dump(values, handle, indent=2)


def evaluate_checkpoint(path: str, data: Optional[str] = None, *, backend: str = "auto",
                        device: str = "cpu") -> dict:
    """Test metrics of a checkpoint on ``data``, with its id maps and seed.

    ``data`` None is allowed only for a checkpoint trained on the synthetic
    set (which is regenerated): a checkpoint never chooses which files are
    read. On the training data the test set is the run's and so are the
    metrics. Samples whose test item the checkpoint does not know are left
    out (counted in ``excluded_test_samples``); unknown history items are
    skipped (``skipped_history_items``).
    """
    check_device(device)
    checkpoint = load_checkpoint(path)
    config = replace(checkpoint.config, data=data, backend=backend, device=device)
    check_device_and_backend(config)
    if data is None and checkpoint.config.data is not None:
        raise InputError(f"checkpoint {path} was trained on a data file; pass the data to "
                         "evaluate on with --data (a checkpoint does not choose what is read)")
    interactions = synthetic_interactions(seed=config.seed) if data is None \
        else load_interactions(data)
    known = known_test_samples(encode(interactions, checkpoint.id_maps), config.seed)
    if len(known.samples) == 0:
        raise InputError(f"{interactions.source}: no test sample left: the checkpoint knows "
                         "none of the users' test items")
    model = build_model(config, len(checkpoint.id_maps.item_ids),
                        len(checkpoint.id_maps.category_ids))
    model.load_state_dict(checkpoint.state_dict)
    model.to(config.device)
    metrics = evaluate(model, known.data, known.samples, config.max_len, config.device)
    metrics.update(model=config.model, backend=model.attention_backend(),
                   test_samples=len(known.samples), excluded_test_samples=known.excluded_samples,
                   skipped_history_items=known.skipped_history_items)
    return metrics
