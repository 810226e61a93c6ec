"""Training and evaluation of the CTR models: on behaviours by the DIN
protocol (negatives sampled) or on a labeled log (din_fast.ctr.labeled_samples)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import (RUN_STATE_SUFFIX, RunState, load_checkpoint, restored_model,
                         resume_path, save_checkpoint, save_run_state, save_weights)
from .config import HISTORY_CROSS_LR, TrainConfig, build_model, model_for
from .data import (BATCH_STREAM, EncodedData, IdMaps, Samples, SampleSplits, build_samples,
                   encode, iterate_batches, known_test_samples, reserved_ids_read,
                   training_behaviours)
from .errors import CheckpointError, InputError
from .files import check_output_directory, check_outputs, same_file, write_json
from .foreign_data import MAX_UNKNOWN, check_behaviours, check_log
from .labeled_loader import LogColumns, load_labeled_log
from .labeled_samples import LogSplit, encode_log, labeled_samples, split_log
from .loaders import data_files, load_interactions, synthetic_interactions
from .metrics import ctr_metrics
from .rare_ids import rare_ids, with_rare_ids
from .run_log import EpochLog
from .weight_average import WeightAverage

EVAL_BATCH_SIZE = 4096
LOSS_SMOOTHING = 0.02  # the progress bar's loss: an exponential average over ~50 batches
METRIC_NAMES = ("auc", "gauc", "logloss")


def check_device(device: str) -> None:
    """Check that this machine has ``device``.

    Args:
        device: "cpu" or "cuda".

    Raises:
        din_fast.ctr.errors.InputError: "cuda" without CUDA here (a
            CPU-only torch build, or no GPU).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device 'cuda': CUDA is not available here (torch {torch.__version__}"
                         f"{'' if torch.version.cuda else ', a CPU-only build'}); use device 'cpu'")


def check_device_and_backend(config: TrainConfig) -> None:
    """Check, before any data is read, that this machine can run the
    config's device and attention backend: one forward of a one-item model
    with the run's settings, which fails as the first training step would.

    Args:
        config: the run's settings (its device, backend and, for DIN, the
            attention's options).

    Raises:
        din_fast.ctr.errors.InputError: the device is missing (--device
            cuda without CUDA), or the attention cannot run the backend
            there (backend "triton" on CPU tensors without TRITON_INTERPRET,
            say); the message names both.
    """
    check_device(config.device)
    if config.model != "din":
        return
    # One forward of a one-item model with the run's settings on the run's
    # device: it fails exactly as the first training step would.
    probe = build_model(replace(config, numeric_features=()), 1, 1).to(config.device).eval()
    ones = torch.ones(1, 1, dtype=torch.long, device=config.device)
    try:
        with torch.no_grad():
            probe(ones, ones, ones[0], ones[0], ones[0])
    except ValueError as error:
        raise InputError(f"backend {config.backend!r} on device {config.device!r}: {error}") \
            from None


def load_data(path: Optional[str], seed: int, min_count: int = 1, interactions=None):
    """Behaviours and their samples by the DIN protocol.

    Args:
        path: a data file or directory (din_fast.ctr.loaders.load_interactions);
            None: the synthetic set of ``seed``.
        seed: seeds the synthetic set and the validation and test negatives.
        min_count: ids seen fewer times among the training behaviours
            share a reserved row (din_fast.ctr.rare_ids); 1: every id of
            the data its own row.
        interactions: the behaviours of ``path``, read already (what
            :func:`read_config_data` returns); None: read them.

    Returns:
        (EncodedData, SampleSplits): the data in the model's ids, and its
        leave-one-out samples (din_fast.ctr.data.build_samples).

    Raises:
        din_fast.ctr.errors.DataFormatError: a data file that cannot be read
            as behaviours (from the loader and the encoding).
    """
    if interactions is None:
        interactions = synthetic_interactions(seed=seed) if path is None \
            else load_interactions(path)
    data = encode(interactions)
    splits = build_samples(data, seed)
    return (data, splits) if min_count == 1 else with_rare_ids(data, splits, min_count)


def log_columns(config: TrainConfig, checkpoint=None) -> LogColumns:
    """The columns of the labeled log a config reads.

    Args:
        config: a config with ``label_column`` set.
        checkpoint: the checkpoint the config comes from (evaluate,
            predict), named in the message about a missing column; None
            where the command's options give the config (train).

    Returns:
        din_fast.ctr.labeled_loader.LogColumns: its label, ``features`` and
        ``numeric_features``.

    Raises:
        din_fast.ctr.errors.InputError: a column named twice or one of the
            log's own (user, item, category, timestamp).
    """
    return LogColumns(config.label_column, config.features, config.numeric_features,
                      None if checkpoint is None else str(checkpoint))


def log_split(config: TrainConfig) -> LogSplit:
    """How a labeled log's rows split by time, by the config.

    Args:
        config: the run's settings (``validation_fraction``,
            ``test_fraction``, ``min_count``).

    Returns:
        din_fast.ctr.labeled_samples.LogSplit.
    """
    return LogSplit(config.validation_fraction, config.test_fraction, config.min_count)


def read_config_data(config: TrainConfig):
    """What the config's data file holds, read once for runs that differ in
    their settings alone (din-fast tune).

    Args:
        config: the run's settings (``data``, ``seed``, the labeled log's
            columns).

    Returns:
        A LabeledLog where the config names a label column, else the
        Interactions (the synthetic set of ``seed`` without a file).

    Raises:
        din_fast.ctr.errors.DataFormatError: a data file that cannot be read
            as the config says.
    """
    if config.label_column is not None:
        return load_labeled_log(config.data, log_columns(config))
    return synthetic_interactions(seed=config.seed) if config.data is None \
        else load_interactions(config.data)


def load_config_data(config: TrainConfig, read=None):
    """The config's data and samples: a labeled log where it names a label
    column (split by time), else behaviours by the DIN protocol.

    Args:
        config: the run's settings (``data``, ``seed``, the labeled log's
            columns and split, ``min_count``).
        read: what :func:`read_config_data` returned for the config's data;
            None: read it.

    Returns:
        (EncodedData, SampleSplits).

    Raises:
        din_fast.ctr.errors.InputError: a data file that cannot be read as
            the config says (DataFormatError), or a labeled log too small
            to split.
    """
    read = read_config_data(config) if read is None else read
    if config.label_column is None:
        return load_data(config.data, config.seed, config.min_count, read)
    return labeled_samples(read, log_split(config))


