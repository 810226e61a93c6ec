"""Loaders, the DIN sample protocol and batching (din_fast.data)."""

import os
from pathlib import Path

import numpy as np
import pytest

from din_fast.data import (DataFormatError, build_samples, encode, iterate_batches,
                           load_amazon_directory, load_interactions, load_table,
                           synthetic_interactions)

from cli_data import write_amazon

# The shared data beside the repository, or where DIN_FAST_DATA_DIR points.
SHARED_DATA = Path(os.environ.get("DIN_FAST_DATA_DIR",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def user_items(interactions, user_id):
    u = int(np.flatnonzero(interactions.user_ids == user_id)[0])
    return interactions.items[interactions.offsets[u]:interactions.offsets[u + 1]].tolist()


def test_amazon_directory_sequences_and_leaf_category(tmp_path):
    data = load_interactions(write_amazon(tmp_path / "amazon"))
    assert data.user_ids.tolist() == [1, 2, 3]
    assert user_items(data, 1) == [10, 11, 12, 13]
    assert user_items(data, 3) == [15, 12]
    categories = dict(zip(data.category_items.tolist(), data.category_values.tolist()))
    assert categories[10] == 1 and categories[12] == 2      # the last attribute


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t"), (".txt", "\t")])
def test_table_orders_by_timestamp_then_file_order(tmp_path, suffix, sep):
    rows = [("timestamp", "item", "user", "category", "extra"),
            (30, 5, 2, 1, "x"), (10, 6, 1, 2, "x"), (20, 7, 1, 1, "x"),
            (10, 8, 1, 3, "x"), (5, 9, 2, 3, "x"), (20, 6, 2, 2, "x")]
    path = tmp_path / f"log{suffix}"
    path.write_text("\n".join(sep.join(map(str, r)) for r in rows) + "\n")
    data = load_table(path)
    assert data.user_ids.tolist() == [1, 2]
    assert user_items(data, 1) == [6, 8, 7]                   # 6 and 8 tie: file order
    assert user_items(data, 2) == [9, 6, 5]
    assert dict(zip(data.category_items.tolist(), data.category_values.tolist()))[8] == 3


@pytest.mark.parametrize("content, line, expected", [
    ("", "line 1", "empty file"),
    ("user,item,timestamp\n1,2,3\n", "line 1", "missing column(s) ['category']"),
    ("user,item,category,timestamp\n1,2,3,4\n1,x,3,5\n", "line 3", "integer item"),
    ("user,item,category,timestamp\n1,2,3,4\n1,2.5,3,5\n", "line 3", "integer item"),
    ("user,item,category,timestamp\n1,2,3,soon\n", "line 2", "numeric timestamp"),
    ("user,item,category,timestamp\n1,2,3\n", "line 2", "expected 4 fields"),
    ("user,item,category,timestamp\n", "", "no data rows"),
    ("user,item,category,timestamp\n1,2,3,4\n2,2,4,5\n", "line 3", "one category per item"),
])
def test_bad_table_names_file_line_and_expectation(tmp_path, content, line, expected):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataFormatError) as error:
        load_interactions(path)
    message = str(error.value)
    assert str(path) in message and line in message and expected in message


@pytest.mark.parametrize("lines, attributes, fragment, expected", [
    ([], None, "Small.txt", "empty file"),
    (["1 10 11", "2 10 zz"], None, "Small.txt, line 2", "integer item id"),
    (["u1 10 11"], None, "Small.txt, line 1", "integer user id"),
    (["1"], None, "Small.txt, line 1", "'user_id item_1 item_2 ...'"),
    (["1 10 99"], None, "amazon", "no category for item(s) [99]"),
    (["1 10"], {"10": []}, "Small_item2attributes.json", "non-empty list"),
])
def test_bad_amazon_files(tmp_path, lines, attributes, fragment, expected):
    directory = write_amazon(tmp_path / "amazon", lines=lines, attributes=attributes)
    with pytest.raises(DataFormatError) as error:
        encode(load_interactions(directory))
    assert fragment in str(error.value) and expected in str(error.value)


def test_amazon_directory_needs_both_files(tmp_path):
    directory = write_amazon(tmp_path / "amazon")
    (directory / "Small.txt").unlink()
    with pytest.raises(DataFormatError, match="Small.txt"):
        load_amazon_directory(directory)
    with pytest.raises(DataFormatError, match="nowhere.* does not exist"):
        load_interactions(tmp_path / "nowhere")


def history(data, samples, n):
    start = samples.history_start[n]
    return data.items[start:start + samples.history_length[n]].tolist()


def test_protocol_prefixes_targets_and_no_test_leak():
    # Every user's items are distinct, so "the test item" is one item id.
    data = encode(synthetic_interactions(num_users=60, interests_per_user=3, seed=3))
    users = []
    for u in range(len(data.user_ids)):
        items = data.items[data.offsets[u]:data.offsets[u + 1]]
        keep = np.sort(np.unique(items, return_index=True)[1])
        users.append(items[keep])
    data.items = np.concatenate(users)
    data.offsets = np.concatenate([[0], np.cumsum([len(s) for s in users])])
    train, test = build_samples(data, seed=0)
    lengths = np.diff(data.offsets)
    assert len(train) == 2 * np.maximum(lengths - 2, 0).sum()
    assert len(test) == 2 * (lengths >= 2).sum()
    for n in range(len(train)):
        u = train.user[n]
        sequence = users[u].tolist()
        k = train.history_length[n]
        assert history(data, train, n) == sequence[:k]
        assert 1 <= k <= len(sequence) - 2
        assert sequence[-1] not in history(data, train, n)
        assert train.target[n] != sequence[-1]
        if train.label[n] == 1:
            assert train.target[n] == sequence[k]
    for n in range(len(test)):
        sequence = users[test.user[n]].tolist()
        assert history(data, test, n) == sequence[:-1]
        if test.label[n] == 1:
            assert test.target[n] == sequence[-1]


def test_negatives_never_in_user_history_and_one_per_positive():
    data = encode(synthetic_interactions(num_users=200, seed=1))
    for samples in build_samples(data, seed=5):
        negative = samples.label == 0
        assert negative.sum() == (samples.label == 1).sum()
        for u, item in zip(samples.user[negative], samples.target[negative]):
            assert item not in data.items[data.offsets[u]:data.offsets[u + 1]]
        assert samples.target[negative].min() >= 1
        assert samples.target[negative].max() <= data.num_items


def test_sampling_is_seeded():
    data = encode(synthetic_interactions(num_users=100, seed=2))
    first, again, other = (build_samples(data, seed=s) for s in (7, 7, 8))
    for a, b in zip(first, again):
        assert np.array_equal(a.target, b.target) and np.array_equal(a.label, b.label)
    assert not np.array_equal(first[0].target, other[0].target)
    assert np.array_equal(encode(synthetic_interactions(num_users=100, seed=2)).items, data.items)


def test_batches_pad_to_longest_and_truncate_to_most_recent():
    data = encode(synthetic_interactions(num_users=50, seed=0))
    train, _ = build_samples(data, seed=0)
    seen = []
    for indices, batch in iterate_batches(data, train, 64, max_len=5, shuffle=True,
                                          rng=np.random.default_rng(0)):
        seen.append(indices)
        lengths = np.minimum(train.history_length[indices], 5)
        assert batch.history_items.shape == (len(indices), lengths.max())
        assert batch.lengths.tolist() == lengths.tolist()
        for row, n in enumerate(indices):
            full = history(data, train, n)
            assert batch.history_items[row, :lengths[row]].tolist() == full[-5:]
            assert (batch.history_items[row, lengths[row]:] == 0).all()
            assert batch.history_categories[row, :lengths[row]].tolist() == \
                data.item_category[full[-5:]].tolist()
        assert batch.target_categories.tolist() == \
            data.item_category[batch.target_items.numpy()].tolist()
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(train)))


def test_bucketing_keeps_padding_small():
    data = encode(synthetic_interactions(num_users=300, min_length=3, max_length=60, seed=0))
    train, _ = build_samples(data, seed=0)

    def padding(bucket_batches):
        return sum(b.history_items.numel() - b.lengths.sum().item()
                   for _, b in iterate_batches(data, train, 32, shuffle=True,
                                               rng=np.random.default_rng(0),
                                               bucket_batches=bucket_batches))
    assert padding(64) < 0.2 * padding(1)


def test_shared_amazon_data_matches_readme_statistics():
    directory = SHARED_DATA / "amazon-beauty"
    if not directory.is_dir():
        pytest.skip(f"shared data not found at {directory} (expected ../shared/data beside "
                    "the repository)")
    data = encode(load_interactions(directory))
    train, test = build_samples(data, seed=0)
    assert (len(data.user_ids), data.num_items, data.num_categories) == (22363, 12101, 195)
    assert (len(train), len(test)) == (307552, 44726)
