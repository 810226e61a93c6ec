"""The ``din-fast`` command: train a CTR model on behaviours (the DIN protocol)
or on a labeled impression log, evaluate a checkpoint, or score new rows with one.

Every mistake a user can make with a file or an option (a bad data file or
checkpoint, a device or backend this machine lacks, too little data, an
output path that would overwrite an input or cannot be written) ends in one
line, ``din-fast: error: ...``, and exit status 2. Output paths are checked
before any work and written atomically (din_fast.ctr.files). Ctrl-C ends in one
line, ``din-fast: interrupted ...``, and exit status 130; training saves the
best epoch so far to --checkpoint first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import fields
from typing import Optional

import torch

from din_fast.problem import ACTIVATIONS, BACKENDS
from din_fast.search import SEARCHES
from . import sharded
from .config import (COMPILE_BACKENDS, DIN_PROTOCOL_LR, HISTORY_CROSS_LR, LABELED_LOG_LR,
                     TrainConfig, read_config_file)
from .errors import InputError
from .export import export_checkpoint
from .files import check_outputs, write_json
from .foreign_data import MAX_UNKNOWN
from .labeled_loader import header_name
from .loaders import data_files, header_names
from .models import MLP_ACTIVATIONS, MLP_INPUTS, MODELS
from .onnx_export import OPSET as ONNX_OPSET, export_checkpoint_onnx
from .plot import check_plot_path, plot_training
from .predict import OUTPUT_FORMATS, describe, predict_file
from .training import check_training_outputs, evaluate_checkpoint, train
from .tune import DEFAULT_TRIALS, tune

USAGE_ERROR = 2
INTERRUPTED = 130       # 128 + SIGINT, what a shell reports for Ctrl-C
EXPORT_FORMATS = ("pt2", "onnx")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, like the command's other errors."""

    def error(self, message):
        """Print ``din-fast: error: <command>: <message> (see <command>
        --help)`` on stderr and exit with status 2 (argparse's usage block
        left out)."""
        self.exit(USAGE_ERROR, f"din-fast: error: {self.prog}: {message} (see {self.prog} "
                               "--help)\n")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, as a user would type it
    (``none`` for no value or an empty list); required options have none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.required or action.default is argparse.SUPPRESS \
                or "(default:" in text or text.startswith("default:"):
            return text
        default = action.default
        if default is None or default == ():
            shown = "none"
        elif isinstance(default, tuple):
            shown = ",".join(map(str, default))
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def default_device() -> str:
    """--device's default: "cuda" where CUDA is available, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# The option types below: the numeric ones raise ValueError for text that is
# not a number (argparse reports "invalid <type> value"); each raises
# ArgumentTypeError for a value outside its range, whose message argparse shows.

def positive_int(text: str) -> int:
    """An option's integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def positive_float(text: str) -> float:
    """An option's finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An option's integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0; got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An option's finite number >= 0."""
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text}")
    return value


def fraction(text: str) -> float:
    """An option's number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1]; got {text}")
    return value


def seed(text: str) -> int:
    """An option's integer in [0, 2**63), a seed numpy and torch take."""
    value = int(text)
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63); got {text}")
    return value


def share(text: str) -> float:
    """An option's number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1]; got {text}")
    return value


def open_fraction(text: str) -> float:
    """An option's number in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1); got {text}")
    return value


def column_names(text: str) -> tuple:
    """An option's column names separated by commas, trimmed, none empty."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be column names separated by commas; got {text!r}")
    return names


def widths(text: str) -> tuple:
    try:
        values = tuple(int(width) for width in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive layer widths separated by commas "
                                         f"(80,40); got {text!r}")
    return values


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: what a container,
    taskset or a batch scheduler grants, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # no affinity masks here (macOS, Windows)
        return os.cpu_count() or 1


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add --threads (torch's CPU threads) to a command's parser."""
    parser.add_argument("--threads", type=positive_int, default=available_cores(),
                        help="CPU threads for torch; by default the cores this process may "
                        "run on (on a machine others share, fewer can be faster)")