@torch.no_grad()
def evaluate(model, data: EncodedData, samples: Samples, max_len, device, prefix: str) -> dict:
    """The metrics of ``model`` on ``samples``, in eval mode and without
    gradients (the model is left in eval mode).

    Args:
        model: din_fast.DIN, BaseModel or a model taking the same inputs
            (din_fast.ctr.data.Batch.model_inputs), on ``device``.
        data: the EncodedData the samples' histories come from.
        samples: the Samples to score, in batches of EVAL_BATCH_SIZE.
        max_len: keep the most recent ``max_len`` history items; None: all.
        device: where the batches go (a str or torch.device).
        prefix: the metrics' names' start ("validation", "test").

    Returns:
        ``{prefix}_auc``, ``{prefix}_gauc`` and ``{prefix}_logloss``, floats.

    Raises:
        din_fast.ctr.errors.InputError: a NaN or Inf score (see
            :func:`metrics_of`).
        ValueError: no user of ``samples`` with both labels (GAUC).
    """
    model.eval()
    logits = np.empty(len(samples), dtype=np.float64)
    for indices, batch in iterate_batches(data, samples, EVAL_BATCH_SIZE, max_len=max_len):
        args, kwargs = batch.to(device).model_inputs()
        logits[indices] = model(*args, **kwargs).double().cpu().numpy()
    return metrics_of(samples, logits, prefix)


def metrics_of(samples: Samples, logits: np.ndarray, prefix: str) -> dict:
    """The metrics of scores already computed.

    Args:
        samples: the scored Samples (their ``user`` and ``label``).
        logits: [len(samples)] float logits, in the samples' order.
        prefix: the metrics' names' start ("validation", "test").

    Returns:
        ``{prefix}_auc``, ``{prefix}_gauc`` and ``{prefix}_logloss``
        (din_fast.ctr.metrics.ctr_metrics), floats.

    Raises:
        din_fast.ctr.errors.InputError: a logit is NaN or Inf (the weights
            diverged or are corrupt).
        ValueError: from din_fast.ctr.metrics.gauc, for samples in which no
            user has both labels.
    """
    if not np.isfinite(logits).all():
        raise InputError(f"the model's scores of {int((~np.isfinite(logits)).sum())} sample(s) "
                         "are NaN or Inf: its weights diverged (try a lower learning rate) or "
                         "are corrupt")
    return {f"{prefix}_{k}": v for k, v in ctr_metrics(samples.user, samples.label,
                                                      logits).items()}


def inverse_frequencies(data: EncodedData, device, train: Optional[Samples] = None) -> dict:
    """1 / (occurrences in training) per id of each table: the scale of the
    mini-batch aware L2 penalty (an id never seen counts once).

    Args:
        data: the EncodedData trained on.
        device: where the returned tensors go.
        train: None by the DIN protocol: the occurrences among the training
            behaviours (every user's but the last two, the validation and
            test targets). Of a labeled log, its training Samples: the
            occurrences of their target items, categories and side-feature
            values.

    Returns:
        {"item": [num_items + 1] float32, "category": [num_categories + 1]
        (where the data has categories), each side feature's name: [its ids
        + 1]}, indexed by dense id.
    """
    maps = data.id_maps
    if train is None:
        training = training_behaviours(data)
        categories = data.item_category[data.items] if data.categories is None \
            else data.categories
        counts = {"item": np.bincount(data.items[training], minlength=data.num_items + 1),
                  "category": np.bincount(categories[training],
                                          minlength=data.num_categories + 1)}
    else:
        counts = {"item": np.bincount(train.target, minlength=data.num_items + 1)}
        if maps.category_ids is not None:
            counts["category"] = np.bincount(train.target_category,
                                             minlength=data.num_categories + 1)
        for name, size in maps.feature_sizes().items():
            offsets = data.rows.offsets[name]
            rows = np.zeros(len(offsets) - 1, dtype=bool)
            rows[train.row] = True
            of_value = np.repeat(rows, np.diff(offsets))
            counts[name] = np.bincount(data.rows.values[name][of_value], minlength=size + 1)
    return {kind: torch.from_numpy(1.0 / np.maximum(c, 1)).float().to(device)
            for kind, c in counts.items()}


def minibatch_l2(model, batch, inverse_frequency: dict) -> torch.Tensor:
    """The DIN paper's mini-batch aware L2 (section 4.3): over the embedding
    rows that occur in the batch (padding excluded), sum ||w_j||^2 / n_j with
    n_j the row's frequency; rows absent from the batch are not touched.

    Args:
        model: a model listing its ``embedding_tables()`` ((table, kind)
            pairs, kind "item", "category" or a side feature's name), as
            din_fast.DIN and BaseModel do.
        batch: the din_fast.ctr.data.Batch trained on, on the model's
            device (its history and target ids, side features).
        inverse_frequency: :func:`inverse_frequencies` of the training data,
            on the model's device.

    Returns:
        The penalty, a 0-d float tensor with a gradient to the tables
        (unweighted: the caller multiplies it by ``config.l2``).
    """
    ids = {"item": torch.cat([batch.history_items.flatten(), batch.target_items]),
           **(batch.features or {})}
    if batch.history_categories is not None:
        ids["category"] = torch.cat([batch.history_categories.flatten(),
                                     batch.target_categories])
    total = 0.0
    for table, kind in model.embedding_tables():
        rows = torch.unique(ids[kind])
        rows = rows[rows != 0]
        total = total + (table.weight[rows].square().sum(1) * inverse_frequency[kind][rows]).sum()
    return total


# What loading a state that does not fit a learner raises.
STATE_MISFITS = (KeyError, TypeError, ValueError, RuntimeError)


def state_misfit(error: Exception) -> CheckpointError:
    """The error for a run state that does not fit the learner loading it.

    Args:
        error: one of STATE_MISFITS, which loading it raised (its type is
            named, never its message: the file's contents are not quoted).

    Returns:
        The CheckpointError to raise.
    """
    return CheckpointError(f"the run state to resume does not fit the run's model and "
                           f"optimizer ({type(error).__name__}); resume from a run state "
                           "file din-fast train wrote for this run")


