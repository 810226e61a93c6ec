"""Distributed training of TorchRecDIN: ``torchrun --nproc_per_node N -m din_fast train ...``.

The same data, samples, global batches and test protocol as single-process
``din-fast train`` (din_fast.training): every process builds the same seeded
global batches and trains on its share of each (rows rank, rank + N, ...), so
a training step does not depend on the number of processes beyond
floating-point order (the tables' initial values do: each process draws its
own shards). Gradients are those of the mean loss over the global batch: each
process's loss is its share's sum times N / (global batch size), and both
DistributedDataParallel (the dense layers) and TorchRec (the tables, in its
all-to-all backward) average over the processes. The tables are trained by
their fused optimizer (see din_fast.sharded.EMBEDDING_OPTIMIZERS), the dense
layers by Adam. Test metrics gather every process's logits; the checkpoint is
din_fast.DIN's, which single-process ``din-fast evaluate`` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from ..data import Batch, iterate_batches
from ..metrics import ctr_metrics
from ..training import EVAL_BATCH_SIZE, TrainConfig, build_model, load_data, save_checkpoint
from . import DEFAULT_EMBEDDING_LR, DEFAULT_EMBEDDING_OPTIMIZER, check_options, under_torchrun
from .model import (TorchRecDIN, batch_features, din_state_dict, plan_summary, shard_model)


@contextlib.contextmanager
def process_group(device: str):
    """The default process group of a torchrun launch (NCCL on CUDA, gloo on
    CPU), or a group of one process outside torchrun; yields the device of this
    process."""
    if device == "cuda":
        local_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(local_device)
    else:
        local_device = torch.device("cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    if under_torchrun():
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield local_device
    finally:
        dist.destroy_process_group()


def rank_share(batch: Batch) -> tuple[Batch, int]:
    """This process's rows of a global batch, rank, rank + N, ... (batches are
    sorted by history length, so every process gets a similar mix), and how
    many of them are samples. TorchRec cannot take an empty batch, so a process
    whose share is empty (a last batch smaller than N) gets one stand-in: no
    history and the padding id 0 as target. Its output is to be dropped; it
    touches only the padding rows and gives them zero gradient."""
    rank, world = dist.get_rank(), dist.get_world_size()
    share = Batch(*(t[rank::world] for t in batch))
    if len(share.labels):
        return share, len(share.labels)
    return Batch(*(t.new_zeros((1,) + t.shape[1:]) for t in share)), 0


def dense_parameters(sharded) -> list:
    """The parameters that the tables' fused optimizer does not train."""
    return [p for _, p in in_backward_optimizer_filter(sharded.named_parameters())]


def train_step(sharded, optimizer, batch: Batch, device) -> torch.Tensor:
    """One step on this process's share of a global batch (a collective); the
    summed loss of the share, detached."""
    share, count = rank_share(batch)
    logits = sharded(batch_features(share).to(device), batch.history_items.shape[1])
    loss_sum = F.binary_cross_entropy_with_logits(logits[:count],
                                                  share.labels[:count].to(device),
                                                  reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    (loss_sum * (dist.get_world_size() / len(batch.labels))).backward()
    optimizer.step()
    return loss_sum.detach()


@torch.no_grad()
def evaluate_sharded(sharded, data, samples, max_len, device) -> dict:
    """test_auc, test_gauc, test_logloss over all ``samples``, each process
    scoring its share of every batch (a collective)."""
    sharded.eval()
    indices, logits = [], []
    for batch_indices, batch in iterate_batches(data, samples,
                                                EVAL_BATCH_SIZE * dist.get_world_size(),
                                                max_len=max_len):
        share, count = rank_share(batch)
        indices.append(batch_indices[dist.get_rank()::dist.get_world_size()])
        logits.append(sharded(batch_features(share).to(device), batch.history_items.shape[1])
                      [:count].double().cpu().numpy())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (np.concatenate(indices), np.concatenate(logits)))
    all_logits = np.empty(len(samples), dtype=np.float64)
    for rank_indices, rank_logits in gathered:
        all_logits[rank_indices] = rank_logits
    return ctr_metrics(samples.user, samples.label, all_logits)


