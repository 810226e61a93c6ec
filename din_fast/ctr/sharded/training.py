"""Distributed training of TorchRecDIN: ``torchrun --nproc_per_node N -m din_fast train ...``.

The same data, samples, protocol and global batches as single-process
``din-fast train`` (din_fast.ctr.training.fit_learner: validation every epoch,
early stopping on validation GAUC, the best epoch restored, the test set
scored once): every process builds the same seeded global batches and trains
on its share of each (rows rank, rank + N, ...), so a training step does not
depend on the number of processes beyond floating-point order (Dice's batch
statistics are taken over the global batch, din_fast.synchronize_dice_statistics;
the tables' initial values do depend on it: each process draws its own shards). Gradients are those of the mean loss over the global
batch plus the mini-batch aware L2 penalty of the rows the global batch
looks up: each process's loss is its share's sum times N / (global batch
size), plus N times the penalty of the rows whose first occurrence in the
global batch falls in its share; DistributedDataParallel (the dense layers)
and TorchRec (the tables, in its all-to-all backward) average over the
processes. The tables are trained by their fused optimizer (see
din_fast.ctr.sharded.EMBEDDING_OPTIMIZERS), the dense layers by Adam with the
learning-rate decay. Metrics gather every process's logits; the checkpoint is
din_fast.DIN's, which single-process ``din-fast evaluate`` loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.optimizers import in_backward_optimizer_filter

from ..checkpoint import save_checkpoint
from ..config import TrainConfig, build_model
from ..data import Batch, EncodedData, Samples, iterate_batches
from ..files import write_json
from ..training import (EVAL_BATCH_SIZE, Learner, TrainingInterrupted, check_device_and_backend,
                        check_training_outputs, describe_data, fit_learner, load_training_data,
                        metrics_of)
from .model import (TorchRecDIN, batch_features, din_state_dict, plan_summary, shard_model,
                    smallest_key_per_value)
from .options import (DEFAULT_EMBEDDING_LR, DEFAULT_EMBEDDING_OPTIMIZER, OptionError,
                      check_options, check_single_process_options, under_torchrun)


# Samples per process in a training batch: an empty share would train on a
# stand-in row (rank_share), which the synchronized Dice statistics would count.
MIN_SHARE = 1


@contextlib.contextmanager
def process_group(device: str):
    """The default process group of a torchrun launch (NCCL on CUDA, gloo on
    CPU), or a group of one process outside torchrun; destroyed on exit.

    Args:
        device: "cpu" or "cuda" (then this process's GPU is LOCAL_RANK's,
            made the current one).

    Yields:
        This process's torch.device.
    """
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
        # The ranks tear down together: gloo aborts a rank whose peer has
        # already destroyed the group. Only on a normal exit: after an error
        # the other ranks may never get here, and waiting would hang.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_share(batch: Batch) -> tuple[Batch, int]:
    """This process's rows of a global batch, rank, rank + N, ... (batches are
    sorted by history length, so every process gets a similar mix), and how
    many of them are samples. TorchRec cannot take an empty batch, so a process
    whose share is empty (a last batch smaller than N) gets one stand-in: no
    history and the padding id 0 as target. Its output is to be dropped; it
    touches only the padding rows and gives them zero gradient, but in
    training it would enter the MLP's Dice statistics, so the trainer never
    makes one there (MIN_SHARE); evaluation has no batch statistics.

    Args:
        batch: the global din_fast.ctr.data.Batch, the same on every process.

    Returns:
        (this process's Batch, its number of samples: 0 for the stand-in).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    share = batch.map(lambda t: t[rank::world])
    if len(share.labels):
        return share, len(share.labels)
    return share.map(lambda t: t.new_zeros((1,) + t.shape[1:])), 0


def penalized_rows(batch: Batch, inverse_frequency: dict, device) -> dict:
    """The rows this process penalizes for a global batch: every distinct id
    the batch looks up (padding aside) once, by the process whose share
    holds the id's first sample, so that the processes' penalties add up to
    the single-process one.

    Args:
        batch: the global din_fast.ctr.data.Batch (on the CPU).
        inverse_frequency: din_fast.ctr.training.inverse_frequencies of the
            data ("item" and "category", on the CPU).
        device: where the returned tensors go.

    Returns:
        {"item", "category": (int64 ids [N], float32 1 / frequency [N])},
        TorchRecDIN.forward's ``penalized``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    size, width = batch.history_items.shape
    valid = torch.arange(width) < batch.lengths[:, None]
    sample = torch.arange(size)
    samples = torch.cat([sample[:, None].expand(size, width)[valid], sample])
    penalized = {}
    for table, history, target in (
            ("item", batch.history_items, batch.target_items),
            ("category", batch.history_categories, batch.target_categories)):
        ids = torch.cat([history[valid], target])
        looked_up = ids != 0
        unique, first_sample = smallest_key_per_value(ids[looked_up], samples[looked_up])
        own = unique[first_sample % world == rank]
        penalized[table] = (own.to(device), inverse_frequency[table][own].to(device))
    return penalized


def dense_parameters(sharded) -> list:
    """The parameters that the tables' fused optimizer does not train.

    Args:
        sharded: a TorchRecDIN from din_fast.ctr.sharded.model.shard_model.

    Returns:
        [Parameter]: the attention unit's and the MLP's.
    """
    return [p for _, p in in_backward_optimizer_filter(sharded.named_parameters())]


def train_step(sharded, optimizer, batch: Batch, device, l2: float = 0.0,
               inverse_frequency: Optional[dict] = None) -> torch.Tensor:
    """One step on this process's share of a global batch (a collective):
    the gradient of the global batch's mean loss (and penalty), the dense
    layers stepped by ``optimizer``, the tables by their fused optimizer.

    Args:
        sharded: a TorchRecDIN from din_fast.ctr.sharded.model.shard_model.
        optimizer: the dense layers' optimizer.
        batch: the global din_fast.ctr.data.Batch, the same on every
            process, on the CPU.
        device: this process's torch.device.
        l2: the mini-batch aware L2's weight; 0 for none.
        inverse_frequency: per table, din_fast.ctr.training.inverse_frequencies;
            needed when ``l2`` > 0.

    Returns:
        The summed loss of the share (without the penalty), detached, a 0-d
        tensor on ``device``.
    """
    share, count = rank_share(batch)
    features = batch_features(share).to(device)
    width = batch.history_items.shape[1]
    penalty = 0.0
    if l2:
        logits, penalty = sharded(features, width,
                                  penalized_rows(batch, inverse_frequency, device))
    else:
        logits = sharded(features, width)
    loss_sum = F.binary_cross_entropy_with_logits(logits[:count],
                                                  share.labels[:count].to(device),
                                                  reduction="sum")
    optimizer.zero_grad(set_to_none=True)
    ((loss_sum / len(batch.labels) + l2 * penalty) * dist.get_world_size()).backward()
    optimizer.step()
    return loss_sum.detach()


class ShardedLearner(Learner):
    """din_fast.ctr.training.LocalLearner's counterpart for a sharded TorchRecDIN:
    Adam trains the dense layers (the tables train in their fused optimizer);
    every method is a collective. Every process's share of a training batch
    holds MIN_SHARE samples at least.

    Args:
        sharded: a TorchRecDIN from din_fast.ctr.sharded.model.shard_model.
        data: the EncodedData trained on (the same on every process).
        config: the run's settings.
        device: this process's torch.device.
    """

    def __init__(self, sharded, data: EncodedData, config: TrainConfig, device):
        # Two samples at least globally, as in one process (Dice's batch statistics).
        super().__init__(dense_parameters(sharded), data, config, "cpu",
                         min_batch=max(2, MIN_SHARE * dist.get_world_size()))
        self.sharded, self.device = sharded, device

    def train_epoch(self, samples: Samples, bar) -> float:
        """One pass over ``samples`` (a collective), then the learning-rate
    decay.

    Args:
        samples: the epoch's training Samples (the same on every process).
        bar: wraps the batches for display (see
            din_fast.ctr.training.Learner.training_batches).

    Returns:
        The mean training loss over the samples, without the penalty.
    """
        self.sharded.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for _, batch in self.training_batches(samples, bar):
            loss_sum += train_step(self.sharded, self.optimizer, batch, self.device,
                                   self.config.l2, self.inverse_frequency)
        dist.all_reduce(loss_sum)
        self.end_epoch()
        return loss_sum.item() / len(samples)

    @torch.no_grad()
    def evaluate(self, samples: Samples, prefix: str) -> dict:
        """Metrics over all ``samples``, each process scoring its share of
        every batch (a collective).

        Args:
            samples: the Samples to score (the same on every process).
            prefix: the metrics' names' start ("validation", "test").

        Returns:
            ``{prefix}_auc``, ``{prefix}_gauc`` and ``{prefix}_logloss``, the
            same on every process.

        Raises:
            din_fast.ctr.errors.InputError: a NaN or Inf score.
        """
        self.sharded.eval()
        rank, world = dist.get_rank(), dist.get_world_size()
        indices, logits = [], []
        for batch_indices, batch in iterate_batches(self.data, samples, EVAL_BATCH_SIZE * world,
                                                    max_len=self.config.max_len):
            share, count = rank_share(batch)
            indices.append(batch_indices[rank::world])
            logits.append(self.sharded(batch_features(share).to(self.device),
                                       batch.history_items.shape[1])
                          [:count].double().cpu().numpy())
        gathered = [None] * world
        dist.all_gather_object(gathered, (np.concatenate(indices), np.concatenate(logits)))
        all_logits = np.empty(len(samples), dtype=np.float64)
        for rank_indices, rank_logits in gathered:
            all_logits[rank_indices] = rank_logits
        return metrics_of(samples, all_logits, prefix)

    def _local_tensors(self):
        """This process's weights: its table shards and the dense tensors."""
        for value in self.sharded.state_dict().values():
            if isinstance(value, ShardedTensor):
                yield from (shard.tensor for shard in value.local_shards())
            else:
                yield value

    def snapshot(self) -> list:
        """A copy of this process's weights (its table shards and the dense
        tensors), for :meth:`restore`."""
        return [t.detach().clone() for t in self._local_tensors()]

    @torch.no_grad()
    def restore(self, snapshot: list) -> None:
        """Load weights :meth:`snapshot` took on this process.

        Args:
            snapshot: the list :meth:`snapshot` returned.
        """
        for tensor, saved in zip(self._local_tensors(), snapshot, strict=True):
            tensor.copy_(saved)


def train_sharded(config: TrainConfig, sharding: Optional[str] = None, *,
                  embedding_optimizer: str = DEFAULT_EMBEDDING_OPTIMIZER,
                  embedding_lr: float = DEFAULT_EMBEDDING_LR, checkpoint: Optional[str] = None,
                  metrics_out: Optional[str] = None, progress: bool = True,
                  log=print) -> Optional[dict]:
    """Train TorchRecDIN in the process group of a torchrun launch (or alone).

    Returns the metrics on rank 0 (also written to ``metrics_out``), None on
    the other ranks: din_fast.ctr.training.train's keys, plus ``world_size``,
    ``sharding`` (the plan: each table's sharding type and ranks),
    ``embedding_optimizer`` and ``embedding_lr``. Each epoch's ``train_loss``
    is the mean loss over its training samples. The output paths are checked
    before any work (din_fast.ctr.training.check_training_outputs). On Ctrl-C
    (TrainingInterrupted), one process saves the best epoch so far to
    ``checkpoint``; several do not (gathering the tables is a collective that
    processes stopped at different points could not finish).

    Args:
        config: the run's settings (model "din", no ``top_k``, no
            ``compile``, no labeled log and no linear part: see
            din_fast.ctr.sharded.check_single_process_options).
        sharding: one of SHARDING_TYPES, or None (TorchRec's planner
            chooses).
        embedding_optimizer: the tables' optimizer, one of
            EMBEDDING_OPTIMIZERS.
        embedding_lr: the tables' learning rate.
        checkpoint: where rank 0 saves din_fast.DIN's checkpoint (the
            gathered tables; written once, after training); None: not saved.
        metrics_out: where rank 0 writes the metrics as JSON; None: not
            written.
        progress: show a progress bar on rank 0 (where stderr is a terminal).
        log: called on rank 0 with each line to report.

    Returns:
        The metrics on rank 0, None on the other ranks.

    Raises:
        OptionError: options sharded training cannot run (a model other
            than din, ``top_k``, ``compile``, a labeled log
            (``label_column``), the linear part, a bad embedding optimizer or
            learning rate, a batch smaller than the processes, too few
            training samples).
        din_fast.ctr.errors.InputError: an output path that cannot be used,
            a device or backend this machine lacks, data that cannot be read
            or gives no training sample.
        din_fast.ctr.training.TrainingInterrupted: Ctrl-C.
    """
    check_options(config.model, embedding_optimizer, embedding_lr, config.device)
    check_single_process_options(config)
    if config.top_k is not None:
        raise OptionError(f"--top-k {config.top_k}: sharded training runs exact DIN (its "
                          "attention reads the histories jagged, which the two-stage mode "
                          "does not take); leave out --top-k or --sharding")
    if config.compile:
        raise OptionError("sharded training runs eagerly: --compile is not supported with "
                          "TorchRec's sharded tables; drop --compile, or train in one process "
                          "without --sharding")
    check_training_outputs(config, checkpoint, metrics_out)
    with process_group(config.device) as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        if config.batch_size < MIN_SHARE * world:
            raise OptionError(f"--batch-size {config.batch_size} is too small for {world} "
                              f"process(es): each needs {MIN_SHARE} sample(s) of every batch "
                              f"(at least {MIN_SHARE * world})")
        check_device_and_backend(config)   # after set_device: on this process's GPU
        if rank != 0:
            log, progress = (lambda *_: None), False
        torch.manual_seed(config.seed)
        data, splits = load_training_data(config)
        if 2 * len(splits.train) < MIN_SHARE * world:
            raise OptionError(f"{data.source}: {2 * len(splits.train)} training "
                              f"samples are too few for {world} processes (each needs "
                              f"{MIN_SHARE})")
        log(describe_data(data, splits))
        model = TorchRecDIN(data.num_items, data.num_categories, embed_dim=config.embed_dim,
                            mlp_activation=config.mlp_activation, backend=config.backend,
                            mlp_input=config.mlp_input, mlp_hidden=config.mlp_hidden,
                            attention_hidden=config.attention_hidden,
                            attention_activation=config.attention_activation,
                            attention_normalization=config.attention_normalization,
                            device=device)
        backend = model.attention.resolved_backend()
        sharded = shard_model(model, device, sharding, embedding_optimizer=embedding_optimizer,
                              embedding_lr=embedding_lr,
                              batch_size=-(-config.batch_size // world))
        plan = plan_summary(sharded)
        log(f"{world} process(es); tables: " + ", ".join(
            f"{name} {p['sharding_type']} on ranks {p['ranks']}" for name, p in plan.items()))
        try:
            result = fit_learner(ShardedLearner(sharded, data, config, device), data, splits,
                                 config, progress=progress, log=log)
        except TrainingInterrupted as interrupted:
            # Gathering the tables is a collective, which processes interrupted
            # at different points would never finish: one process saves alone.
            if checkpoint and interrupted.best is not None and world == 1:
                save_checkpoint(checkpoint, _din_of(din_state_dict(sharded), data, config),
                                data.id_maps, config)
                interrupted.saved = checkpoint
            elif checkpoint:
                interrupted.unsaved = f"{world} processes cannot gather the tables once stopped"
            raise
        result.update(model=config.model, backend=backend, world_size=world, sharding=plan,
                      embedding_optimizer=embedding_optimizer, embedding_lr=embedding_lr,
                      config=dataclasses.asdict(config),
                      data_fingerprint=data.id_maps.fingerprint())
        state = din_state_dict(sharded) if checkpoint else None
        if rank != 0:
            return None
        if checkpoint:
            save_checkpoint(checkpoint, _din_of(state, data, config), data.id_maps, config)
        if metrics_out:
            write_json(metrics_out, result, "--metrics-out")
        return result


def _din_of(state: dict, data: EncodedData, config: TrainConfig):
    """din_fast.DIN on the CPU holding a sharded model's gathered ``state``."""
    din = build_model(dataclasses.replace(config, device="cpu"), data.num_items,
                      data.num_categories)
    din.load_state_dict(state)
    return din