class Learner:
    """What fit_learner's learners share: Adam over ``parameters`` at
    ``config.lr``, times ``config.lr_decay`` after every epoch (``end_epoch``),
    the inverse frequencies of the L2 penalty, and one seeded stream of
    shuffled training batches.

    Subclasses add ``train_epoch(samples, bar)``, ``evaluate(samples,
    prefix)``, ``snapshot()`` and ``restore(snapshot)``: LocalLearner, and
    din_fast.ctr.sharded.training.ShardedLearner.

    Args:
        parameters: what Adam optimizes: parameters, or parameter groups
            (:func:`parameter_groups`).
        data: the EncodedData trained on.
        config: the run's settings (``lr``, ``lr_decay``, ``l2``, ``seed``,
            ``batch_size``, ``max_len``).
        frequency_device: where the L2 penalty's inverse frequencies go
            (computed only when ``config.l2`` is not 0).
        min_batch: the fewest samples of a training batch (a smaller last
            batch joins the one before it): 2 for Dice's batch
            normalization; sharded training needs one per process.
        labeled_train: a labeled log's training Samples, whose occurrences
            the inverse frequencies count; None by the DIN protocol.
    """

    def __init__(self, parameters, data: EncodedData, config: TrainConfig, frequency_device,
                 min_batch: int = 2, labeled_train: Optional[Samples] = None):
        self.data, self.config, self.min_batch = data, config, min_batch
        self.optimizer = torch.optim.Adam(parameters, lr=config.lr)
        self.schedule = torch.optim.lr_scheduler.ExponentialLR(self.optimizer,
                                                               gamma=config.lr_decay)
        self.inverse_frequency = inverse_frequencies(data, frequency_device, labeled_train) \
            if config.l2 else None
        self.batch_rng = np.random.default_rng([config.seed, BATCH_STREAM])

    def lr(self) -> float:
        """The learning rate the next epoch trains at (the first parameter
        group's)."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """What continues training exactly: the optimizer, the learning-rate
        schedule and the random streams (the model's weights aside)."""
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "batch_rng": self.batch_rng.bit_generator.state,
                "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state of :meth:`state_dict` (the model's weights
        are loaded separately).

        Args:
            state: {"optimizer", "schedule", "batch_rng", "torch_rng"}, as
                :meth:`state_dict` returns it (a run state's ``learner``).

        Raises:
            din_fast.ctr.errors.CheckpointError: it does not fit this learner
                (a run state file altered, or of another model).
        """
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.batch_rng.bit_generator.state = state["batch_rng"]
            torch.set_rng_state(state["torch_rng"])
        except STATE_MISFITS as error:
            raise state_misfit(error) from None

    def training_batches(self, samples: Samples, bar):
        """The epoch's shuffled batches of ``samples`` (the learner's batch
        stream, so a resumed run draws the same ones), through the progress
        bar.

        Args:
            samples: the epoch's training Samples.
            bar: wraps an iterable for display (a partial tqdm; ``lambda it:
                it`` for none).

        Returns:
            What ``bar`` returns for din_fast.ctr.data.iterate_batches'
            (indices, Batch) pairs, batches on the CPU.
        """
        return bar(iterate_batches(self.data, samples, self.config.batch_size,
                                   max_len=self.config.max_len, shuffle=True,
                                   rng=self.batch_rng, min_batch=self.min_batch))

    def end_epoch(self) -> None:
        """Multiply the learning rate by ``config.lr_decay``; once after every
        training epoch."""
        self.schedule.step()


def parameter_groups(model, config: TrainConfig) -> list:
    """Adam's parameter groups: the linear part at ``config.linear_lr`` where
    given (its weights, one per id, each in few batches, move by about lr per
    batch it is in; the deep part, given the same rate, overfits first), the
    history cross term at ``config.history_cross_lr`` (HISTORY_CROSS_LR where
    None), the rest at ``config.lr``.

    Args:
        model: the model to train; its ``linear`` and ``history_cross``
            attributes, where present and not None, are those parts.
        config: the run's settings (``linear_lr``, ``history_cross_lr``).

    Returns:
        [{"params": the rest}] followed by {"params": ..., "lr": ...} for
        the linear part (with ``linear_lr``) and the history cross term,
        where the model has them.
    """
    own_rates = []
    linear = getattr(model, "linear", None)
    if config.linear_lr is not None and linear is not None:
        own_rates.append((linear, config.linear_lr))
    cross = getattr(model, "history_cross", None)
    if cross is not None:
        own_rates.append((cross, config.history_cross_lr or HISTORY_CROSS_LR))
    own = {id(p) for part, _ in own_rates for p in part.parameters()}
    return ([{"params": [p for p in model.parameters() if id(p) not in own]}]
            + [{"params": list(part.parameters()), "lr": rate} for part, rate in own_rates])


class LocalLearner(Learner):
    """What :func:`fit_learner` trains in one process: a model that scores
    data.Batch fields (and lists its ``embedding_tables()`` for the L2
    penalty; an ``auxiliary_loss(*fields, labels)``, where it has one, is
    added to the loss). din_fast.ctr.sharded.training has the TorchRec
    counterpart.

    With ``config.ema``, a din_fast.ctr.weight_average.WeightAverage of the
    model (``average``) follows every optimizer step, and is what
    :meth:`evaluate` scores and :meth:`snapshot` copies (``scored``: the
    model itself without it).

    Args:
        model: din_fast.DIN or BaseModel (or a model with their forward,
            ``embedding_tables`` and optional ``auxiliary_loss``), on
            ``config.device``. With ``config.compile`` it (and its average)
            is compiled in place (nn.Module.compile).
        data: the EncodedData trained on.
        config: the run's settings.
        labeled_train: a labeled log's training Samples (for the L2
            penalty's frequencies); None by the DIN protocol.
    """

    def __init__(self, model, data: EncodedData, config: TrainConfig,
                 labeled_train: Optional[Samples] = None):
        super().__init__(parameter_groups(model, config), data, config, config.device,
                         labeled_train=labeled_train)
        self.model = model
        # Copied before compiling: the average is a plain module, compiled alike.
        self.average = None if config.ema is None else WeightAverage(model, config.ema)
        self.scored = model if self.average is None else self.average.model
        if config.compile:
            # In place (nn.Module.compile): the state dict keeps its keys for
            # snapshots and checkpoints; training and evaluation call the
            # compiled forward. Symbolic sizes from the first batch on: batch
            # sizes repeat until the last batch, so dynamo would compile a
            # graph for them, then again for the longest history's change,
            # then for the last batch (data.padded keeps sizes above 1).
            for module in dict.fromkeys((model, self.scored)):    # each once
                module.compile(backend=config.compile, dynamic=True)

    def state_dict(self) -> dict:
        """:meth:`Learner.state_dict`, with the weight average's state
        (``average``) where there is one."""
        state = super().state_dict()
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """:meth:`Learner.load_state_dict`, the weight average's state too
        where there is one.

        Args:
            state: as :meth:`state_dict` returns it.

        Raises:
            din_fast.ctr.errors.CheckpointError: it does not fit this learner.
        """
        super().load_state_dict(state)
        if self.average is not None:
            try:
                self.average.load_state_dict(state["average"])
            except STATE_MISFITS as error:
                raise state_misfit(error) from None

    def train_epoch(self, samples: Samples, bar) -> float:
        """One pass over ``samples`` in training mode (the weight average,
        if any, updated after every step), then the learning-rate decay.

        Args:
            samples: the epoch's training Samples.
            bar: wraps the batches for display (see
                :meth:`Learner.training_batches`).

        Returns:
            The training loss (binary cross entropy, without the L2 penalty or
            an auxiliary loss) at the epoch's end, an exponential average over
            about the last 50 batches; None for no batch.
        """
        config, model = self.config, self.model
        model.train()
        running = None
        for _, batch in self.training_batches(samples, bar):
            batch = batch.to(config.device)
            args, kwargs = batch.model_inputs()
            loss = F.binary_cross_entropy_with_logits(model(*args, **kwargs), batch.labels)
            value = loss.item()
            auxiliary = getattr(model, "auxiliary_loss", None)
            auxiliary = None if auxiliary is None else auxiliary(*batch[:5], batch.labels)
            if auxiliary is not None:   # SIM's loss of a two-stage DIN's "dot" search
                loss = loss + auxiliary
            if config.l2:
                loss = loss + config.l2 * minibatch_l2(model, batch, self.inverse_frequency)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.average is not None:
                self.average.update(model)
            running = value if running is None else running + LOSS_SMOOTHING * (value - running)
        self.end_epoch()
        return running

    def evaluate(self, samples: Samples, prefix: str) -> dict:
        """The metrics on ``samples`` (module-level :func:`evaluate`) of the
        model, or of its weight average where there is one.

        Args:
            samples: the Samples to score (validation or test).
            prefix: the metrics' names' start ("validation", "test").

        Returns:
            ``{prefix}_auc``, ``{prefix}_gauc`` and ``{prefix}_logloss``.

        Raises:
            din_fast.ctr.errors.InputError: a NaN or Inf score.
        """
        return evaluate(self.scored, self.data, samples, self.config.max_len,
                        self.config.device, prefix)

    def snapshot(self) -> dict:
        """A copy of the weights :meth:`evaluate` scores (the model's, or
        its weight average's: a state dict, detached clones on the model's
        device), for :meth:`restore`."""
        return {k: v.detach().clone() for k, v in self.scored.state_dict().items()}

    def restore(self, snapshot: dict) -> None:
        """Load weights :meth:`snapshot` took into the model (which is then
        saved) and its weight average (which :meth:`evaluate` then scores).

        Args:
            snapshot: the state dict :meth:`snapshot` returned.
        """
        for module in dict.fromkeys((self.model, self.scored)):
            module.load_state_dict(snapshot)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`fit_learner`. ``best`` is the best epoch's record
    (None when no epoch finished), whose weights the learner then holds;
    ``saved`` the checkpoint they were written to, else ``unsaved`` says why
    not; ``resumable`` the file --resume continues the run from. Its message
    (``str``) says all of that in one line.

    Args:
        stage: what was running, for the message ("epoch 3", "the test
            evaluation").
        best: the best epoch's record so far; None when no epoch finished.
    """

    def __init__(self, stage: str, best: Optional[dict]):
        super().__init__(stage)
        self.stage, self.best = stage, best
        self.saved, self.unsaved, self.resumable = None, "no --checkpoint given", None

    def __str__(self) -> str:
        if self.best is None:
            outcome = "no epoch had finished, nothing saved"
        elif self.saved:
            outcome = (f"saved epoch {self.best['epoch']}, the best so far (validation GAUC "
                       f"{self.best['validation_gauc']:.4f}), to {self.saved}")
        else:
            outcome = f"epoch {self.best['epoch']} was the best so far, not saved ({self.unsaved})"
        if self.resumable:
            outcome += f"; continue the run with --resume {self.resumable}"
        return f"during {self.stage}: {outcome}; metrics and plots are written by finished runs"