# Column names that say a file is an impression log with click labels.
LABEL_NAMES = ("label", "labels", "click", "clicked", "clicks", "is_click", "clk")


def note_unread_labels(config: TrainConfig) -> None:
    """A note on stderr when a run by the DIN protocol (no --label-column)
    reads a file with a column named like a click label: every row is then
    taken as a behaviour, the non-clicks too, which trains without an error
    on what the user did not mean."""
    if config.label_column is not None or config.data is None:
        return
    for name in header_names(config.data):
        if header_name(name) in LABEL_NAMES:
            print(f"din-fast: note: {config.data} has a column {name.strip()!r}, which the DIN "
                  "protocol (no --label-column) does not read: every row is taken as a "
                  "behaviour and the negatives are sampled; to train on the labels, give "
                  f"--label-column {name.strip()}", file=sys.stderr)
            return


def add_max_unknown_option(parser: argparse.ArgumentParser) -> None:
    """Add --max-unknown (din_fast.ctr.foreign_data) to a command's parser."""
    parser.add_argument("--max-unknown", type=share, default=MAX_UNKNOWN,
                        help="refuse data whose rows hold ids the checkpoint has never seen "
                        "(items, categories, feature values) in more than this share of rows "
                        "in any column (of a labeled log, of the rows the checkpoint's time "
                        "split puts in training: later rows may bring new ids): it was "
                        "trained on other data")


