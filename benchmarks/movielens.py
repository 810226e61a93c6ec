"""Labeled-log benchmark: MovieLens latest-small as a click log.

Builds the log from GroupLens' ml-latest-small (``ratings.csv`` and
``movies.csv``; research use, see GroupLens' README) as the DIN paper's
MovieLens experiment does: every rating is an impression, label 1 where the
rating is 4 or more; the movie's genres are a multi-valued feature, its first
genre the item's category; the hour and weekday of the timestamp (UTC) are
context features. Then trains, over one time split (the latest 10% of rows
test, the 10% before validation), through ``din_fast.training.train``:

- DIN with the side features, DIN without them, BaseModel with them;
- a logistic regression (scikit-learn) on one-hot user, item, category and
  feature values, fitted on the training rows, its regularization chosen on
  validation GAUC.

    python -m benchmarks.movielens --data DIR [--seeds 0 1 2] [--threads N]

Prints a table (test AUC, GAUC, logloss per model and seed, then mean and
standard deviation) and writes benchmarks/results/movielens.csv. Skips, with
a message, when DIR does not hold the two files.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .harness import write_csv

ROOT = Path(__file__).resolve().parents[1]
POSITIVE_RATING = 4.0
FEATURES = ("genres", "hour", "weekday")


def build_log(directory: Path, out: Path) -> Path:
    """The labeled log of ml-latest-small in ``directory``, as a CSV at ``out``:
    user,item,category,timestamp,label,genres,hour,weekday."""
    ratings = pacsv.read_csv(directory / "ratings.csv")
    movies = pacsv.read_csv(directory / "movies.csv", convert_options=pacsv.ConvertOptions(
        column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}))
    genres = dict(zip(movies["movieId"].to_pylist(), movies["genres"].to_pylist()))
    movie_genres = [genres[m] for m in ratings["movieId"].to_pylist()]
    times = ratings["timestamp"].cast(pa.timestamp("s"))
    table = pa.table({
        "user": ratings["userId"], "item": ratings["movieId"],
        "category": pa.array([g.split("|")[0] for g in movie_genres]),
        "timestamp": ratings["timestamp"],
        "label": pc.cast(pc.greater_equal(ratings["rating"], POSITIVE_RATING), pa.int8()),
        "genres": pa.array(movie_genres), "hour": pc.hour(times),
        "weekday": pc.day_of_week(times)})
    pacsv.write_csv(table, out)
    return out


def one_hot(data, samples) -> "scipy.sparse.csr_matrix":
    """The logistic regression's input: one column per user, item, category and
    feature value (a multi-valued cell's values 1/n each, as the models mean-pool
    them), then the standardized numeric features; ids as din_fast encodes them."""
    import scipy.sparse as sp

    maps = data.id_maps
    blocks = [(samples.user, len(data.user_ids)), (samples.target, maps.num_items + 1)]
    if maps.category_ids is not None:
        blocks.append((samples.target_category, maps.num_categories + 1))
    matrices = [sp.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), ids)),
                              shape=(len(ids), width)) for ids, width in blocks]
    rows = data.rows
    for name, size in maps.feature_sizes().items():
        offsets = rows.offsets[name]
        counts = np.diff(offsets)[samples.row]
        starts = offsets[samples.row]
        row_of = np.repeat(np.arange(len(samples)), counts)
        position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = rows.values[name][np.repeat(starts, counts) + position]
        matrices.append(sp.csr_matrix((1 / np.repeat(counts, counts), (row_of, ids)),
                                      shape=(len(samples), size + 1)))
    if rows is not None and rows.numeric is not None:
        matrices.append(sp.csr_matrix(rows.numeric[samples.row]))
    return sp.hstack(matrices).tocsr()


LR_REGULARIZATION = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def logistic_regression(data, splits) -> dict:
    """Test metrics of scikit-learn's LogisticRegression on one_hot(), its
    inverse regularization C the one of LR_REGULARIZATION with the best
    validation GAUC."""
    from sklearn.linear_model import LogisticRegression

    from din_fast.training import metrics_of

    train, validation, test = (one_hot(data, s) for s in (splits.train, splits.validation,
                                                          splits.test))
    best = None
    for c in LR_REGULARIZATION:
        model = LogisticRegression(C=c, max_iter=2000).fit(train, splits.train.label)
        metrics = metrics_of(splits.validation, model.decision_function(validation),
                             "validation")
        if best is None or metrics["validation_gauc"] > best[1]["validation_gauc"]:
            best = (model, metrics, c)
    model, metrics, c = best
    return {**metrics_of(splits.test, model.decision_function(test), "test"), **metrics, "C": c}
