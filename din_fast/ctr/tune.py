"""``din-fast tune``: the training recipe searched on the validation split, with Optuna.

Each trial trains one recipe with the training loop of ``din-fast train``
(din_fast.ctr.training.fit: early stopping on validation GAUC) and reports
validation GAUC after every epoch, which Optuna's median pruner compares with
the earlier trials' at the same epoch: a trial below their median after its
second epoch is stopped there. The test split is never looked at (no trial
scores it). The trials' settings come from Optuna's TPE sampler (seeded by
``--seed`` and the number of trials the study holds) over
:data:`SEARCH_SPACE`; the first trial of a new study is the
given settings (train's defaults where none is given; each inside the
space), so a tune never ends worse on validation than ``din-fast train`` with
them.

The study lives in an SQLite file (``--study``, new or one a tune wrote:
another database is refused, never written): running the same command
again resumes it, up to ``--trials`` completed or pruned trials in all; a study keeps the
settings it was started with (the data, the model, every option but the
search's own), and other settings are refused. The best trial's settings go
to ``<out>/best_config.json`` (what ``din-fast train --config`` takes) and
its model to ``<out>/best.pt`` (a checkpoint for evaluate, predict and
export), both written atomically as each trial that is the best so far ends.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import urllib.parse
from contextlib import closing
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from din_fast.problem import ACTIVATIONS
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, model_for, write_config_file
from .errors import CheckpointError, InputError
from .files import check_output_directory, check_outputs
from .loaders import data_files
from .models import MLP_ACTIVATIONS
from .training import (RESUME_MAY_CHANGE, check_device_and_backend, describe_data, fit,
                       load_training_data, read_config_data)

CONFIG_NAME, CHECKPOINT_NAME = "best_config.json", "best.pt"
DEFAULT_TRIALS = 20
STUDY_NAME = "din-fast"
# What the trials choose among: (kind, range or choices). Widths are strings
# for Optuna's categorical distributions ("80,40"). L2 is a choice so that
# none (0) is one: with a linear part the penalty, holding a rare id's
# weights near zero, can cost more than it saves (MovieLens' labeled log).
SEARCH_SPACE = {
    "lr": ("log", (3e-5, 1e-2)),
    "l2": ("choice", (0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0)),
    "embed_dim": ("choice", (8, 16, 32, 64)),
    "attention_hidden": ("choice", ("40,20", "80,40", "128,64")),
    "mlp_hidden": ("choice", ("80,40", "200,80", "256,128")),
    "attention_activation": ("choice", ACTIVATIONS),
    "mlp_activation": ("choice", MLP_ACTIVATIONS),
    "min_count": ("choice", (1, 2, 3, 5, 10)),
    # A weight per id, seen a few times an epoch, may need a rate far from
    # the deep part's: searched apart.
    "linear_lr": ("log", (1e-4, 1e-1)),
}
ATTENTION_SETTINGS = ("attention_hidden", "attention_activation")   # DIN's alone
LINEAR_SETTINGS = ("linear_lr",)                                    # with --linear alone
# The pruner: the median of the earlier trials at the same epoch, from the
# second epoch on, once this many trials have finished. Epochs count from 1
# and Optuna's pruner may stop a trial at any step not below its warm-up, so
# a warm-up of 2 spares the first epoch (on MovieLens a slow recipe, the best
# there, is the lowest of all after its first epoch).
PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS = 3, 2


def median_pruner(optuna):
    """The trials' pruner (see PRUNER_STARTUP_TRIALS)."""
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                       n_warmup_steps=PRUNER_WARMUP_EPOCHS)


def load_optuna():
    """The optuna module; InputError saying how to install it where it is missing."""
    try:
        import optuna
    except ImportError:
        raise InputError("tune needs Optuna, which is not installed here: pip install "
                         "'din-fast[tune]' (or pip install optuna)") from None
    return optuna