def build_parser(train_settings: Optional[dict] = None) -> argparse.ArgumentParser:
    """The ``din-fast`` parser: the commands train, tune, evaluate, predict
    and export, each option's help ending with its default (the command
    reference, docs/reference/cli.md, is generated from it).

    Args:
        train_settings: {TrainConfig field: value}, a ``--config`` file's,
            replacing train's defaults (the command line overrides them);
            None: TrainConfig's.

    Returns:
        The argparse parser.
    """
    defaults = TrainConfig()
    parser = ArgumentParser(prog="din-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="train DIN or BaseModel and report test AUC, GAUC and logloss",
        description="Train DIN (attention over the history) or BaseModel (sum pooling) on a "
        "behaviour log by the DIN protocol (each user's last behaviour tests, the one before "
        "validates, the rest train; one sampled negative per positive), or on a labeled "
        "impression log with --label-column (split by time). Early stopping on validation "
        "GAUC; prints the best epoch's test AUC, GAUC and logloss, and saves its model with "
        "--checkpoint for evaluate, predict and export.",
        formatter_class=DefaultsHelpFormatter)
    train_parser.add_argument("--config", help="a JSON file of train's settings ({\"lr\": "
                              "0.001, ...}: what din-fast tune writes); options given here "
                              "override it, the defaults fill in what neither gives")
    train_parser.add_argument("--data", help="a CSV/TSV or Parquet file with columns user,item,"
                              "category,timestamp, or an Amazon-layout directory (<Name>.txt + "
                              "<Name>_item2attributes.json); with --label-column a labeled log: "
                              "user,item,timestamp, the label and the features (category "
                              "optional); omitted: a seeded synthetic set")
    train_parser.add_argument("--model", choices=tuple(MODELS), default=defaults.model,
                              help="din (attention over the history) or base (sum pooling)")
    train_parser.add_argument("--epochs", type=positive_int, default=defaults.epochs,
                              help="the most epochs to train (early stopping may end sooner)")
    train_parser.add_argument("--patience", type=positive_int, default=defaults.patience,
                              help="stop after this many epochs without a validation GAUC gain")
    train_parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                              help="training samples per step")
    train_parser.add_argument("--lr", type=positive_float, default=argparse.SUPPRESS,
                              help=f"Adam's learning rate; default {DIN_PROTOCOL_LR} by the "
                              f"DIN protocol, {LABELED_LOG_LR} with --label-column (measured "
                              "across datasets: the training guide, Checked across datasets)")
    train_parser.add_argument("--lr-decay", type=fraction, default=defaults.lr_decay,
                              help="multiply the learning rate by this after every epoch")
    train_parser.add_argument("--l2", type=non_negative_float, default=argparse.SUPPRESS,
                              help="mini-batch aware L2 on the embeddings (DIN paper, 4.3); "
                              f"default {defaults.l2}, {sharded.DEFAULT_L2} for sharded "
                              "training (its tables' Adagrad)")
    train_parser.add_argument("--embed-dim", type=positive_int, default=defaults.embed_dim,
                              help="size of the item and of the category embedding each")
    train_parser.add_argument("--max-len", type=positive_int, default=defaults.max_len,
                              help="keep the most recent N behaviours of each history")
    train_parser.add_argument("--min-count", type=positive_int, default=defaults.min_count,
                              help="ids (items, categories, feature values) seen fewer times in "
                              "the training split share one reserved row per table, which ids "
                              "never seen in training take at evaluate and predict; a cold item "
                              "keeps its category's row. By the DIN protocol, 1 gives every id "
                              "of the data its own row and no reserved one")
    train_parser.add_argument("--attention-normalization", choices=("softmax", "none"),
                              default=defaults.attention_normalization or "none",
                              help="DIN's attention weights: softmax over the history, or the "
                              "paper's raw scores (none)")
    train_parser.add_argument("--attention-activation", choices=ACTIVATIONS,
                              default=defaults.attention_activation,
                              help="activation of DIN's attention unit")
    train_parser.add_argument("--mlp-activation", choices=MLP_ACTIVATIONS,
                              default=defaults.mlp_activation,
                              help="activation of the scoring MLP")
    train_parser.add_argument("--attention-hidden", type=widths, default=defaults.attention_hidden,
                              help="the hidden widths of DIN's attention unit")
    train_parser.add_argument("--mlp-hidden", type=widths, default=defaults.mlp_hidden,
                              help="the hidden widths of the scoring MLP")
    train_parser.add_argument("--mlp-input", choices=MLP_INPUTS, default=defaults.mlp_input,
                              help="the scoring MLP's input: [interest, candidate] (concat, "
                              "the DIN paper's) or with interest x candidate appended (product)")
    train_parser.add_argument("--top-k", type=positive_int, default=defaults.top_k,
                              help="two-stage attention: DIN attends over the K history items "
                              "--search ranks highest for each candidate (default: the whole "
                              "history, exact DIN)")
    train_parser.add_argument("--search", choices=SEARCHES, default=defaults.search,
                              help="how --top-k ranks the history: din (the attention's own "
                              "score), dot (learned projections, trained by an auxiliary CTR "
                              "loss), category (the candidate's category first, then recency)")
    train_parser.add_argument("--linear", action="store_true",
                              help="add a linear part to the logit, as DeepFM and Wide & Deep "
                              "have beside their deep part: a learned weight per item, category "
                              "and side-feature id (and per numeric feature)")
    train_parser.add_argument("--linear-lr", type=positive_float, default=defaults.linear_lr,
                              help="the linear part's Adam learning rate (default: --lr); a "
                              "weight seen a few times an epoch needs a larger one than the deep "
                              "part, which overfits first (Wide & Deep trains its two parts "
                              "with two optimizers)")
    train_parser.add_argument("--history-cross", type=non_negative_int, metavar="DIM",
                              default=defaults.history_cross,
                              help="add a history cross term to the logit: the dot product of "
                              "the candidate's factors with the mean of its history's (item "
                              "and category, DIM wide each, tables of their own), as a "
                              "factorization machine's candidate-behaviour term; 0 for none")
    train_parser.add_argument("--history-cross-lr", type=positive_float,
                              default=defaults.history_cross_lr,
                              help=f"the history cross term's Adam learning rate (default: "
                              f"{HISTORY_CROSS_LR}); the deep part's slow rate leaves it "
                              "untrained, the linear part's fast one overfits it")
    train_parser.add_argument("--ema", type=open_fraction, default=defaults.ema,
                              metavar="DECAY",
                              help="keep an exponential moving average of the weights, moved "
                              "1 - DECAY of the way to them after every optimizer step (0.99: "
                              "over about the last 100 steps); validation each epoch, early "
                              "stopping, the saved model and the test metrics then use the "
                              "averaged weights, which are smoother from step to step and "
                              "seed to seed (default: none, the weights as trained)")
    labeled = train_parser.add_argument_group(
        "labeled logs (every row an impression with its 0/1 label; no negative sampled)")
    labeled.add_argument("--label-column", default=defaults.label_column,
                         help="the 0/1 label's column; omitted: the DIN protocol (behaviours "
                         "as positives, one sampled negative each)")
    labeled.add_argument("--features", type=column_names, default=defaults.features,
                         help="categorical side features (user, item or context columns), "
                         "separated by commas; a cell may hold several values separated by |")
    labeled.add_argument("--numeric-features", type=column_names,
                         default=defaults.numeric_features,
                         help="numeric side features, standardized on the training rows")
    labeled.add_argument("--feature-dim", type=positive_int, default=defaults.feature_dim,
                         help="each side feature's embedding size (default: --embed-dim)")
    labeled.add_argument("--validation-fraction", type=open_fraction,
                         default=defaults.validation_fraction,
                         help="the share of rows before the test rows that validates")
    labeled.add_argument("--test-fraction", type=open_fraction, default=defaults.test_fraction,
                         help="the share of the latest rows that tests")
    train_parser.add_argument("--seed", type=seed, default=defaults.seed,
                              help="seeds the weights, the negatives and the batches' order")
    train_parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend,
                              help="the attention's backend (auto: triton on CUDA, else torch)")
    train_parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                              help="where training runs")
    train_parser.add_argument("--compile", nargs="?", const="inductor", choices=COMPILE_BACKENDS,
                              help="train and evaluate through torch.compile with this backend "
                              "(alone: inductor); omitted: eagerly")
    train_parser.add_argument("--metrics-out", help="write the final metrics as JSON here")
    train_parser.add_argument("--checkpoint", help="save the best epoch's model, id maps and "
                              "config here (as each best epoch ends), and after every epoch the "
                              "run's state beside it, <name>.run<suffix>, for --resume")
    train_parser.add_argument("--resume", help="continue the run whose state this file holds "
                              "(a <name>.run<suffix> file), with its options and data: the "
                              "result is the uninterrupted run's")
    train_parser.add_argument("--plot", help="draw validation and training curves per epoch "
                              "to this PNG (needs matplotlib)")
    train_parser.add_argument("--log-dir", help="write the epochs' metrics to DIR/metrics.csv, "
                              "rewritten after every epoch")
    train_parser.add_argument("--no-progress", action="store_true",
                              help="no progress bar (there is none when stderr is not a "
                              "terminal: one line per epoch)")
    add_threads_option(train_parser)
    sharded.add_options(train_parser)
    if train_settings:
        train_parser.set_defaults(**train_settings)
    add_tune_command(commands, train_parser)

    eval_parser = commands.add_parser(
        "evaluate", help="test metrics of a saved checkpoint",
        description="Score the test samples of --data (the training run's protocol, seed and "
        "split) with a checkpoint and print test AUC, GAUC and logloss as JSON. By the DIN "
        "protocol, samples whose test item the checkpoint has never seen are left out and "
        "unknown history items skipped, unless it was trained with --min-count above 1; "
        "then, as in a labeled log, unknown ids score as the reserved id. A note on stderr "
        "counts them; data with more than --max-unknown of them is refused (the checkpoint "
        "was trained on other data).",
        formatter_class=DefaultsHelpFormatter)
    eval_parser.add_argument("--checkpoint", required=True, help="a din-fast train checkpoint")
    eval_parser.add_argument("--data", help="the data to evaluate on (required unless the "
                             "checkpoint was trained on the synthetic set)")
    eval_parser.add_argument("--backend", choices=BACKENDS, default="auto",
                             help="the attention's backend")
    eval_parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                             help="where the model runs")
    eval_parser.add_argument("--metrics-out", help="write the metrics as JSON here")
    add_max_unknown_option(eval_parser)
    add_threads_option(eval_parser)

    predict_parser = commands.add_parser(
        "predict", help="score candidates for users or histories with a checkpoint",
        description="Score each request's candidates with a checkpoint: the click "
        "probability of every candidate, as CSV (request,candidate,score,note) or JSON lines, "
        "to --output or stdout. A request names a user (its history read from --data) or "
        "gives the history itself; a note on stderr counts the requests, the scores and the "
        "ids the checkpoint does not know.",
        formatter_class=DefaultsHelpFormatter)
    predict_parser.add_argument("--checkpoint", required=True, help="a din-fast train checkpoint")
    predict_parser.add_argument("--requests", required=True,
                                help='JSON lines: {"user": id or "history": [ids], '
                                '"candidates": [ids], "features": {column: value} (a model with '
                                'side features), "request": optional name}')
    predict_parser.add_argument("--data", help="the behaviours of the users that requests "
                                "name (same layouts as train --data)")
    predict_parser.add_argument("--output", help="write the scores here (default: stdout)")
    predict_parser.add_argument("--format", choices=OUTPUT_FORMATS,
                                help="default: jsonl for a .jsonl/.json --output, else csv")
    predict_parser.add_argument("--backend", choices=BACKENDS, default="auto",
                                help="the attention's backend")
    predict_parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device(),
                                help="where the model runs")
    add_max_unknown_option(predict_parser)
    add_threads_option(predict_parser)

    export_parser = commands.add_parser(
        "export", help="package a checkpoint's model for serving without Python "
        "(AOTInductor .pt2 or ONNX, any batch and history length)",
        description="Package a checkpoint's model for serving without Python: an AOTInductor "
        ".pt2 package or an ONNX model, both taking dense ids of any batch size B, history "
        "length and number of candidates per row C ([B, C] targets) and returning the "
        "logits [B, C]. The id maps (raw id -> dense id) are written beside it as "
        "<name>.ids.json.",
        formatter_class=DefaultsHelpFormatter)
    export_parser.add_argument("--checkpoint", required=True, help="a din-fast train checkpoint")
    export_parser.add_argument("--out", required=True,
                               help="the file to write (.pt2 or .onnx, as --format); the id "
                               "maps go beside it as <name>.ids.json")
    export_parser.add_argument("--format", choices=EXPORT_FORMATS, default="pt2",
                               help="pt2: an AOTInductor package (C++ or Python, the device "
                               "of --device); onnx: an ONNX model (opset "
                               f"{ONNX_OPSET}, stock operators, [B, C] candidates), for ONNX "
                               "Runtime or TensorRT")
    # Defaults resolved in run_command: given with --format onnx, they are refused.
    export_parser.add_argument("--backend", choices=BACKENDS, default=argparse.SUPPRESS,
                               help="the .pt2 package's attention backend (default: auto)")
    export_parser.add_argument("--device", choices=("cpu", "cuda"), default=argparse.SUPPRESS,
                               help="where the .pt2 package runs (default: cuda when there is "
                               "one, else cpu)")
    add_threads_option(export_parser)
    return parser


