"""The ``din-fast`` command: train a CTR model on DIN-protocol data, or evaluate a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import sharded
from .data import DataFormatError
from .models import MODELS
from .problem import BACKENDS
from .training import TrainConfig, evaluate_checkpoint, train


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text}")
    return value


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    # One thread by default: batches of a few hundred short histories gain
    # little from a second thread, and when the cores are shared (CI, a busy
    # workstation) torch's spinning worker threads slow training down many
    # times over.
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads for torch")


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="din-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser(
        "train", help="train DIN or BaseModel and report test AUC, GAUC and logloss",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train_parser.add_argument("--data", help="an Amazon-layout directory (<Name>.txt + "
                              "<Name>_item2attributes.json) or a CSV/TSV with columns user,item,"
                              "category,timestamp; omitted: a seeded synthetic dataset")
    train_parser.add_argument("--model", choices=tuple(MODELS), default=defaults.model)
    train_parser.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    train_parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    train_parser.add_argument("--lr", type=float, default=defaults.lr)
    train_parser.add_argument("--embed-dim", type=positive_int, default=defaults.embed_dim,
                              help="size of the item and of the category embedding each")
    train_parser.add_argument("--max-len", type=positive_int, default=defaults.max_len,
                              help="keep the most recent N behaviours of each history")
    train_parser.add_argument("--attention-normalization", choices=("softmax", "none"),
                              default=defaults.attention_normalization or "none",
                              help="DIN's attention weights: softmax over the history, or the "
                              "paper's raw scores (none)")
    train_parser.add_argument("--seed", type=int, default=defaults.seed)
    train_parser.add_argument("--backend", choices=BACKENDS, default=defaults.backend)
    train_parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    train_parser.add_argument("--metrics-out", help="write the final metrics as JSON here")
    train_parser.add_argument("--checkpoint", help="save the model, id maps and config here")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(train_parser)
    sharded.add_options(train_parser)

    eval_parser = commands.add_parser("evaluate", help="test metrics of a saved checkpoint")
    eval_parser.add_argument("--checkpoint", required=True)
    eval_parser.add_argument("--data", help="default: the data the checkpoint was trained on")
    eval_parser.add_argument("--backend", choices=BACKENDS)
    eval_parser.add_argument("--device", choices=("cpu", "cuda"))
    eval_parser.add_argument("--metrics-out", help="write the metrics as JSON here")
    add_threads_option(eval_parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return run_command(args)
    except (DataFormatError, FileNotFoundError, sharded.OptionError) as error:
        print(f"din-fast: error: {error}", file=sys.stderr)
        return 2


def run_command(args) -> int:
    if args.command == "train":
        config = TrainConfig(data=args.data, model=args.model, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr, embed_dim=args.embed_dim,
                             max_len=args.max_len, seed=args.seed, backend=args.backend,
                             device=args.device,
                             attention_normalization=None if args.attention_normalization == "none"
                             else args.attention_normalization)
        if sharded.requested(args):
            metrics = sharded.load_trainer()(
                config, args.sharding, embedding_optimizer=args.embedding_optimizer,
                embedding_lr=args.embedding_lr, checkpoint=args.checkpoint,
                metrics_out=args.metrics_out, progress=not args.no_progress)
        else:
            metrics = train(config, checkpoint=args.checkpoint, metrics_out=args.metrics_out,
                            progress=not args.no_progress)
        if metrics is None:  # a torchrun process other than rank 0
            return 0
        print(f"{config.model}: test AUC {metrics['test_auc']:.4f}  GAUC "
              f"{metrics['test_gauc']:.4f}  logloss {metrics['test_logloss']:.4f}  "
              f"train {metrics['train_seconds']:.1f} s")
    else:
        metrics = evaluate_checkpoint(args.checkpoint, args.data, backend=args.backend,
                                      device=args.device)
        print(json.dumps(metrics, indent=2))
        if args.metrics_out:
            with open(args.metrics_out, "w") as handle:
                json.dump(metrics, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
