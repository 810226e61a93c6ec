"""The default recipe of ``din-fast train``, chosen across datasets: candidate
recipes x datasets x models (DIN, BaseModel) x seeds, each run the default
command with the candidate's changes, through din_fast.ctr.training.

The datasets are the Amazon-layout sets of ``--data-dir`` (DIN protocol),
MovieLens latest-small as a labeled log (benchmarks.movielens.build_log; its
label column and side features, the model's recipe otherwise the default
command's) and a cold-start stress set: ``--cold-users`` users drawn (seeded)
from one Amazon set, so that most items occur once or twice.

    python -m benchmarks.default_recipe --select [--candidates ...] [--seeds 0]
    python -m benchmarks.default_recipe [--candidates default] [--seeds 0 1 2]

With ``--select`` the runs never look at the test split (validation only:
din_fast.ctr.training.fit without test) and the candidates are ranked by the
worst case over the datasets, then the mean, of DIN's validation RelaImpr
over the BaseModel (GAUC; both models trained with the candidate). Without
it each run is ``din_fast.ctr.training.train`` (test metrics too) and the
table gives test AUC, GAUC and RelaImpr per dataset, mean and standard
deviation over the seeds, and whether DIN beats the BaseModel at every seed.
Writes one row per run and the summary to ``--out`` (default
benchmarks/results/default_recipe.csv; documented runs are in
benchmarks/recorded/). Skips, with a message, a dataset whose files are absent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from din_fast.ctr.config import TrainConfig
from din_fast.ctr.loaders import load_interactions
from din_fast.ctr.training import (fit, load_training_data, model_for, read_config_data,
                                   train)

from .harness import add_amazon_data_options, write_csv
from .movielens import FEATURES, USER_FEATURE, build_log

ROOT = Path(__file__).resolve().parents[1]
MOVIELENS = "movielens"
COLD = "cold-start"
# Each candidate: its changes to the default command (TrainConfig's defaults;
# the learning rate's depends on the mode: "lr 1e-3" is the default of both
# modes before it did, which the recorded grid started from).
CANDIDATES = {
    "default": {},
    "lr 1e-3": dict(lr=1e-3),
    "min-count 2": dict(min_count=2),
    "min-count 5": dict(min_count=5),
    "l2 0.01": dict(l2=0.01),
    "lr 3e-4": dict(lr=3e-4),
    "embed 16": dict(embed_dim=16),
    "linear": dict(linear=True),
}
METRICS = ("validation_auc", "validation_gauc", "test_auc", "test_gauc")


def cold_start_log(source: Path, users: int, seed: int, out: Path) -> Path:
    """``users`` users of the Amazon-layout set ``source``, drawn with
    ``seed``, as a Parquet log (user, item, category, timestamp: the
    behaviour's position) at ``out``: few users, so most items are rare."""
    behaviours = load_interactions(source)
    chosen = np.sort(np.random.default_rng(seed).choice(len(behaviours.user_ids), users,
                                                         replace=False))
    starts, ends = behaviours.offsets[chosen], behaviours.offsets[chosen + 1]
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)])
    items = behaviours.items.dictionary.take(behaviours.items.indices.take(pa.array(rows)))
    category_of = dict(zip(behaviours.category_items.to_pylist(),
                           behaviours.category_values.to_pylist()))
    pq.write_table(pa.table({
        "user": behaviours.user_ids.take(pa.array(np.repeat(chosen, ends - starts))),
        "item": items, "category": pa.array([category_of[i] for i in items.to_pylist()]),
        "timestamp": np.concatenate([np.arange(e - s) for s, e in zip(starts, ends)])}), out)
    return out


def datasets(args, directory: Path) -> dict:
    """{name: the TrainConfig options that read it} for the sets at hand."""
    found = {}
    wanted = lambda name: not args.only or name in args.only
    for name in filter(wanted, args.datasets):
        if (args.data_dir / name).is_dir():
            found[name] = dict(data=str(args.data_dir / name))
        else:
            print(f"skipped {name}: {args.data_dir / name} is absent")
    movielens = args.data_dir / "movielens-latest-small"
    if not wanted(MOVIELENS):
        pass
    elif (movielens / "ratings.csv").is_file() and (movielens / "movies.csv").is_file():
        found[MOVIELENS] = dict(data=str(build_log(movielens, directory / "movielens.csv")),
                                label_column="label", features=FEATURES + (USER_FEATURE,))
    else:
        print(f"skipped {MOVIELENS}: {movielens} lacks ratings.csv or movies.csv")
    if wanted(COLD) and (args.data_dir / args.cold_from).is_dir():
        found[COLD] = dict(data=str(cold_start_log(args.data_dir / args.cold_from,
                                                   args.cold_users, 0,
                                                   directory / "cold.parquet")))
    return found


def validation_run(config: TrainConfig, read) -> dict:
    """``train``'s run of ``config`` (seeded alike) without its test
    split: fit's validation metrics of the best epoch."""
    torch.manual_seed(config.seed)
    data, splits = load_training_data(config, read)
    return fit(model_for(config, data.id_maps), data, splits, config, progress=False,
               log=lambda *_: None, test=False)