# Train's options a tune does not take: train's own outputs and sharded
# training. What it searches it takes as the first trial's settings.
NOT_TUNE_OPTIONS = {"help", "config", "checkpoint", "metrics_out", "resume",
                    "plot", "log_dir", "no_progress", "sharding", "embedding_optimizer",
                    "embedding_lr"}


def add_tune_command(commands, train_parser: argparse.ArgumentParser) -> None:
    """The tune command: its own options, then train's (the data, the model
    and every setting the search leaves as given), taken over from the
    train parser so that each is declared once."""
    # No abbreviations: --lr, which the search sets, would read as --lr-decay.
    tune_parser = commands.add_parser(
        "tune", allow_abbrev=False,
        help="search the training recipe by validation GAUC (Optuna; pip install "
        "'din-fast[tune]') and write the best config and checkpoint",
        formatter_class=DefaultsHelpFormatter,
        description="Trials train with train's loop over learning rate, L2, embedding size, "
        "the attention's and the MLP's widths, their activations, --min-count and, with "
        "--linear, --linear-lr; a trial "
        "below the median of the earlier ones after its second epoch is stopped (pruned). "
        "The test split is never looked at. The other options are train's, fixed for every "
        "trial; the first trial of a new study takes the searched options given (train's "
        "defaults where not given).")
    tune_parser.add_argument("--study", required=True,
                             help="the study's SQLite file: created where new, resumed where it "
                             "exists (the same command again continues a tune); a file din-fast "
                             "tune did not write is refused, never written")
    tune_parser.add_argument("--out", required=True,
                             help="a directory (created where missing) for best_config.json, "
                             "the best trial's settings (for train --config), and best.pt, "
                             "its checkpoint")
    tune_parser.add_argument("--trials", type=positive_int, default=DEFAULT_TRIALS,
                             help="trials (completed or pruned) the study holds at the end, "
                             "those of earlier runs included")
    tune_parser.add_argument("--time-budget", type=positive_float,
                             help="seconds after which no trial starts (the one running "
                             "ends) (default: none, no limit)")
    for group in train_parser._action_groups:
        actions = [a for a in group._group_actions if a.dest not in NOT_TUNE_OPTIONS]
        if not actions:
            continue
        target = tune_parser if group in (train_parser._optionals, train_parser._positionals) \
            else tune_parser.add_argument_group(group.title)
        for action in actions:
            target._add_action(action)