def searched(config: TrainConfig) -> list:
    """The settings a tune of ``config`` searches (the attention's for DIN
    only, the linear part's rate with a linear part only)."""
    return [name for name in SEARCH_SPACE
            if (config.model == "din" or name not in ATTENTION_SETTINGS)
            and (config.linear or name not in LINEAR_SETTINGS)]


def suggest(trial, config: TrainConfig) -> dict:
    """The TrainConfig settings of an Optuna ``trial``."""
    settings = {}
    for name in searched(config):
        kind, values = SEARCH_SPACE[name]
        settings[name] = trial.suggest_float(name, *values, log=True) if kind == "log" \
            else trial.suggest_categorical(name, values)
    return {name: tuple(map(int, value.split(","))) if name.endswith("_hidden") else value
            for name, value in settings.items()}


def setting(config: TrainConfig, name: str):
    """``config``'s setting ``name`` (the linear part's rate is lr's where not given)."""
    value = getattr(config, name)
    return config.lr if name == "linear_lr" and value is None else value


def trial_params(config: TrainConfig) -> dict:
    """Optuna's parameters of ``config``'s searched settings (the first trial's)."""
    return {name: ",".join(map(str, setting(config, name))) if name.endswith("_hidden")
            else setting(config, name) for name in searched(config)}


def check_in_space(config: TrainConfig) -> None:
    """InputError where a searched setting of ``config`` (the first trial's)
    lies outside :data:`SEARCH_SPACE`."""
    for name, value in trial_params(config).items():
        kind, values = SEARCH_SPACE[name]
        inside = values[0] <= value <= values[1] if kind == "log" else value in values
        if not inside:
            space = f"from {values[0]:g} to {values[1]:g}" if kind == "log" else \
                "one of " + ", ".join(map(str, values))
            raise InputError(f"--{name.replace('_', '-')} {value}: outside what tune "
                             f"searches; the first trial's {name.replace('_', '-')} must be "
                             f"{space}")


def describe_settings(config: TrainConfig) -> str:
    """The searched settings as the options that give them."""
    text = []
    for name in searched(config):
        value = setting(config, name)
        value = ",".join(map(str, value)) if isinstance(value, tuple) else \
            f"{value:.3g}" if isinstance(value, float) else value
        text.append(f"--{name.replace('_', '-')} {value}")
    return " ".join(text)


def output_paths(out) -> tuple:
    return str(Path(out) / CONFIG_NAME), str(Path(out) / CHECKPOINT_NAME)


def check_tune_paths(config: TrainConfig, study: str, out: str) -> None:
    """OutputError, before any work, when ``out`` is not a directory that can
    take the outputs (nor can be created as one, the study file aside), or
    the study file or an output would be the data or each other."""
    # Created by the first best trial, so that a refused command leaves no
    # directory behind; one still to be created holds no output to check.
    check_output_directory("--out", out, {"--study": study})
    best_config, checkpoint = output_paths(out) if os.path.isdir(out) else (None, None)
    check_outputs({"--study": study, f"--out's {CONFIG_NAME}": best_config,
                   f"--out's {CHECKPOINT_NAME}": checkpoint},
                  {"--data": data_files(config.data)})
    check_study_file(study)


