"""Rare ids by the DIN protocol (din_fast.ctr.rare_ids, --min-count): the
mapping against a brute-force count, and the real command on tiny data."""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch

from din_fast.ctr.checkpoint import CheckpointError, load_checkpoint
from din_fast.ctr.cli import main
from din_fast.ctr.data import build_samples, encode
from din_fast.ctr.loaders import load_interactions, synthetic_interactions
from din_fast.ctr.predict import ItemCategories
from din_fast.ctr.rare_ids import rare_id_maps, rare_ids, with_rare_ids
from din_fast.ctr.training import load_data

from cli_data import evaluation_reproducing, one_torch_thread, write_csv  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def interactions():
    # 40 users, ~760 behaviours over 1000 items: most items are rare.
    return synthetic_interactions(num_users=40, seed=5)


def behaviours(interactions) -> list:
    """Each user's raw items, oldest first."""
    items = interactions.items.dictionary.take(interactions.items.indices).to_pylist()
    return [items[a:b] for a, b in zip(interactions.offsets[:-1], interactions.offsets[1:])]


def category_of(interactions) -> dict:
    return dict(zip(interactions.category_items.to_pylist(),
                    interactions.category_values.to_pylist()))


def training_counts(interactions) -> tuple:
    """(item counts, category counts) over each user's behaviours but the
    last two (the validation and test targets), counted one by one."""
    category = category_of(interactions)
    items = Counter(item for user in behaviours(interactions) for item in user[:-2])
    categories = Counter()
    for item, count in items.items():
        categories[category[item]] += count
    return items, categories


def test_threshold_one_keeps_every_id_of_the_data(tmp_path, interactions):
    path = write_csv(tmp_path / "tiny.csv", interactions)
    data, splits = load_data(str(path), 0, 1)
    today = encode(load_interactions(path))
    assert data.id_maps.fingerprint() == today.id_maps.fingerprint()
    assert not data.id_maps.unknown and data.id_maps.rare_items is None
    assert splits.rare is None and data.categories is None
    np.testing.assert_array_equal(data.items, today.items)


@pytest.mark.parametrize("min_count", [2, 4])
def test_every_rare_id_shares_the_reserved_row(interactions, min_count):
    full = encode(interactions)
    full_splits = build_samples(full, seed=0)
    data, splits = with_rare_ids(full, full_splits, min_count)
    item_count, category_count = training_counts(interactions)
    category = category_of(interactions)
    maps = data.id_maps
    raw_items = full.id_maps.item_ids.to_pylist()
    kept = sorted(i for i in raw_items if item_count[i] >= min_count)
    assert maps.item_ids.to_pylist() == kept and maps.unknown
    assert maps.rare_items.to_pylist() == sorted(set(raw_items) - set(kept))
    assert 0 < len(kept) < len(raw_items) / 2           # the test means something
    kept_categories = sorted(c for c in set(category.values()) if category_count[c] >= min_count)
    assert maps.category_ids.to_pylist() == kept_categories
    item_row = {item: n + 1 for n, item in enumerate(kept)}
    category_row = {c: n + 1 for n, c in enumerate(kept_categories)}
    reserved_item, reserved_category = len(kept) + 1, len(kept_categories) + 1
    expected_item = lambda raw: item_row.get(raw, reserved_item)
    expected_category = lambda raw: category_row.get(category[raw], reserved_category)
    # Every behaviour: its own row or the reserved one, and its category's row.
    flat = [item for user in behaviours(interactions) for item in user]
    assert data.items.tolist() == [expected_item(i) for i in flat]
    assert data.categories.tolist() == [expected_category(i) for i in flat]
    assert maps.rare_item_category.tolist() == [expected_category(i)
                                                for i in maps.rare_items.to_pylist()]
    # The samples are the protocol's whatever the threshold: the same users,
    # histories, labels and negatives, their targets mapped.
    raw = np.array([None] + raw_items, dtype=object)
    epoch = 3
    pairs = [(full_splits.validation, splits.validation), (full_splits.test, splits.test),
             (full_splits.training(full, 0, epoch), splits.training(data, 0, epoch))]
    for every_id, mapped in pairs:
        for name in ("user", "history_start", "history_length", "label"):
            np.testing.assert_array_equal(getattr(every_id, name), getattr(mapped, name))
        targets = raw[every_id.target]
        assert mapped.target.tolist() == [expected_item(i) for i in targets]
        assert mapped.target_category.tolist() == [expected_category(i) for i in targets]


