"""Labeled logs (din_fast.ctr.labeled_loader, din_fast.ctr.labeled_samples): reading,
the time split, histories without leakage, the training rows' id maps."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from din_fast.ctr.data import iterate_batches
from din_fast.ctr.errors import InputError
from din_fast.ctr.labeled_loader import LabeledLog, LogColumns, load_labeled_log
from din_fast.ctr.labeled_samples import (LogSplit, build_id_maps, encode_log, labeled_samples,
                                      split_points)

from cli_data import labeled_rows, write_labeled_log

COLUMNS = LogColumns("label", ("genres", "hour"), ("price",))


def log_of(rows, categories=True) -> LabeledLog:
    """A LabeledLog of (user, item, timestamp, label) rows, in their order,
    without side features."""
    users, items, timestamps, labels = (list(c) for c in zip(*rows))
    encode = lambda values: pa.array(values, pa.string()).dictionary_encode()
    order = np.argsort(np.array(timestamps, dtype=float), kind="stable")
    pick = lambda values: [values[i] for i in order]
    return LabeledLog(encode(pick(users)), encode(pick(items)),
                      encode(["c" + i for i in pick(items)]) if categories else None,
                      np.array(pick(timestamps), dtype=float),
                      np.array(pick(labels), dtype=np.float32), source="rows")


def histories(data, samples) -> list:
    """Each sample's history as dense item ids (all of it)."""
    out = [None] * len(samples)
    for indices, batch in iterate_batches(data, samples, 64):
        for index, row, length in zip(indices, batch.history_items, batch.lengths):
            out[index] = row[:length].tolist()
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("wxyz"),
                          st.integers(0, 4), st.integers(0, 1)), min_size=1, max_size=30))
def test_history_is_the_users_earlier_clicks_never_the_row_or_later(rows):
    """Brute force: a row's history is its user's label-1 rows of a strictly
    smaller timestamp (time order, ties in file order): never the row itself,
    nor a row of the same time, nor a later one."""
    log = log_of(rows)
    maps = build_id_maps(log, len(log))
    encoded = encode_log(log, maps)
    got = histories(encoded.data, encoded.samples)
    users, items = log.users.to_pylist(), log.items.to_pylist()
    for r in range(len(log)):
        expected = [items[s] for s in range(len(log)) if users[s] == users[r]
                    and log.labels[s] == 1 and log.timestamps[s] < log.timestamps[r]]
        assert got[r] == maps.dense_items(pa.array(expected, pa.string())).tolist(), r
    assert encoded.samples.label.tolist() == log.labels.tolist()


def test_reading_a_log(tmp_path):
    path = write_labeled_log(tmp_path / "log.csv", [
        ("u1", "i1", "c1", 5, 1, "g1| g2", 3, 1.5), ("u2", "i2", "c2", 1, 0, "", 4, 2.0),
        ("u1", "i2", "c2", 1, 1, "g2||", 5, 2.5)])
    log = load_labeled_log(path, COLUMNS)
    # Time order, ties in file order; multi-valued cells split, trimmed, empty values dropped.
    assert log.items.to_pylist() == ["i2", "i2", "i1"]
    assert log.users.to_pylist() == ["u2", "u1", "u1"]
    assert log.labels.tolist() == [0, 1, 1]
    assert log.features["genres"].to_pylist() == [[], ["g2"], ["g1", "g2"]]
    assert log.features["hour"].to_pylist() == [["4"], ["5"], ["3"]]
    assert log.numeric["price"].tolist() == [2.0, 2.5, 1.5]
    # The same log in Parquet, genres as a list column, the label as booleans.
    table = pa.table({"User": ["u1", "u2", "u1"], "item": ["i1", "i2", "i2"],
                      "category": ["c1", "c2", "c2"], "timestamp": [5, 1, 1],
                      "label": [True, False, True], "genres": [["g1", "g2"], [], ["g2"]],
                      "hour": [3, 4, 5], "price": [1.5, 2.0, 2.5]})
    pq.write_table(table, tmp_path / "log.parquet")
    again = load_labeled_log(tmp_path / "log.parquet", COLUMNS)
    for name in ("users", "items", "categories"):
        assert getattr(again, name).to_pylist() == getattr(log, name).to_pylist()
    assert again.features["genres"].to_pylist() == log.features["genres"].to_pylist()
    assert again.labels.tolist() == log.labels.tolist()
    # No category column: the log has none.
    rows = [(u, i, t, label) for u, i, _, t, label, *_ in labeled_rows(30)]
    plain = write_labeled_log(tmp_path / "plain.csv", rows,
                              ("user", "item", "timestamp", "label"))
    assert load_labeled_log(plain, LogColumns()).categories is None


def test_time_split_keeps_equal_timestamps_together():
    timestamps = np.repeat(np.arange(10.0), 10)            # 100 rows, 10 per second
    assert split_points(timestamps, LogSplit(0.1, 0.1), "x") == (80, 90)
    assert split_points(timestamps, LogSplit(0.2, 0.25), "x") == (50, 70)   # 25 -> 30 rows
    with pytest.raises(InputError, match="no training rows"):
        split_points(np.zeros(10), LogSplit(), "x")


def test_id_maps_hold_the_training_rows_and_the_reserved_id():
    rows = ([("u1", "a", 0, 1), ("u1", "a", 1, 0), ("u2", "b", 2, 1), ("u2", "c", 3, 0)] * 3
            + [("u3", "new", 10, 1), ("u3", "a", 11, 1)] * 2)
    log = log_of(rows)
    data, splits = labeled_samples(log, LogSplit(0.1, 0.1))
    maps = data.id_maps
    assert maps.item_ids.to_pylist() == sorted({i for _, i, t, _ in rows if t < 10})
    assert maps.num_items == 4                     # a, b, c and the reserved id
    reserved = maps.num_items
    # Validation holds the rows of time 10 ("new", never seen in training),
    # test those of time 11 ("a").
    assert splits.validation.target.tolist() == [reserved] * 2
    assert splits.test.target.tolist() == [1, 1]
    # Its category ("cnew") is the reserved one too.
    assert splits.validation.target_category.tolist() == [maps.num_categories] * 2
    # min_count 4: "c" (3 training rows) shares the reserved id.
    rare = build_id_maps(log, 12, min_count=4)
    assert rare.item_ids.to_pylist() == ["a"]
    assert rare.fingerprint() != maps.fingerprint()
    assert build_id_maps(log, 12).fingerprint() == maps.fingerprint()


def test_samples_of_a_log_with_features(tmp_path):
    log = load_labeled_log(write_labeled_log(tmp_path / "log.csv"), COLUMNS)
    data, splits = labeled_samples(log, LogSplit())
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (480, 60, 60)
    assert not splits.negatives and splits.train_size == 480
    _, batch = next(iterate_batches(data, splits.test, 8))
    assert set(batch.features) == {"genres", "hour"} and batch.numeric.shape == (8, 1)
    # Standardized on the training rows.
    train_numeric = data.rows.numeric[splits.train.row]
    assert abs(train_numeric.mean()) < 1e-5 and abs(train_numeric.std() - 1) < 1e-4
    # Multi-valued rows padded with 0, an empty cell all padding.
    genres = batch.features["genres"]
    assert genres.shape[1] == 2 and int(genres.max()) <= data.id_maps.feature_sizes()["genres"]