def main(argv=None) -> int:
    """Run ``din-fast`` (the console script and ``python -m din_fast``).

    Args:
        argv: the arguments after the program name; None reads sys.argv.

    Returns:
        The exit status: 0, 2 (a usage error or InputError, reported as one
        ``din-fast: error: ...`` line), 130 (Ctrl-C, one ``din-fast:
        interrupted ...`` line) or 1 (stdout's reader went away).
    """
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "train" and args.config:
            # The file's settings become train's defaults, which the options
            # given on the command line override.
            args = build_parser(read_config_file(args.config)).parse_args(argv)
        return run_command(args)
    except InputError as error:
        message = " ".join(str(error).splitlines())
        print(f"din-fast: error: {message}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt as interrupted:     # training's says what it saved
        detail = " ".join(str(interrupted).splitlines())
        print(f"din-fast: interrupted{' ' + detail if detail else ''}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (| head): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run_command(args) -> int:
    """Run a parsed command. Its output paths are checked first (here, or
    first thing in the function that writes them: predict_file,
    export_checkpoint); after training, the checkpoint is written first, then
    the metrics, then the plot, so a late failure still keeps the model."""
    if args.command == "train":
        if args.plot:
            check_plot_path(args.plot)
        options = {f.name: vars(args).get(f.name) for f in fields(TrainConfig)}
        if options["l2"] is None:   # not given: the default of the trainer that runs
            options["l2"] = sharded.DEFAULT_L2 if sharded.requested(args) else TrainConfig.l2
        config = config_of(options)
        check_training_outputs(config, args.checkpoint, args.metrics_out, args.plot,
                               args.log_dir, args.resume, args.config)
        note_unread_labels(config)
        if sharded.requested(args):
            sharded.check_single_process_options(config, resume=args.resume,
                                                 log_dir=args.log_dir)
            metrics = sharded.load_trainer()(
                config, args.sharding, embedding_optimizer=args.embedding_optimizer,
                embedding_lr=args.embedding_lr, checkpoint=args.checkpoint,
                metrics_out=args.metrics_out, progress=not args.no_progress)
            if metrics is None:  # a torchrun process other than rank 0
                return 0
        else:
            metrics = train(config, checkpoint=args.checkpoint, metrics_out=args.metrics_out,
                            progress=not args.no_progress, resume=args.resume,
                            log_dir=args.log_dir)
        if args.plot:
            plot_training(metrics, args.plot)
        print(f"{config.model}: test AUC {metrics['test_auc']:.4f}  GAUC "
              f"{metrics['test_gauc']:.4f}  logloss {metrics['test_logloss']:.4f} (epoch "
              f"{metrics['best_epoch']} of {metrics['epochs_run']}; validation GAUC "
              f"{metrics['validation_gauc']:.4f})  train {metrics['train_seconds']:.1f} s")
    elif args.command == "evaluate":
        check_outputs({"--metrics-out": args.metrics_out},
                      {"--checkpoint": args.checkpoint, "--data": data_files(args.data)})
        metrics = evaluate_checkpoint(args.checkpoint, args.data, backend=args.backend,
                                      device=args.device, max_unknown=args.max_unknown)
        reserved = [metrics.get(key, 0) for key in ("unknown_test_items",
                                                     "unknown_history_items",
                                                     "unknown_feature_values")]
        if any(reserved):
            print("din-fast: note: ids without a row of their own in the checkpoint (seen "
                  "fewer than --min-count times in training, or never) scored through the "
                  f"reserved rows: {reserved[0]} test item(s), {reserved[1]} history item(s), "
                  f"{reserved[2]} side-feature value(s)", file=sys.stderr)
        if metrics.get("excluded_test_samples") or metrics.get("skipped_history_items"):
            print(f"din-fast: note: {metrics['excluded_test_samples']} test sample(s) left out "
                  "(their test item is unknown to the checkpoint); "
                  f"{metrics['skipped_history_items']} unknown history item(s) skipped",
                  file=sys.stderr)
        print(json.dumps(metrics, indent=2))
        if args.metrics_out:
            write_json(args.metrics_out, metrics, "--metrics-out")
    elif args.command == "tune":
        # The searched settings given (or train's defaults) are the first trial's.
        config = config_of({f.name: vars(args)[f.name] for f in fields(TrainConfig)
                            if f.name in vars(args)})
        result = tune(config, study=args.study, out=args.out, trials=args.trials,
                      time_budget=args.time_budget)
        print(f"{config.model}: best trial {result['trial']}, validation GAUC "
              f"{result['validation_gauc']:.4f} ({result['trials']} trial(s) finished, "
              f"{result['pruned']} pruned, {result['failed']} failed); wrote "
              f"{result['config_file']} and {result['checkpoint']}: din-fast train --config "
              f"{result['config_file']}")
    elif args.command == "export":
        given = vars(args)
        if args.format == "onnx":
            for option in ("backend", "device"):
                if option in given:
                    raise InputError(f"--{option} {given[option]}: applies to the .pt2 "
                                     "package only; an ONNX model runs stock operators "
                                     "wherever ONNX Runtime runs (leave it out)")
            written, ids = export_checkpoint_onnx(args.checkpoint, args.out)
        else:
            written, ids = export_checkpoint(args.checkpoint, args.out,
                                             device=given.get("device", default_device()),
                                             backend=given.get("backend", "auto"))
        print(f"din-fast: wrote {written} (inputs: dense ids) and {ids} (raw ids -> dense ids)",
              file=sys.stderr)
    else:
        counts = predict_file(args.checkpoint, args.requests, args.data, args.output,
                              args.format, device=args.device, backend=args.backend,
                              max_unknown=args.max_unknown)
        print(f"din-fast: note: {describe(counts)}", file=sys.stderr)
    return 0


def config_of(options: dict) -> TrainConfig:
    """The TrainConfig of a command's options (``--attention-normalization
    none`` is None)."""
    if options.get("attention_normalization") == "none":
        options = dict(options, attention_normalization=None)
    return TrainConfig(**options)


if __name__ == "__main__":
    sys.exit(main())