def test_validation_and_test_targets_do_not_count(tmp_path):
    """An item seen often, but only as validation and test targets, is rare;
    the maps are those of the training behaviours alone."""
    rows = ["user,item,category,timestamp"]
    for user in range(6):
        training = ["a", "a", "b", f"x{user}"]
        for t, item in enumerate(training + ["hot", "hot"]):
            rows.append(f"u{user},{item},{'c' if item != 'hot' else 'h'},{t}")
    path = tmp_path / "hot.csv"
    path.write_text("\n".join(rows) + "\n")
    data, _ = load_data(str(path), 0, 2)
    assert data.id_maps.item_ids.to_pylist() == ["a", "b"]
    assert "hot" in data.id_maps.rare_items.to_pylist()
    assert data.id_maps.category_ids.to_pylist() == ["c"]   # "h" is never a training behaviour


def test_a_cold_item_keeps_its_category(interactions):
    full = encode(interactions)
    maps = rare_id_maps(full, 3)
    category = category_of(interactions)
    rare, known = maps.rare_items[0].as_py(), maps.item_ids[0].as_py()
    dense_category = {c: n + 1 for n, c in enumerate(maps.category_ids.to_pylist())}
    reserved = len(maps.category_ids) + 1
    alone = ItemCategories(maps)
    with_data = ItemCategories(maps, pa.array(["new"]), pa.array([category[known]]))
    raw = pa.array([known, rare, "new", "never"])
    own = [dense_category[category[known]], dense_category.get(category[rare], reserved)]
    assert alone(raw).tolist() == own + [reserved, reserved]
    assert with_data(raw).tolist() == own + [dense_category[category[known]], reserved]
    # The same, through the mapping evaluate and predict take data through.
    mapped = rare_ids(full, maps)
    of_rare = full.id_maps.item_ids.index(pa.scalar(rare)).as_py() + 1
    assert mapped.items[of_rare] == len(maps.item_ids) + 1
    assert mapped.categories[of_rare] == own[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, interactions):
    tmp = tmp_path_factory.mktemp("rare")
    data = write_csv(tmp / "tiny.csv", interactions)
    checkpoint, metrics = tmp / "din.pt", tmp / "train.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--data", str(data), "--min-count", "2", "--epochs", "1",
                     "--batch-size", "64", "--embed-dim", "4", "--no-progress",
                     "--checkpoint", str(checkpoint), "--metrics-out", str(metrics)]) == 0
    finally:
        torch.set_num_threads(threads)
    return tmp, data, checkpoint, json.loads(metrics.read_text())


def with_new_items(interactions, share: float, path):
    """The interactions with ``share`` of the behaviours replaced by items
    never seen (in an existing category), as a CSV file."""
    users = behaviours(interactions)
    category = category_of(interactions)
    rng = np.random.default_rng(0)
    rows = ["user,item,category,timestamp"]
    for user, items in zip(interactions.user_ids.to_pylist(), users):
        for t, item in enumerate(items):
            if rng.random() < share:
                item, item_category = f"new{user}-{t}", category[item]
            else:
                item_category = category[item]
            rows.append(f"{user},{item},{item_category},{t}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_evaluate_and_predict_take_unseen_ids_through_the_reserved_row(trained, interactions,
                                                                      tmp_path, capsys):
    tmp, data, checkpoint, metrics = trained
    saved = load_checkpoint(checkpoint)
    assert saved.config.min_count == 2 and saved.id_maps.unknown
    # Most rows hold a rare item, yet the training data is the checkpoint's own.
    rare_rows = np.mean([item in set(saved.id_maps.rare_items.to_pylist())
                         for user in behaviours(interactions) for item in user])
    assert rare_rows > 0.1
    evaluated = evaluation_reproducing(checkpoint, data, metrics, tmp_path / "eval.json", 1e-9)
    assert evaluated["unknown_test_items"] > 0 and "excluded_test_samples" not in evaluated
    # Unseen items within the tolerance are scored and reported ...
    newer = with_new_items(interactions, 0.05, tmp_path / "newer.csv")
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(newer)]) == 0
    assert "scored through the reserved rows" in capsys.readouterr().err
    # ... beyond it, the data is refused.
    other = with_new_items(interactions, 0.5, tmp_path / "other.csv")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(other)]) == 2
    assert "does not fit checkpoint" in capsys.readouterr().err
    # predict scores an unseen candidate, and a history holding one.
    known = saved.id_maps.item_ids.to_pylist()
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"history": known[:3] + ["unseen"],
                                    "candidates": [known[3], "unseen"]}) + "\n")
    scores = tmp_path / "scores.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--data", str(newer), "--output", str(scores)]) == 0
    lines = scores.read_text().splitlines()
    assert lines[2].startswith("1,unseen,") and lines[2].endswith(",unknown item")
    assert all(float(line.split(",")[2]) > 0 for line in lines[1:])
    assert "1 unknown candidate(s), 1 unknown history item(s)" in capsys.readouterr().err


