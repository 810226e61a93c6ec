"""Dense ids, the DIN sample protocol and batching (din_fast.ctr.data)."""

import os
from pathlib import Path

import numpy as np
import pytest

from din_fast.ctr.data import (build_samples, encode, iterate_batches, known_test_samples,
                           training_samples)
from din_fast.ctr.loaders import load_interactions, synthetic_interactions

# The shared data beside the repository, or where DIN_FAST_DATA_DIR points.
SHARED_DATA = Path(os.environ.get("DIN_FAST_DATA_DIR",
                                  Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def history(data, samples, n):
    start = samples.history_start[n]
    return data.items[start:start + samples.history_length[n]].tolist()


def distinct_items_data(seed=3):
    """Encoded synthetic data where each user's items are distinct, so "the
    test item" is one item id."""
    data = encode(synthetic_interactions(num_users=60, interests_per_user=3, seed=seed))
    users = []
    for u in range(len(data.user_ids)):
        items = data.items[data.offsets[u]:data.offsets[u + 1]]
        users.append(items[np.sort(np.unique(items, return_index=True)[1])])
    data.items = np.concatenate(users)
    data.offsets = np.concatenate([[0], np.cumsum([len(s) for s in users])])
    return data, users


def test_protocol_prefixes_targets_and_no_leak():
    data, users = distinct_items_data()
    splits = build_samples(data, seed=0)
    lengths = np.diff(data.offsets)
    train = splits.train
    assert len(train) == np.maximum(lengths - 3, 0).sum() and (train.label == 1).all()
    assert len(splits.validation) == 2 * (lengths >= 3).sum()
    assert len(splits.test) == 2 * (lengths >= 2).sum()
    for n in range(len(train)):
        sequence = users[train.user[n]].tolist()
        k = train.history_length[n]
        assert 1 <= k <= len(sequence) - 3
        assert history(data, train, n) == sequence[:k] and train.target[n] == sequence[k]
        assert not set(sequence[-2:]) & set(history(data, train, n) + [train.target[n]])
    for samples, held_out in ((splits.validation, 2), (splits.test, 1)):
        for n in range(len(samples)):
            sequence = users[samples.user[n]].tolist()
            assert history(data, samples, n) == sequence[:-held_out]
            if samples.label[n] == 1:
                assert samples.target[n] == sequence[-held_out]


def all_samples(data, splits, epoch=1):
    return (training_samples(data, splits.train, 5, epoch), splits.validation,
            splits.test)


def test_negatives_never_touched_and_one_per_positive():
    data = encode(synthetic_interactions(num_users=200, seed=1))
    for samples in all_samples(data, build_samples(data, seed=5)):
        negative = samples.label == 0
        assert negative.sum() == (samples.label == 1).sum()
        for u, item in zip(samples.user[negative], samples.target[negative]):
            assert item not in data.items[data.offsets[u]:data.offsets[u + 1]]
        assert samples.target[negative].min() >= 1
        assert samples.target[negative].max() <= data.num_items


def test_sampling_is_seeded_and_training_negatives_change_every_epoch():
    data = encode(synthetic_interactions(num_users=100, seed=2))
    first, again, other = (build_samples(data, seed=s) for s in (7, 7, 8))
    for a, b in zip(all_samples(data, first), all_samples(data, again)):
        assert np.array_equal(a.target, b.target) and np.array_equal(a.label, b.label)
    assert not np.array_equal(first.test.target, other.test.target)
    epoch_1, epoch_2 = (training_samples(data, first.train, 7, e) for e in (1, 2))
    assert np.array_equal(epoch_1.target[epoch_1.label == 1], epoch_2.target[epoch_2.label == 1])
    assert (epoch_1.target[epoch_1.label == 0] != epoch_2.target[epoch_2.label == 0]).mean() > 0.5


def test_known_test_samples_equal_the_protocol_when_every_item_is_known():
    data = encode(synthetic_interactions(num_users=80, seed=6))
    known, test = known_test_samples(data, seed=3), build_samples(data, seed=3).test
    for name in ("user", "history_start", "history_length", "target", "label"):
        assert np.array_equal(getattr(known.samples, name), getattr(test, name)), name
    assert (known.excluded_samples, known.skipped_history_items) == (0, 0)


def test_known_test_samples_skip_unknown_history_and_leave_out_unknown_targets():
    data, users = distinct_items_data(seed=4)
    data.items = data.items.copy()
    first_user = data.offsets[0]
    data.items[first_user + 1] = 0                      # an unknown item in user 0's history
    data.items[data.offsets[2] - 1] = 0                 # user 1's test item unknown
    known = known_test_samples(data, seed=0)
    assert known.excluded_samples == 2 and known.skipped_history_items == 1
    assert 1 not in known.samples.user
    row = np.flatnonzero((known.samples.user == 0) & (known.samples.label == 1))[0]
    expected = users[0].tolist()
    assert history(known.data, known.samples, row) == expected[:1] + expected[2:-1]
    assert known.samples.target[row] == expected[-1]


def test_batches_pad_to_longest_and_truncate_to_most_recent():
    data = encode(synthetic_interactions(num_users=50, seed=0))
    train = build_samples(data, seed=0).test
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


@pytest.mark.parametrize("size, min_batch", [(1, 2), (2, 2), (65, 2), (129, 2), (67, 4),
                                             (70, 8), (64, 8)])
def test_training_batches_are_never_smaller_than_min_batch(size, min_batch):
    # Dice's batch normalization needs two rows (per process when sharded): a
    # leftover smaller than min_batch joins a batch.
    data = encode(synthetic_interactions(num_users=100, seed=0))
    samples = build_samples(data, seed=0).test
    keep = np.arange(size)
    subset = type(samples)(*(getattr(samples, f)[keep] for f in
                             ("user", "history_start", "history_length", "target", "label")))
    sizes = [len(i) for i, _ in iterate_batches(data, subset, 64, shuffle=True,
                                                rng=np.random.default_rng(0),
                                                min_batch=min_batch)]
    assert sum(sizes) == size and (min(sizes) >= min_batch or len(sizes) == 1)


def test_bucketing_keeps_padding_small():
    data = encode(synthetic_interactions(num_users=300, min_length=3, max_length=60, seed=0))
    train = training_samples(data, build_samples(data, seed=0).train, 0, 1)

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
                    "the repository, or DIN_FAST_DATA_DIR)")
    data = encode(load_interactions(directory))
    splits = build_samples(data, seed=0)
    assert (len(data.user_ids), data.num_items, data.num_categories) == (22363, 12101, 195)
    # The data's README counts 307,552 training samples when the validation
    # target is trained on too: 2 per user fewer here.
    assert 2 * len(splits.train) == 307552 - 2 * 22363
    assert len(splits.validation) == len(splits.test) == 44726
