"""Training benchmark: din_fast's DIN against DeepCTR-Torch's DIN model, end to end.

Every model trains on exactly the same samples by exactly the same protocol:
din_fast's data pipeline (the leave-one-out split, the training negatives
redrawn each epoch with the same seeds, the same batches), its training loop
(Adam, learning rate and its decay, batch size, the mini-batch aware L2 on the
embedding rows of each batch, early stopping on validation GAUC, the best
epoch restored, the test set scored once) and its metrics. Only the model
differs:

- ``din_fast DIN``: ``din-fast train``'s default model.
- ``DeepCTR DIN, matched``: ``deepctr_torch.models.DIN`` with din_fast's
  embedding size and initialisation, attention widths, activation and
  normalization, and MLP widths and activation (its MLP input is [candidate,
  pooled history], as din_fast's default). What stays DeepCTR's own: its Dice
  normalizes the attention unit over every position, padding included; PReLU
  has one slope per layer; its layers' initialisation (std 1e-4); and every
  history is padded to ``max_len`` (its input is one fixed-width matrix).
- ``DeepCTR DIN, defaults``: the same model with DeepCTR-Torch's defaults
  (attention 64-16 Dice without normalization, MLP 256-128 ReLU, embeddings
  initialised with std 1e-4). Its ``l2_reg_embedding`` (1e-6 on whole tables)
  is not applied: the protocol's L2 setting is, as for every row.

    python -m benchmarks.train_vs_deepctr [--data-dir DIR]
        [--datasets amazon-beauty amazon-sports] [--seed 0] [--threads 1]

Prints a table and writes benchmarks/results/train_vs_deepctr.csv. Skips,
with a message, when the data directory or deepctr-torch is missing.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from din_fast.ctr.config import TrainConfig, build_model
from din_fast.ctr.models import EMBEDDING_INIT_STD
from din_fast.ctr.training import fit, load_training_data

from .harness import add_amazon_data_options, write_csv
from .peers import deepctr_module

ROOT = Path(__file__).resolve().parents[1]
DEEPCTR_ACTIVATIONS = {"sigmoid": "sigmoid", "relu": "relu", "prelu": "prelu", "dice": "Dice"}


class DeepCTRDIN(nn.Module):
    """DeepCTR-Torch's DIN scoring din_fast batches (returns logits).

    Its input is one float matrix holding every feature column: the candidate
    item and category, the histories padded to ``max_len`` and their length.
    """

    def __init__(self, din_class, num_items, num_categories, embed_dim, max_len, **options):
        super().__init__()
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

        def history(name, vocabulary):
            return VarLenSparseFeat(SparseFeat(f"hist_{name}", vocabulary,
                                               embedding_dim=embed_dim, embedding_name=name),
                                    maxlen=max_len, length_name="seq_length")

        columns = [SparseFeat("item", num_items + 1, embedding_dim=embed_dim),
                   SparseFeat("cate", num_categories + 1, embedding_dim=embed_dim),
                   history("item", num_items + 1), history("cate", num_categories + 1)]
        self.din = din_class(columns, ["item", "cate"], **options)
        self.din.out.task = "regression"    # its prediction layer without the sigmoid: logits
        if options.get("dnn_activation") == "Dice":
            # DIN builds its MLP's Dice for 3-D input (dice_dim=3) though the
            # MLP sees [B, features]: DeepCTR's own Dice, set up for 2-D.
            from deepctr_torch.layers.activation import Dice
            self.din.dnn.activation_layers = nn.ModuleList(
                Dice(layer.out_features, dim=2) for layer in self.din.dnn.linears)
        self.max_len = max_len

    def embedding_tables(self):
        return [(self.din.embedding_dict["item"], "item"),
                (self.din.embedding_dict["cate"], "category")]

    def attention_backend(self):
        return None

    def forward(self, history_items, history_categories, lengths, target_items,
                target_categories):
        pad = self.max_len - history_items.shape[1]
        columns = {"item": target_items[:, None], "cate": target_categories[:, None],
                   "hist_item": F.pad(history_items, (0, pad)),
                   "hist_cate": F.pad(history_categories, (0, pad)),
                   "seq_length": lengths[:, None]}
        ordered = sorted(self.din.feature_index, key=lambda name: self.din.feature_index[name][0])
        x = torch.cat([columns[name] for name in ordered], 1).float()
        return self.din(x).squeeze(-1)


def deepctr_options(config: TrainConfig, matched: bool) -> dict:
    if not matched:
        return dict(l2_reg_embedding=0.0, seed=config.seed)
    return dict(att_hidden_size=(80, 40),
                att_activation=DEEPCTR_ACTIVATIONS[config.attention_activation],
                att_weight_normalization=config.attention_normalization == "softmax",
                dnn_hidden_units=(200, 80),
                dnn_activation=DEEPCTR_ACTIVATIONS[config.mlp_activation],
                init_std=EMBEDDING_INIT_STD,
                l2_reg_embedding=0.0, seed=config.seed)


def run(name, model, data, splits, config):
    print(f"== {name}", flush=True)
    result = fit(model, data, splits, config, progress=False, log=lambda m: print("  " + m))
    return dict(implementation=name, validation_gauc=result["validation_gauc"],
                test_gauc=result["test_gauc"], test_auc=result["test_auc"],
                test_logloss=result["test_logloss"], best_epoch=result["best_epoch"],
                epochs_run=result["epochs_run"],
                seconds_per_epoch=result["train_seconds"] / result["epochs_run"],
                train_seconds=result["train_seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_amazon_data_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                        "train_vs_deepctr.csv")
    args = parser.parse_args()
    din_module = deepctr_module("models.din")
    din_class = None if din_module is None else din_module.DIN
    if din_class is None:
        print("skipped: deepctr-torch is not installed (pip install --no-deps deepctr-torch)")
        return 0
    missing = [d for d in args.datasets if not (args.data_dir / d).is_dir()]
    if missing:
        print(f"skipped: no data at {args.data_dir} for {missing} (pass --data-dir)")
        return 0
    torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets:
        config = TrainConfig(data=str(args.data_dir / dataset), seed=args.seed)
        data, splits = load_training_data(config)
        for name, make in [
            ("din_fast DIN", lambda: build_model(config, data.num_items, data.num_categories)),
            ("DeepCTR DIN, matched", lambda: DeepCTRDIN(
                din_class, data.num_items, data.num_categories, config.embed_dim,
                config.max_len, **deepctr_options(config, matched=True))),
            ("DeepCTR DIN, defaults", lambda: DeepCTRDIN(
                din_class, data.num_items, data.num_categories, config.embed_dim,
                config.max_len, **deepctr_options(config, matched=False)))]:
            torch.manual_seed(config.seed)
            rows.append(dict(dataset=dataset, **run(name, make(), data, splits, config)))
    write_csv(rows, args.out)
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), seed {args.seed}; written to {args.out}\n")
    print("| data | model | val GAUC | test GAUC | test AUC | epochs (best/run) | s/epoch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['implementation']} | {r['validation_gauc']:.4f} | "
              f"{r['test_gauc']:.4f} | {r['test_auc']:.4f} | {r['best_epoch']}/{r['epochs_run']}"
              f" | {r['seconds_per_epoch']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