def test_checkpoints_of_the_previous_format_load(trained, tmp_path):
    _, _, checkpoint, _ = trained
    state = torch.load(checkpoint, weights_only=True)
    assert state["format"] == "din_fast.checkpoint/6"
    # Format 4 had no rare ids (min_count was a labeled log's only).
    older = dict(state, format="din_fast.checkpoint/4")
    older["id_maps"] = {k: v for k, v in state["id_maps"].items()
                        if not k.startswith("rare_") and k != "fingerprint"}
    older["id_maps"]["unknown"] = False
    older["config"] = dict(state["config"], min_count=1)
    item, category = (len(older["id_maps"][k]["offsets"]) for k in ("item_ids", "category_ids"))
    older["state_dict"] = {k: v[:item] if k == "item_embedding.weight" else
                           v[:category] if k == "category_embedding.weight" else v
                           for k, v in state["state_dict"].items()}
    path = tmp_path / "older.pt"
    torch.save(older, path)
    loaded = load_checkpoint(path)
    assert loaded.config.min_count == 1 and not loaded.id_maps.unknown
    # A rare item the maps also hold as their own is refused.
    state["id_maps"]["rare_items"] = state["id_maps"]["item_ids"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="rare_items"):
        load_checkpoint(path)


def test_predict_and_the_exported_model_agree_on_rare_items(trained, tmp_path):
    """A rare item shares the reserved id but keeps its own category, in
    din-fast predict and in the exported package's Encoder alike (its
    <name>.ids.json lists the rare items with their categories): both give
    the same scores, rare items in histories and among candidates."""
    pytest.importorskip("onnxruntime")
    from din_fast.ctr.serving import Encoder, OnnxModel

    _, _, checkpoint, _ = trained
    saved = load_checkpoint(checkpoint)
    maps = saved.id_maps
    known = maps.item_ids.to_pylist()
    # Rare items whose own category has a row: the reserved one would differ.
    rare = [item for item, category in zip(maps.rare_items.to_pylist(), maps.rare_item_category)
            if category != maps.num_categories]
    assert len(rare) >= 4
    histories = [[known[0], rare[0], rare[1]], [rare[2]], []]
    candidates = [[rare[3], known[1]], [rare[0], "never-seen"], [rare[1]]]
    requests, scores = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    requests.write_text("".join(json.dumps({"history": h, "candidates": c, "request": str(b)})
                                + "\n" for b, (h, c) in enumerate(zip(histories, candidates))))
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--output", str(scores)]) == 0
    predicted = [json.loads(line)["score"] for line in scores.read_text().splitlines()]
    out = tmp_path / "din.onnx"
    assert main(["export", "--format", "onnx", "--checkpoint", str(checkpoint), "--out",
                 str(out)]) == 0
    exported = json.loads((tmp_path / "din.ids.json").read_text())
    assert exported["rare_items"] == maps.rare_items.to_pylist()
    batch = Encoder.from_json(tmp_path / "din.ids.json").encode(histories, candidates,
                                                                max_len=saved.config.max_len)
    assert batch.history_categories[0, 1] == int(ItemCategories(maps)(pa.array([rare[0]]))[0])
    logits = OnnxModel(out)(*batch.inputs())
    served = [float(torch.sigmoid(logits[b, c])) for b, row in enumerate(candidates)
              for c in range(len(row))]
    assert served == pytest.approx(predicted, abs=1e-5)