# What a resumed run may change; everything else must be the run's own.
RESUME_MAY_CHANGE = ("data", "epochs", "patience", "device", "backend", "compile")


def check_training_outputs(config: TrainConfig, checkpoint=None, metrics_out=None,
                           plot=None, log_dir=None, resume=None, settings=None) -> None:
    """Check, before any work, that every file of the training run can be
    written and none would overwrite its data (see din_fast.ctr.files).

    The run's state file (beside --checkpoint,
    :func:`din_fast.ctr.checkpoint.resume_path`) may be the --resume file it
    continues from: that one is read whole first and replaced after the
    next epoch. A missing ``log_dir`` is checked to be one that can be
    created, where no other output is to be written, and is created by the
    first epoch's row (so that a command refused now or later leaves nothing
    behind).

    Args:
        config: the run's settings (its ``data`` files are the inputs).
        checkpoint: the --checkpoint path (and so its run state's), or None.
        metrics_out: the --metrics-out path, or None.
        plot: the --plot path, or None.
        log_dir: the --log-dir directory (its metrics.csv is checked), or
            None.
        resume: the --resume file, an input, or None.
        settings: the --config file, an input, or None.

    Raises:
        din_fast.ctr.errors.OutputError: an output that cannot be written
            (a directory, a device, a missing or read-only directory), is an
            input or is another output's path, or a ``log_dir`` that cannot
            be created.
    """
    last = resume_path(checkpoint) if checkpoint else None
    continued = resume is not None and last is not None and same_file(resume, last)
    files = {"--checkpoint": checkpoint, "--checkpoint's run state": last,
             "--metrics-out": metrics_out, "--plot": plot}
    if log_dir:
        check_output_directory("--log-dir", log_dir, files)
    # A directory still to be created holds no file yet to check.
    epoch_csv = EpochLog.path_in(log_dir) if log_dir and os.path.isdir(log_dir) else None
    check_outputs({**files, "--log-dir's metrics.csv": epoch_csv},
                  {"--data": data_files(config.data),
                   "--resume": None if continued else resume, "--config": settings})


