"""Train DIN from Python on your own behaviour log, then score raw ids.

The log is a table with the columns user, item, category, timestamp (ids of
any type, compared as strings; each item has one category). pandas is not
needed: a pyarrow table works, and a pandas DataFrame converts with
``pyarrow.Table.from_pandas(df)``. The table is written to Parquet (CSV works
too) and ``din_fast.ctr.training.train`` runs what ``din-fast train --data`` runs:
the leave-one-out protocol, early stopping on validation GAUC, the test
metrics. The checkpoint then scores raw ids in this process.

    python examples/train_from_table.py            # seconds, on a generated log
"""

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from din_fast.ctr.checkpoint import load_checkpoint, restored_model
from din_fast.ctr.config import TrainConfig
from din_fast.ctr.serving import Encoder
from din_fast.ctr.training import train


def behaviour_log(users=200, categories=12, items_per_category=20, seed=0) -> pa.Table:
    """A generated log: each user clicks items of their two favourite categories."""
    rng = np.random.default_rng(seed)
    rows = {"user": [], "item": [], "category": [], "timestamp": []}
    for user in range(users):
        favourites = rng.choice(categories, 2, replace=False)
        for t in range(rng.integers(6, 16)):
            category = rng.choice(favourites)
            item = category * items_per_category + rng.integers(items_per_category)
            rows["user"].append(f"u{user}")
            rows["item"].append(f"B{item:05d}")
            rows["category"].append(f"c{category}")
            rows["timestamp"].append(1_700_000_000 + 3600 * t)
    return pa.table(rows)


def main():
    # One thread, as din-fast train defaults to: small batches gain little
    # from more, and on shared cores torch's spinning threads slow them down.
    torch.set_num_threads(1)
    table = behaviour_log()              # or: pa.Table.from_pandas(your_dataframe)
    with tempfile.TemporaryDirectory() as directory:
        data, checkpoint = Path(directory, "log.parquet"), Path(directory, "din.pt")
        pq.write_table(table, data)
        config = TrainConfig(data=str(data), epochs=3, batch_size=128, embed_dim=8, lr=3e-3)
        metrics = train(config, checkpoint=str(checkpoint), progress=False)
        print(f"test GAUC {metrics['test_gauc']:.4f}, AUC {metrics['test_auc']:.4f} "
              f"(best epoch {metrics['best_epoch']} of {metrics['epochs_run']})")

        saved = load_checkpoint(checkpoint)
        model = restored_model(saved, replace(saved.config, device="cpu"))
    encoder = Encoder.from_id_maps(saved.id_maps)
    batch = encoder.encode(histories=[["B00003", "B00017", "B00009"]],
                           candidates=[["B00011", "B00230", "NOT-AN-ITEM"]],
                           max_len=saved.config.max_len)
    with torch.no_grad():
        probability = torch.sigmoid(model(*batch.inputs()))[0]
    for raw, p, known in zip(["B00011", "B00230", "NOT-AN-ITEM"], probability, batch.known[0]):
        print(f"{raw}: {p:.3f}" if known else f"{raw}: unknown item, no score")


if __name__ == "__main__":
    main()