def train_sharded(config: TrainConfig, sharding: Optional[str] = None, *,
                  embedding_optimizer: str = DEFAULT_EMBEDDING_OPTIMIZER,
                  embedding_lr: float = DEFAULT_EMBEDDING_LR, checkpoint: Optional[str] = None,
                  metrics_out: Optional[str] = None, progress: bool = True,
                  log=print) -> Optional[dict]:
    """Train TorchRecDIN in the process group of a torchrun launch (or alone).

    Returns the final metrics on rank 0 (also written to ``metrics_out``),
    None on the other ranks: din_fast.training.train's keys, plus
    ``world_size``, ``sharding`` (the plan: each table's sharding type and
    ranks), ``embedding_optimizer`` and ``embedding_lr``. ``train_loss`` is the
    mean loss over each epoch's training samples.
    """
    check_options(config.model, embedding_optimizer, embedding_lr, config.device)
    with process_group(config.device) as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank != 0:
            log, progress = (lambda *_: None), False
        torch.manual_seed(config.seed)
        data, train_samples, test_samples = load_data(config.data, config.seed)
        if len(train_samples) == 0:
            raise ValueError(f"data {config.data!r} gives no training samples: the DIN "
                             "protocol needs users with at least 3 behaviours")
        log(f"data: {config.data or 'synthetic'}: {len(data.user_ids)} users, "
            f"{data.num_items} items, {data.num_categories} categories; "
            f"{len(train_samples)} train and {len(test_samples)} test samples")
        model = TorchRecDIN(data.num_items, data.num_categories, embed_dim=config.embed_dim,
                            backend=config.backend,
                            attention_normalization=config.attention_normalization,
                            device=device)
        backend = model.attention.resolved_backend()
        sharded = shard_model(model, device, sharding, embedding_optimizer=embedding_optimizer,
                              embedding_lr=embedding_lr,
                              batch_size=-(-config.batch_size // world))
        plan = plan_summary(sharded)
        log(f"{world} process(es); tables: " + ", ".join(
            f"{name} {p['sharding_type']} on ranks {p['ranks']}" for name, p in plan.items()))
        optimizer = torch.optim.Adam(dense_parameters(sharded), lr=config.lr)
        rng = np.random.default_rng([config.seed, 2])   # the batches of din_fast.training.train
        num_batches = -(-len(train_samples) // config.batch_size)
        epochs, train_seconds = [], 0.0
        for epoch in range(1, config.epochs + 1):
            sharded.train()
            started = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            bar = tqdm(iterate_batches(data, train_samples, config.batch_size,
                                       max_len=config.max_len, shuffle=True, rng=rng),
                       total=num_batches, desc=f"epoch {epoch}/{config.epochs}",
                       disable=not progress, leave=False)
            for _, batch in bar:
                loss_sum += train_step(sharded, optimizer, batch, device)
            dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / len(train_samples)
            seconds = time.perf_counter() - started
            train_seconds += seconds
            metrics = evaluate_sharded(sharded, data, test_samples, config.max_len, device)
            metrics.update(epoch=epoch, train_loss=train_loss, epoch_seconds=seconds,
                           samples_per_second=len(train_samples) / seconds)
            epochs.append(metrics)
            log(f"epoch {epoch}: test AUC {metrics['test_auc']:.4f}  GAUC "
                f"{metrics['test_gauc']:.4f}  logloss {metrics['test_logloss']:.4f}  "
                f"train loss {train_loss:.4f}  {metrics['samples_per_second']:.0f} "
                f"samples/s ({seconds:.1f} s)")
        result = {key: epochs[-1][key] for key in ("test_auc", "test_gauc", "test_logloss")}
        result.update(model=config.model, backend=backend, train_seconds=train_seconds,
                      samples_per_second=len(train_samples) * config.epochs / train_seconds,
                      train_samples=len(train_samples), test_samples=len(test_samples),
                      world_size=world, sharding=plan, embedding_optimizer=embedding_optimizer,
                      embedding_lr=embedding_lr, config=dataclasses.asdict(config), epochs=epochs)
        state = din_state_dict(sharded) if checkpoint else None
        if rank != 0:
            return None
        if checkpoint:
            din = build_model(dataclasses.replace(config, device="cpu"), data)
            din.load_state_dict(state)
            save_checkpoint(checkpoint, din, data.id_maps, config, result)
        if metrics_out:
            with open(metrics_out, "w") as handle:
                json.dump(result, handle, indent=2)
        return result