def train(config: TrainConfig, *, checkpoint: Optional[str] = None,
          metrics_out: Optional[str] = None, progress: bool = True, log=print,
          resume: Optional[str] = None, log_dir: Optional[str] = None) -> dict:
    """Load the config's data, build its model and :func:`fit` it; save the
    checkpoint and then the metrics JSON when asked (both checked first, see
    :func:`check_training_outputs`). Returns fit's metrics with ``model``,
    ``backend`` (the one the attention ran: "torch", "triton"; None for the
    base model), ``config`` (the run's settings, the requested backend
    among them) and ``data_fingerprint`` (of the id maps).

    With ``checkpoint``, every epoch that is the best so far is saved there
    as it ends (with ``config.ema``, the weight average), and every epoch's
    run state (the weights, the weight average, the best epoch's weights,
    the optimizer, the random streams, the records) to
    ``resume_path(checkpoint)``; ``resume`` names such a file to continue
    from, with the run's own config (epochs, patience, device, backend and
    compile may differ) and data: the result is the uninterrupted run's.
    ``log_dir`` gets a CSV of the epochs' metrics, rewritten after each. On
    Ctrl-C after an epoch finished, the best epoch so far is saved to
    ``checkpoint`` and TrainingInterrupted raised.

    Args:
        config: the run's settings.
        checkpoint: where to save the best epoch's model (and the run state
            beside it); None: nothing is saved.
        metrics_out: where to write the result as JSON; None: not written.
        progress: show a progress bar (only where stderr is a terminal).
        log: called with each line to report (the data, every epoch, the
            stop); print by default.
        resume: a run state file to continue from; None starts afresh.
        log_dir: a directory for the epochs' metrics.csv; None: none.

    Returns:
        :func:`fit_learner`'s metrics plus ``model``, ``backend``,
        ``config`` and ``data_fingerprint``.

    Raises:
        din_fast.ctr.errors.InputError: an output path that cannot be used,
            a device or backend this machine lacks, data that cannot be
            read or gives no training sample, a --resume file that holds no
            run state or another run's, or a model torch.compile cannot
            compile here (all before training, but the last).
        TrainingInterrupted: Ctrl-C (a KeyboardInterrupt).
    """
    check_training_outputs(config, checkpoint, metrics_out, log_dir=log_dir, resume=resume)
    check_device_and_backend(config)
    resumed = resumed_run(resume, config) if resume else None
    torch.manual_seed(config.seed)
    data, splits = load_training_data(config)
    if resumed is not None:
        check_resumed_data(resume, resumed, data)
    log(describe_data(data, splits))
    model = model_for(config, data.id_maps).to(config.device)
    if resumed is not None:
        model.load_state_dict(resumed.state_dict)
    backend = model.attention_backend()  # what training runs: config.backend resolved
    epoch_log = EpochLog(log_dir) if log_dir else None
    # The run state of the last finished epoch: the --resume file until this
    # run has written its own (a Ctrl-C before then names the file that exists).
    latest_state = resume

    def on_epoch(state: RunState, improved: bool) -> None:
        nonlocal latest_state
        if checkpoint:
            if improved:    # the weights validated (the average's, with --ema)
                save_weights(checkpoint, state.best_weights, data.id_maps, config)
            save_run_state(resume_path(checkpoint), model, data.id_maps, config, state)
            latest_state = resume_path(checkpoint)
        if epoch_log:
            epoch_log.write(state.epochs)
    try:
        result = fit(model, data, splits, config, progress=progress, log=log, on_epoch=on_epoch,
                     resume=None if resumed is None else resumed.run)
    except TrainingInterrupted as interrupted:
        if checkpoint and interrupted.best is not None:
            save_checkpoint(checkpoint, model, data.id_maps, config)
            interrupted.saved = checkpoint
        interrupted.resumable = latest_state
        raise
    except torch._dynamo.exc.BackendCompilerFailed as error:
        # This machine cannot compile (no C++ compiler for inductor on CPU, say).
        raise InputError(f"compile {config.compile!r}: torch.compile could not compile the "
                         f"model ({type(error.inner_exception).__name__}); train without "
                         "--compile, or with --compile aot_eager") from None
    result.update(model=config.model, backend=backend, config=asdict(config),
                  data_fingerprint=data.id_maps.fingerprint())
    if checkpoint:
        save_checkpoint(checkpoint, model, data.id_maps, config)
    if metrics_out:
        write_json(metrics_out, result, "--metrics-out")
    return result