def check_study_file(path: str) -> None:
    """InputError unless the --study file is new (missing or empty) or holds
    din-fast tune's study: Optuna would add its tables, and a study, to any
    other SQLite database, one of the user's own. Read only, nothing is
    written."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True)) as database:
            names = database.execute("SELECT study_name FROM studies").fetchall()
    except sqlite3.Error as error:
        why = ("no Optuna tables" if "no such table" in str(error)
               else type(error).__name__)
    else:
        if (STUDY_NAME,) in names:
            return
        why = f"no study named {STUDY_NAME!r}"
    raise InputError(f"--study {path}: not an Optuna study database din-fast tune wrote "
                     f"({why}); give a new file or one din-fast tune wrote")


def open_study(optuna, path: str, config: TrainConfig, fingerprint: str):
    """The study in the SQLite file ``path`` (created where new, its
    settings recorded); InputError when the file is no study, or one of
    other settings or data."""
    settings = json.loads(json.dumps(asdict(config)))      # as JSON keeps them: lists
    try:
        study = optuna.create_study(
            storage=f"sqlite:///{os.path.abspath(path)}", study_name=STUDY_NAME,
            load_if_exists=True, direction="maximize",
            pruner=median_pruner(optuna))
    except Exception as error:  # noqa: BLE001 - SQLAlchemy's and Optuna's many errors alike
        raise InputError(f"--study {path}: not an Optuna study database "
                         f"({type(error).__name__}); give a new file or one din-fast tune "
                         "wrote") from None
    # Seeded by the seed and the trials so far: a resumed tune draws anew
    # rather than repeating the first run's draws.
    study.sampler = optuna.samplers.TPESampler(seed=(config.seed + len(study.trials)) % 2 ** 32)
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
        study.set_user_attr("data_fingerprint", fingerprint)
        return study
    for name, value in recorded.items():
        if name not in RESUME_MAY_CHANGE and settings.get(name) != value:
            raise InputError(f"--study {path}: the tune it holds was started with "
                             f"{name.replace('_', '-')} {value}, this command gives "
                             f"{settings.get(name)}; resume it with the same options (only "
                             "--data's spelling, --epochs, --patience, --device, --backend "
                             "and --compile may change), or give another --study file")
    if study.user_attrs.get("data_fingerprint") != fingerprint:
        raise InputError(f"--study {path}: the data gives other id maps than the tune it "
                         "holds was started with; resume it with the same data, or give "
                         "another --study file")
    return study


def tune(config: TrainConfig, *, study: str, out: str, trials: int = DEFAULT_TRIALS,
         time_budget: Optional[float] = None, log=print) -> dict:
    """Search ``config``'s searched settings (:data:`SEARCH_SPACE`; the
    others stay ``config``'s) by validation GAUC, in the study ``study``,
    until it holds ``trials`` finished (completed or pruned) trials or
    ``time_budget`` seconds have passed (no trial starts after it; the one
    running ends). Writes
    the best trial's config and checkpoint to ``out`` (see the module's
    docstring). Returns {"trial", "validation_gauc", "config", "trials",
    "pruned", "failed", "config_file", "checkpoint"}."""
    optuna = load_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)     # the trials' lines are ours
    check_tune_paths(config, study, out)
    check_in_space(config)
    check_device_and_backend(config)
    read = read_config_data(config)
    loaded = {}

    def data_of(min_count: int):
        if min_count not in loaded:
            loaded[min_count] = load_training_data(replace(config, min_count=min_count), read)
        return loaded[min_count]
    data, splits = data_of(config.min_count)
    log(describe_data(data, splits))
    the_study = open_study(optuna, study, config, data.id_maps.fingerprint())
    best_config = output_paths(out)[0]
    # Trials that ran to their end or were pruned; a failed one (diverged,
    # or stopped by Ctrl-C) does not count.
    finished = [t for t in the_study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                           optuna.trial.TrialState.PRUNED)]
    if not the_study.trials:
        the_study.enqueue_trial(trial_params(config))   # the given settings first
    remaining = max(trials - len(finished), 0)
    log(f"study {study}: {len(finished)} trial(s) finished, {remaining} to run"
        + ("" if time_budget is None else f" within {time_budget:g} s"))
    written = {}

    def objective(trial) -> float:
        run = replace(config, **suggest(trial, config))
        run_data, run_splits = data_of(run.min_count)
        torch.manual_seed(run.seed)
        model = model_for(run, run_data.id_maps).to(run.device)

        def on_epoch(state, improved: bool) -> None:
            trial.report(state.epochs[-1]["validation_gauc"], state.epoch)
            if trial.should_prune():
                log(f"trial {trial.number}: pruned after epoch {state.epoch} (validation GAUC "
                    f"{state.epochs[-1]['validation_gauc']:.4f}): "
                    f"{describe_settings(run)}")
                raise optuna.TrialPruned()
        try:
            result = fit(model, run_data, run_splits, run, progress=False,
                         log=lambda *_: None, on_epoch=on_epoch, test=False)
        except InputError as error:      # a recipe that diverged: the trial failed
            log(f"trial {trial.number}: failed ({error}): {describe_settings(run)}")
            return math.nan
        value = result["validation_gauc"]
        trial.set_user_attr("config", json.loads(json.dumps(asdict(run))))
        completed = [t.value for t in trial.study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        best = not completed or value > max(completed)
        if best:
            save_best_checkpoint(out, model, run_data.id_maps, run)
            write_config_file(best_config, run, f"--out's {CONFIG_NAME}")
            written["trial"] = trial.number
        log(f"trial {trial.number}: validation GAUC {value:.4f} (epoch {result['best_epoch']} "
            f"of {result['epochs_run']}): {describe_settings(run)}"
            + ("  best so far" if best else ""))
        return value

    started = time.monotonic()
    try:
        if remaining:
            the_study.optimize(objective, n_trials=remaining, timeout=time_budget,
                               gc_after_trial=False, show_progress_bar=False)
    except KeyboardInterrupt:
        kept = (f"the best so far is in {out}" if "trial" in written
                else f"no trial of this run was the best so far, nothing written to {out}")
        raise KeyboardInterrupt(f"after {time.monotonic() - started:.0f} s: the study {study} "
                                "keeps the finished trials (run the same command to resume "
                                f"it); {kept}") from None
    return finish(optuna, the_study, config, written.get("trial"), out, data_of, log)


def save_best_checkpoint(out: str, model, id_maps, run: TrainConfig) -> None:
    """Write the best trial's model into ``out``'s best.pt, ``out`` created
    where missing: by the first best trial of a run, or by finish for a new
    --out of a study whose trials have all run (check_tune_paths checked
    that it can be)."""
    os.makedirs(out, exist_ok=True)
    save_checkpoint(output_paths(out)[1], model, id_maps, run,
                    option=f"--out's {CHECKPOINT_NAME}")


def finish(optuna, study, config: TrainConfig, written: Optional[int], out: str, data_of,
           log) -> dict:
    """The tune's outcome; the best trial's checkpoint retrained into ``out``
    where it is a trial of an earlier run whose checkpoint ``out`` lacks."""
    states = [t.state for t in study.trials]
    count = lambda state: sum(s == state for s in states)
    TrialState = optuna.trial.TrialState
    try:
        best = study.best_trial
    except ValueError:
        raise InputError(f"no trial of the study finished ({count(TrialState.PRUNED)} pruned, "
                         f"{count(TrialState.FAIL)} failed); run it again with more --trials "
                         "or a larger --time-budget") from None
    run = TrainConfig(**best.user_attrs["config"])
    best_config, best_checkpoint = output_paths(out)
    if written != best.number and not holds(best_checkpoint, run):
        log(f"trial {best.number}, the best, is of an earlier run of the study: training it "
            f"again for {best_checkpoint}")
        run_data, run_splits = data_of(run.min_count)
        torch.manual_seed(run.seed)
        model = model_for(run, run_data.id_maps).to(run.device)
        fit(model, run_data, run_splits, run, progress=False, log=lambda *_: None, test=False)
        save_best_checkpoint(out, model, run_data.id_maps, run)
    write_config_file(best_config, run, f"--out's {CONFIG_NAME}")
    return {"trial": best.number, "validation_gauc": best.value, "config": asdict(run),
            "trials": count(TrialState.COMPLETE), "pruned": count(TrialState.PRUNED),
            "failed": count(TrialState.FAIL), "config_file": best_config,
            "checkpoint": best_checkpoint}


def holds(checkpoint: str, config: TrainConfig) -> bool:
    """Whether ``checkpoint`` is a checkpoint of ``config``."""
    try:
        return os.path.exists(checkpoint) and load_checkpoint(checkpoint).config == config
    except CheckpointError:
        return False