def run_grid(args, sets: dict) -> list:
    rows = []
    for dataset, options in sets.items():
        read = read_config_data(TrainConfig(**options)) if args.select else None
        for candidate in args.candidates:
            for seed in args.seeds:
                for model in args.models:
                    config = TrainConfig(**{**options, **CANDIDATES[candidate]}, model=model,
                                         seed=seed, epochs=args.epochs)
                    result = validation_run(config, read) if args.select else \
                        train(config, progress=False, log=lambda *_: None)
                    row = dict(dataset=dataset, candidate=candidate, model=model, seed=seed,
                               **{k: result.get(k, "") for k in METRICS},
                               best_epoch=result["best_epoch"],
                               epochs_run=result["epochs_run"],
                               train_seconds=round(result["train_seconds"], 1))
                    print(", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                    for k, v in row.items() if v != ""), flush=True)
                    rows.append(row)
                    write_csv(rows, str(args.out))   # a stopped run keeps what it has
    return rows


def relaimpr(din: float, base: float) -> float:
    """The DIN paper's RelaImpr of DIN over the BaseModel, on AUC or GAUC."""
    return (din - 0.5) / (base - 0.5) - 1


def summary(rows: list, split: str) -> list:
    """Per (dataset, candidate): mean and sd over seeds of DIN's and the
    BaseModel's ``split`` AUC and GAUC and of the per-seed RelaImpr, and
    whether DIN's GAUC beats the BaseModel's at every seed."""
    out = []
    for key in dict.fromkeys((r["dataset"], r["candidate"]) for r in rows):
        of = {(r["model"], r["seed"]): r for r in rows if (r["dataset"], r["candidate"]) == key}
        seeds = [s for m, s in of if m == "din" and ("base", s) in of]
        if not seeds:
            continue
        row = dict(dataset=key[0], candidate=key[1], seeds=len(seeds))
        for metric in ("auc", "gauc"):
            name = f"{split}_{metric}"
            values = {"din": [of["din", s][name] for s in seeds],
                      "base": [of["base", s][name] for s in seeds]}
            values["relaimpr"] = [relaimpr(d, b) for d, b in zip(values["din"], values["base"])]
            for what, series in values.items():
                row[f"{what}_{metric}_mean"] = statistics.fmean(series)
                row[f"{what}_{metric}_sd"] = statistics.stdev(series) if len(series) > 1 else 0.0
        row["din_wins_every_seed"] = all(of["din", s][f"{split}_gauc"] >
                                         of["base", s][f"{split}_gauc"] for s in seeds)
        out.append(row)
    return out


def ranking(table: list) -> list:
    """Candidates by the worst dataset's validation RelaImpr (GAUC), then the
    mean over the datasets, best first: (candidate, worst, mean, worst
    dataset, datasets, DIN's mean GAUC over the datasets). DIN's own GAUC is
    beside the ranking, not in it: a recipe can win RelaImpr by weakening the
    BaseModel more than DIN."""
    ranked = []
    for candidate in dict.fromkeys(r["candidate"] for r in table):
        mine = [r for r in table if r["candidate"] == candidate]
        gain = {r["dataset"]: r["relaimpr_gauc_mean"] for r in mine}
        worst = min(gain, key=gain.get)
        ranked.append((candidate, gain[worst], statistics.fmean(gain.values()), worst,
                       len(gain), statistics.fmean(r["din_gauc_mean"] for r in mine)))
    return sorted(ranked, key=lambda r: (-r[4], -r[1], -r[2]))


def report(table: list, split: str) -> None:
    print(f"\n| dataset | candidate | seeds | DIN {split} GAUC | BaseModel {split} GAUC | "
          f"RelaImpr (GAUC) | DIN AUC | BaseModel AUC | RelaImpr (AUC) | DIN wins every seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        cell = lambda what, metric, pct=False: (
            f"{100 * r[f'{what}_{metric}_mean']:+.2f}% ± {100 * r[f'{what}_{metric}_sd']:.2f}%"
            if pct else f"{r[f'{what}_{metric}_mean']:.4f} ± {r[f'{what}_{metric}_sd']:.4f}")
        print(f"| {r['dataset']} | {r['candidate']} | {r['seeds']} | {cell('din', 'gauc')} | "
              f"{cell('base', 'gauc')} | {cell('relaimpr', 'gauc', True)} | "
              f"{cell('din', 'auc')} | {cell('base', 'auc')} | {cell('relaimpr', 'auc', True)} "
              f"| {'yes' if r['din_wins_every_seed'] else 'no'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_amazon_data_options(parser)
    parser.add_argument("--cold-from", default="amazon-sports",
                        help="the Amazon-layout set the cold-start set's users are drawn from")
    parser.add_argument("--cold-users", type=int, default=5000)
    parser.add_argument("--only", nargs="+", help="run these datasets alone (names as printed: "
                        f"the --datasets, {MOVIELENS}, {COLD})")
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES),
                        choices=list(CANDIDATES))
    parser.add_argument("--models", nargs="+", default=["din", "base"], choices=["din", "base"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                        help="the most epochs a run trains (the default command's)")
    parser.add_argument("--select", action="store_true",
                        help="validation only (test never looked at); rank the candidates")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "default_recipe.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        sets = datasets(args, Path(directory))
        if not sets:
            print(f"skipped: no dataset found under {args.data_dir}")
            return 0
        rows = run_grid(args, sets)
    split = "validation" if args.select else "test"
    table = summary(rows, split)
    write_csv(rows + table, str(args.out))
    report(table, split)
    if args.select:
        print("\n| rank | candidate | worst RelaImpr (GAUC) | on | mean over datasets | "
              "DIN's GAUC, mean over datasets |")
        print("|---|---|---|---|---|---|")
        for rank, (candidate, worst, mean, where, _, din) in enumerate(ranking(table), 1):
            print(f"| {rank} | {candidate} | {100 * worst:+.2f}% | {where} | {100 * mean:+.2f}% "
                  f"| {din:.4f} |")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