def resumed_run(path: str, config: TrainConfig):
    """The checkpoint at ``path`` with its run state, checked against the
    run's ``config``.

    Args:
        path: the --resume file, a run state din-fast train wrote.
        config: the resuming command's settings: all but ``data``,
            ``epochs``, ``patience``, ``device``, ``backend`` and
            ``compile`` (RESUME_MAY_CHANGE) must be the run's own.

    Returns:
        The din_fast.ctr.checkpoint.Checkpoint, its ``run`` not None.

    Raises:
        din_fast.ctr.errors.InputError: the file is no valid checkpoint
            (CheckpointError), holds no run state (a best-epoch checkpoint),
            or was started with another value of a setting that must stay.
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.run is None:
        raise InputError(f"--resume {path}: holds no run state (it is a best-epoch checkpoint, "
                         "as --checkpoint writes); resume from the run state written beside "
                         f"it, {resume_path(path)}")
    for name, saved in asdict(checkpoint.config).items():
        given = getattr(config, name)
        if name not in RESUME_MAY_CHANGE and given != saved:
            raise InputError(f"--resume {path}: the run was started with {_option(name, saved)}, "
                             f"this command gives {_option(name, given)}; a resumed run keeps "
                             "its options (only --data's spelling, --epochs, --patience, "
                             "--device, --backend and --compile may change)")
    return checkpoint


def _option(name: str, value) -> str:
    if isinstance(value, (tuple, list)):
        value = ",".join(value) if value else "(none)"
    return f"--{name.replace('_', '-')} {'none' if value is None else value}"


def check_resumed_data(path: str, checkpoint, data: EncodedData) -> None:
    """Check that a resumed run reads the data it started with, by the id
    maps' fingerprints.

    Args:
        path: the --resume file, named in the message.
        checkpoint: the Checkpoint :func:`resumed_run` returned.
        data: the EncodedData the resumed run loaded.

    Raises:
        din_fast.ctr.errors.InputError: the data gives other id maps.
    """
    saved, given = checkpoint.id_maps.fingerprint(), data.id_maps.fingerprint()
    if saved != given and saved != as_listed_by(checkpoint.id_maps, data.id_maps).fingerprint():
        raise InputError(f"--resume {path}: the data gives other id maps than the run's "
                         f"(fingerprint {given[:12]} against {saved[:12]}); resume with the "
                         "data the run started with")


def as_listed_by(saved: IdMaps, given: IdMaps) -> IdMaps:
    """``given`` without the rare ids that ``saved`` does not list: a run
    state of format 5 kept no rare ids of a labeled log (its fingerprint
    covers none), and its run resumes on maps that list them. The ids with
    rows of their own, which the model's tables index, are compared whole.

    Args:
        saved: the IdMaps of the run state a run resumes from.
        given: the IdMaps of the data the resumed run loaded.

    Returns:
        ``given``'s IdMaps with ``rare_items`` (and their categories),
        ``rare_categories`` and each feature's rare values dropped where
        ``saved`` has none of them.
    """
    return replace(
        given,
        rare_items=None if saved.rare_items is None else given.rare_items,
        rare_item_category=None if saved.rare_items is None else given.rare_item_category,
        rare_categories=None if saved.rare_categories is None else given.rare_categories,
        rare_features={name: values for name, values in given.rare_features.items()
                       if name in saved.rare_features})


def describe_data(data: EncodedData, splits: SampleSplits) -> str:
    """The line training logs about its data.

    Args:
        data: the EncodedData trained on.
        splits: its SampleSplits.

    Returns:
        Its source, users, items, categories, side features and the
        samples of each split, in one line.
    """
    categories = "no" if data.id_maps.category_ids is None else str(data.num_categories)
    side = data.id_maps.feature_sizes()
    features = "" if not side and not data.id_maps.numeric else "; side features " + ", ".join(
        [f"{name} ({size})" for name, size in side.items()] + list(data.id_maps.numeric))
    rare = data.id_maps.rare_items
    items = f"{data.num_items} items" if rare is None else \
        f"{len(data.id_maps.item_ids)} items and a row {len(rare)} rare ones share"
    return (f"data: {data.source}: {len(data.user_ids)} users, {items}, "
            f"{categories} categories{features}; {splits.train_size} train, "
            f"{len(splits.validation)} validation and {len(splits.test)} test samples")


def load_training_data(config: TrainConfig, read=None):
    """The config's data and samples (:func:`load_config_data`), checked
    to be trainable.

    Args:
        config: the run's settings.
        read: what :func:`read_config_data` returned for the config's data;
            None: read it.

    Returns:
        (EncodedData, SampleSplits).

    Raises:
        din_fast.ctr.errors.InputError: data that cannot be read, data that
            gives no training sample, or (a labeled log) validation or test
            rows in which no user has both labels (GAUC, the early-stopping
            criterion, would be undefined).
    """
    data, splits = load_config_data(config, read)
    if len(splits.train) == 0:
        raise InputError(f"{data.source}: no training samples: the protocol needs users with "
                         "at least 4 behaviours (the last two are the test and validation "
                         "targets)")
    if not splits.negatives:
        for name, samples in (("validation", splits.validation), ("test", splits.test)):
            check_both_labels(samples, f"{data.source}: the {name} rows")
    return data, splits


def check_both_labels(samples: Samples, what: str) -> None:
    """Check that GAUC is defined on ``samples``: some user has both a 0
    and a 1 label.

    Args:
        samples: the Samples to check (a labeled log's validation or test
            rows).
        what: names them in the message.

    Raises:
        din_fast.ctr.errors.InputError: no user has both labels.
    """
    order = np.lexsort((samples.label, samples.user))
    user, label = samples.user[order], samples.label[order]
    changes = (user[1:] == user[:-1]) & (label[1:] != label[:-1])
    if not changes.any():
        raise InputError(f"{what} ({len(samples)}) hold no user with both a 0 and a 1 label, "
                         "so GAUC is undefined there; give more rows or larger "
                         "--validation-fraction/--test-fraction")


def fit(model, data: EncodedData, splits: SampleSplits, config: TrainConfig, *,
        progress: bool = True, log=print, on_epoch=None, resume: Optional[RunState] = None,
        test: bool = True) -> dict:
    """:func:`fit_learner` for a model in this process (see LocalLearner).

    Args:
        model: the model to train, on ``config.device``; it ends holding
            the best epoch's weights (with ``config.ema``, their average's).
        data: the EncodedData to train on.
        splits: its SampleSplits.
        config: the run's settings.
        progress: show a progress bar (where stderr is a terminal).
        log: called with each line to report.
        on_epoch: called as ``on_epoch(RunState, improved)`` after each
            epoch; None: nothing.
        resume: a RunState to continue from (``model`` holding its
            weights); None starts afresh.
        test: score the test samples at the end; False never looks at
            them (a search that selects by validation).

    Returns:
        :func:`fit_learner`'s metrics.

    Raises:
        TrainingInterrupted: Ctrl-C.
    """
    learner = LocalLearner(model, data, config, None if splits.negatives else splits.train)
    return fit_learner(learner, data, splits, config, progress=progress, log=log,
                       on_epoch=on_epoch, resume=resume, test=test)


def fit_learner(learner, data: EncodedData, splits: SampleSplits, config: TrainConfig, *,
                progress: bool = True, log=print, on_epoch=None,
                resume: Optional[RunState] = None, test: bool = True) -> dict:
    """The training protocol, for a LocalLearner or its sharded counterpart.

    Fresh training negatives every epoch (the DIN protocol); validation
    metrics after every epoch; early stopping when validation GAUC has not
    improved for ``config.patience`` epochs (at most ``config.epochs``); the
    best epoch's weights restored and the test samples evaluated once. With
    ``config.ema`` the weights validated, restored and tested are the
    weight average's (LocalLearner).
    Returns test and validation metrics (of the best epoch), ``best_epoch``,
    ``epochs_run``, ``stopped`` (why training ended), timings and the
    per-epoch records under ``epochs``; without ``test`` the test samples
    are not looked at. ``on_epoch(RunState, improved)`` runs after each
    epoch (before its line is logged); ``resume`` continues from such a
    state (the learner's model holding its weights).

    Args:
        learner: a LocalLearner or a
            din_fast.ctr.sharded.training.ShardedLearner.
        data: the EncodedData to train on.
        splits: its SampleSplits (fresh training negatives each epoch where
            ``splits.negatives``).
        config: the run's settings (``epochs``, ``patience``, ``seed``,
            ``batch_size``).
        progress: show a progress bar (where stderr is a terminal).
        log: called with each line to report.
        on_epoch: called as ``on_epoch(RunState, improved)`` after each
            epoch, ``improved`` True when it is the best so far; None:
            nothing.
        resume: a RunState to continue from; None starts afresh.
        test: score the test samples at the end; False never looks at
            them (no test metrics: a search that selects by validation).

    Returns:
        ``test_auc``, ``test_gauc``, ``test_logloss`` (with ``test``),
        the same three ``validation_`` ones, ``best_epoch``, ``epochs_run``, ``stopped``,
        ``train_seconds``, ``samples_per_second``, ``train_samples``,
        ``validation_samples``, ``test_samples`` and ``epochs`` (a list of
        per-epoch dicts).

    Raises:
        TrainingInterrupted: Ctrl-C; the learner then holds the best
            epoch's weights (where one finished).
        din_fast.ctr.errors.InputError: a NaN or Inf score at evaluation.
        din_fast.ctr.errors.CheckpointError: ``resume``'s learner state does
            not fit the learner.
    """
    train_size = splits.train_size
    epochs, best, best_state, epoch = [], None, None, 0
    if resume is not None:
        learner.load_state_dict(resume.learner)
        epochs, best, best_state, epoch = (list(resume.epochs), resume.best, resume.best_weights,
                                           resume.epoch)
        log(f"resumed after epoch {epoch} (best so far: epoch {best['epoch']}, validation GAUC "
            f"{best['validation_gauc']:.4f})")
    # A bar on a terminal; in a log file the epoch lines alone, without its
    # carriage returns.
    show_bar = progress and sys.stderr.isatty()
    stage = f"epoch {epoch + 1}"
    try:
        while epoch < config.epochs and (best is None
                                         or epoch - best["epoch"] < config.patience):
            epoch += 1
            stage = f"epoch {epoch}"
            started = time.perf_counter()
            lr = learner.lr()
            samples = splits.training(data, config.seed, epoch)
            bar = partial(tqdm, total=-(-train_size // config.batch_size), leave=False,
                          desc=f"epoch {epoch}/{config.epochs}", disable=not show_bar)
            train_loss = learner.train_epoch(samples, bar)
            seconds = time.perf_counter() - started
            metrics = learner.evaluate(splits.validation, "validation")
            metrics.update(epoch=epoch, train_loss=train_loss, lr=lr, epoch_seconds=seconds,
                           samples_per_second=train_size / seconds)
            epochs.append(metrics)
            improved = best is None or metrics["validation_gauc"] > best["validation_gauc"]
            if improved:    # before the epoch's line: once it shows, the epoch is kept
                best = metrics
                best_state = learner.snapshot()
            if on_epoch is not None:
                on_epoch(RunState(epoch, list(epochs), best, best_state, learner.state_dict()),
                         improved)
            log(f"epoch {epoch}: validation AUC {metrics['validation_auc']:.4f}  GAUC "
                f"{metrics['validation_gauc']:.4f}  logloss "
                f"{metrics['validation_logloss']:.4f}  train loss {train_loss:.4f}  "
                f"{metrics['samples_per_second']:.0f} samples/s ({seconds:.1f} s)"
                f"{'  best so far' if improved else ''}")
        if epoch - best["epoch"] >= config.patience:
            stopped = (f"early stop: no validation GAUC gain in {config.patience} "
                       f"epoch(s) after epoch {best['epoch']}")
        else:
            stopped = f"reached the maximum of {config.epochs} epochs"
        log(f"{stopped}; restored epoch {best['epoch']}")
        stage = "the test evaluation"
        learner.restore(best_state)
        result = learner.evaluate(splits.test, "test") if test else {}
    except KeyboardInterrupt:
        # Ctrl-C: hand the best epoch's weights to the caller, who may save them.
        if best is not None:
            learner.restore(best_state)
        raise TrainingInterrupted(stage, best) from None
    result.update({f"validation_{k}": best[f"validation_{k}"] for k in METRIC_NAMES})
    train_seconds = sum(e["epoch_seconds"] for e in epochs)
    result.update(best_epoch=best["epoch"], epochs_run=len(epochs), stopped=stopped,
                  train_seconds=train_seconds,
                  samples_per_second=train_size * len(epochs) / train_seconds,
                  train_samples=train_size, validation_samples=len(splits.validation),
                  test_samples=len(splits.test), epochs=epochs)
    return result


def checkpoint_for_run(path: str, backend: str, device: str):
    """A checkpoint and the config to run it by, for evaluate, predict and
    export: the device is checked before the file is read, the backend
    before anything is built.

    Args:
        path: a ``din-fast train --checkpoint`` file.
        backend: the attention backend to run ("auto", "triton", "torch",
            "reference").
        device: "cpu" or "cuda".

    Returns:
        (Checkpoint, its TrainConfig with this ``backend`` and ``device``).

    Raises:
        din_fast.ctr.errors.InputError: the device or backend cannot run
            here, or the file is no valid checkpoint (CheckpointError), or
            it is a run state (din_fast.ctr.checkpoint.resume_path's file).
    """
    check_device(device)
    checkpoint = load_checkpoint(path)
    if checkpoint.run is not None:
        # A run state holds the latest epoch's weights (not the average with
        # --ema): scored, it would pass for the best epoch's model.
        raise CheckpointError(f"--checkpoint {path}: a run state (the model after epoch "
                              f"{checkpoint.run.epoch}, what train --resume continues from), "
                              "not the best epoch's model; give the checkpoint train "
                              f"--checkpoint wrote beside it ({_checkpoint_of_run_state(path)})")
    config = replace(checkpoint.config, backend=backend, device=device)
    check_device_and_backend(config)
    return checkpoint, config


def _checkpoint_of_run_state(path) -> str:
    """The --checkpoint whose run state ``path`` is named as
    (din_fast.ctr.checkpoint.resume_path: ``din.run.pt`` -> ``din.pt``);
    for a file named otherwise, what such a pair looks like."""
    path = Path(path)
    stem = path.stem.removesuffix(RUN_STATE_SUFFIX)
    if stem == path.stem:
        return f"the run state of din.pt is {resume_path('din.pt')}"
    return str(path.with_name(stem + path.suffix))


def evaluate_checkpoint(path: str, data: Optional[str] = None, *, backend: str = "auto",
                        device: str = "cpu", max_unknown: float = MAX_UNKNOWN) -> dict:
    """Test metrics of a checkpoint on ``data``, with its id maps and seed.

    ``data`` None is allowed only for a checkpoint trained on the synthetic
    set (which is regenerated): a checkpoint never chooses which files are
    read. On the training data the test set is the run's and so are the
    metrics. Data that contradicts the checkpoint's id maps (more than
    ``max_unknown`` of its rows with ids they do not hold, items of another
    category: din_fast.ctr.foreign_data) is refused.

    By the DIN protocol, with a checkpoint trained with rare ids sharing a
    row (``--min-count`` above 1: din_fast.ctr.rare_ids), the test samples
    are those of the data, every item the checkpoint has no row of its own
    for taking the reserved one (test samples with such a target counted in
    ``unknown_test_items``); with one that has no reserved row, samples
    whose test item it does not know are left out (counted in
    ``excluded_test_samples``) and unknown history items are skipped
    (``skipped_history_items``). Of a labeled log, the test rows of the
    run's time split are scored, unknown ids as the reserved one. Where
    ids take the reserved rows, they are counted: test samples whose
    target does (``unknown_test_items``), items in the histories the model
    reads (``unknown_history_items``) and side-feature values of the test
    rows (``unknown_feature_values``).

    Args:
        path: a ``din-fast train --checkpoint`` file.
        data: the data file or directory to evaluate on (a labeled log for
            a checkpoint trained on one); None for the synthetic set.
        backend: the attention backend to run.
        device: "cpu" or "cuda".
        max_unknown: the largest share, in [0, 1], of rows in any column
            holding ids the checkpoint does not know before the data is
            refused as another data set's.

    Returns:
        ``test_auc``, ``test_gauc``, ``test_logloss``, ``model``,
        ``backend`` (the one the attention ran) and ``test_samples``; by
        the DIN protocol without rare ids also ``excluded_test_samples``
        and ``skipped_history_items``, else ``unknown_test_items``,
        ``unknown_history_items`` and ``unknown_feature_values``.

    Raises:
        din_fast.ctr.errors.InputError: no ``data`` for a checkpoint trained
            on a file, no test sample left (the checkpoint knows none of the
            test items), a bad checkpoint or data file, data that
            contradicts the checkpoint, a device or backend this machine
            lacks, or test rows where GAUC is undefined.
    """
    checkpoint, config = checkpoint_for_run(path, backend, device)
    if data is None and checkpoint.config.data is not None:
        raise InputError(f"checkpoint {path} was trained on a data file; pass the data to "
                         "evaluate on with --data (a checkpoint does not choose what is read)")
    model = restored_model(checkpoint, config)
    maps = checkpoint.id_maps
    if config.label_column is not None:
        log = load_labeled_log(data, log_columns(config, path))
        check_log(log, maps, path, log_split(config), max_unknown)
        encoded = encode_log(log, maps)
        encoded_data, test = encoded.data, split_log(encoded, log_split(config)).test
        check_both_labels(test, f"{log.source}: the test rows")
    else:
        interactions = synthetic_interactions(seed=config.seed) if data is None \
            else load_interactions(data)
        if data is not None:
            check_behaviours(interactions, maps, path, max_unknown)
        if not maps.unknown:
            return _evaluate_known_items(model, config, encode(interactions, maps))
        rare = rare_ids(encode(interactions), maps)
        encoded_data = rare.encoded()
        test = rare.samples(known_test_samples(rare.data, config.seed).samples)
    metrics = evaluate(model, encoded_data, test, config.max_len, config.device, "test")
    reserved = reserved_ids_read(encoded_data, test, config.max_len)
    metrics.update(model=config.model, backend=model.attention_backend(), test_samples=len(test),
                   unknown_test_items=reserved["items"],
                   unknown_history_items=reserved["history_items"],
                   unknown_feature_values=reserved["feature_values"])
    return metrics


def _evaluate_known_items(model, config: TrainConfig, data: EncodedData) -> dict:
    """Test metrics by the DIN protocol of a model without a reserved row:
    the samples whose test item it knows, unknown history items skipped."""
    known = known_test_samples(data, config.seed)
    if len(known.samples) == 0:
        raise InputError(f"{data.source}: no test sample left: the checkpoint knows "
                         "none of the users' test items")
    metrics = evaluate(model, known.data, known.samples, config.max_len, config.device, "test")
    metrics.update(model=config.model, backend=model.attention_backend(),
                   test_samples=len(known.samples), excluded_test_samples=known.excluded_samples,
                   skipped_history_items=known.skipped_history_items)
    return metrics
