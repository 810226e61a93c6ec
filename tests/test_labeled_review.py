"""An adversarial user's pass over a labeled log's checkpoint after training:
evaluate on the same log written otherwise, predict and the exported model on
awkward requests, each result compared with the model's own forward."""

import csv
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from din_fast.ctr.checkpoint import restored_model
from din_fast.ctr.cli import main
from din_fast.ctr.data import iterate_batches
from din_fast.ctr.labeled_loader import load_labeled_log
from din_fast.ctr.labeled_samples import encode_log, split_log
from din_fast.ctr.training import checkpoint_for_run, log_columns, log_split

from cli_data import one_torch_thread, write_labeled_log  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The options spelled in another case than the log's header (genres, hour,
# price); --min-count 12 leaves about half of the 40 items rare (the reserved
# row, each keeping its category).
OPTIONS = ["--label-column", "label", "--features", "Genres,HOUR", "--numeric-features",
           "Price", "--min-count", "12", "--linear", "--embed-dim", "4", "--batch-size", "64",
           "--epochs", "1", "--no-progress"]
METRICS = ("test_auc", "test_gauc", "test_logloss", "test_samples")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(log, checkpoint, its training metrics)."""
    directory = tmp_path_factory.mktemp("review")
    log, checkpoint = write_labeled_log(directory / "log.csv"), directory / "din.pt"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--data", str(log), *OPTIONS, "--checkpoint", str(checkpoint),
                     "--metrics-out", str(directory / "din.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    return log, checkpoint, json.loads((directory / "din.json").read_text())


def test_features_keep_the_names_the_options_give(trained, tmp_path, capsys):
    """Header names compare in any case: a run given --features Genres,HOUR
    for the columns genres and hour calls them so in its checkpoint, which
    evaluate, predict and export take (a checkpoint whose config and id maps
    spelled them differently was refused by all three), and requests name
    them so."""
    log, checkpoint, _ = trained
    saved, _ = checkpoint_for_run(str(checkpoint), "torch", "cpu")
    assert list(saved.id_maps.features) == ["Genres", "HOUR"]
    assert list(saved.id_maps.numeric) == ["Price"]
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"user": "u3", "candidates": ["i1"], "features": {
        "genres": "g1", "HOUR": 7, "Price": 9.5}}) + "\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--data", str(log)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"din-fast: error: {requests}, line 1: \"features\" lacks 'Genres'; the model takes "
        "Genres, HOUR, Price"]


def evaluated(checkpoint, data, tmp_path) -> dict:
    out = tmp_path / "evaluated.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data),
                 "--metrics-out", str(out)]) == 0
    return json.loads(out.read_text())


def rewritten(log, path, header=None, rows=None, delimiter=","):
    """The log's table with the columns of ``header`` (upper case; one the
    log lacks holds x), its rows as ``rows`` gives them (a function of the
    rows, dicts by column)."""
    table = list(csv.DictReader(log.open()))
    header = header or list(table[0])
    rows = table if rows is None else rows(table)
    path.write_text("\n".join(delimiter.join(r) for r in [[h.upper() for h in header]]
                              + [[row.get(h, "x") for h in header] for row in rows]) + "\n")
    return path


def test_evaluate_takes_the_same_log_written_otherwise(trained, tmp_path):
    """Columns in another order and case, extra columns, rows shuffled (ties
    kept in one set), TSV, Parquet with integer and dictionary columns: the
    run's own test metrics every time."""
    log, checkpoint, metrics = trained
    header = list(csv.DictReader(log.open()).fieldnames)
    shuffled = lambda rows: random.Random(3).sample(rows, len(rows))
    typed = pacsv.read_csv(log)                      # hour int64, price double
    pq.write_table(typed, tmp_path / "typed.parquet")
    pq.write_table(typed.set_column(typed.schema.get_field_index("item"), "item",
                                    typed["item"].dictionary_encode()),
                   tmp_path / "dictionary.parquet")
    for data in (rewritten(log, tmp_path / "order.csv", header[::-1] + ["junk"]),
                 rewritten(log, tmp_path / "shuffled.csv", rows=shuffled),
                 rewritten(log, tmp_path / "log.tsv", delimiter="\t"),
                 tmp_path / "typed.parquet", tmp_path / "dictionary.parquet"):
        got = evaluated(checkpoint, data, tmp_path)
        assert {k: got[k] for k in METRICS} == pytest.approx({k: metrics[k] for k in METRICS},
                                                             abs=1e-9), data.name




def nanosecond_timestamps(table: pa.Table, as_type) -> pa.Table:
    """The table's timestamps (seconds) as nanoseconds since 2023-11-14, as
    pandas writes a datetime64[ns] column (``as_type`` timestamp("ns")), or
    as their int64 count: both beyond 2**53, up to which float64 holds
    integers exactly."""
    seconds = np.asarray(table["timestamp"], dtype=np.int64)
    nanoseconds = pa.array(1_700_000_000_000_000_000 + seconds * 1_000_000_007, as_type)
    return table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                            nanoseconds)


def test_evaluate_takes_parquet_timestamps_in_nanoseconds(trained, tmp_path):
    """pandas writes datetimes as timestamp[ns]: refused as 'timestamp[ns];
    expected numbers' (int64 -> float64 refused as lossy), as was an int64
    count of nanoseconds; only their order matters, which the rounding to
    float64 keeps."""
    log, checkpoint, metrics = trained
    for as_type in (pa.timestamp("ns"), pa.timestamp("ns", tz="UTC"), pa.int64()):
        pq.write_table(nanosecond_timestamps(pacsv.read_csv(log), as_type),
                       tmp_path / "log.parquet")
        got = evaluated(checkpoint, tmp_path / "log.parquet", tmp_path)
        assert {k: got[k] for k in METRICS} == pytest.approx({k: metrics[k] for k in METRICS},
                                                             abs=1e-9), as_type


def test_the_din_protocols_parquet_takes_timestamps_in_nanoseconds(tmp_path):
    from din_fast.ctr.loaders import load_interactions

    rows = pa.table({"user": ["u1", "u1", "u2"], "item": ["i2", "i1", "i1"],
                     "category": ["c", "c", "c"], "timestamp": [2, 1, 1]})
    pq.write_table(nanosecond_timestamps(rows, pa.timestamp("ns")), tmp_path / "log.parquet")
    assert load_interactions(tmp_path / "log.parquet").items.to_pylist() == ["i1", "i2", "i1"]

def test_evaluate_counts_the_feature_values_it_scores_as_the_reserved_id(trained, tmp_path,
                                                                         capsys):
    """The test rows' genres replaced by values the checkpoint never saw:
    evaluate scores them as the reserved id, and should say so, as it does
    for items and as predict does for feature values."""
    log, checkpoint, _ = trained
    unseen = lambda rows: rows[:-60] + [{**row, "genres": "new1|new2"} for row in rows[-60:]]
    data = rewritten(log, tmp_path / "unseen.csv", rows=lambda rows: unseen(sorted(
        rows, key=lambda row: float(row["timestamp"]))))
    capsys.readouterr()
    got = evaluated(checkpoint, data, tmp_path)
    assert got["unknown_feature_values"] >= 120         # two per row, rare ones too
    assert f"{got['unknown_feature_values']} side-feature value(s)" in capsys.readouterr().err
    # Both counts against a literal walk over the test samples.
    checkpoint_, config = checkpoint_for_run(str(checkpoint), "torch", "cpu")
    maps = checkpoint_.id_maps
    encoded = encode_log(load_labeled_log(data, log_columns(config)), maps)
    test, rows = split_log(encoded, log_split(config)).test, encoded.data.rows
    history = feature_values = 0
    for start, length, row in zip(test.history_start, test.history_length, test.row):
        read = encoded.data.items[start:start + length][-config.max_len:]
        history += int((read == len(maps.item_ids) + 1).sum())
        for name, values in rows.values.items():
            mine = values[rows.offsets[name][row]:rows.offsets[name][row + 1]]
            feature_values += int((mine == len(maps.features[name]) + 1).sum())
    assert (got["unknown_history_items"], got["unknown_feature_values"]) == (history,
                                                                           feature_values)

def test_predict_scores_as_the_models_forward_on_the_test_rows(trained, tmp_path, capsys):
    """Each test row as a request (its history: the user's clicks strictly
    earlier; its features raw, the price unstandardized): predict's score is
    the model's forward on the row as evaluate batches it, so the
    standardization is applied once, multi-valued values pooled alike and
    rare or unknown ids take the reserved row."""
    log, checkpoint, _ = trained
    checkpoint_, config = checkpoint_for_run(str(checkpoint), "torch", "cpu")
    model = restored_model(checkpoint_, config)
    encoded = encode_log(load_labeled_log(log, log_columns(config)), checkpoint_.id_maps)
    test = split_log(encoded, log_split(config)).test
    expected = np.empty(len(test))
    with torch.no_grad():
        for indices, batch in iterate_batches(encoded.data, test, 1024, max_len=config.max_len):
            args, kwargs = batch.model_inputs()
            expected[indices] = torch.sigmoid(model(*args, **kwargs).double()).numpy()
    rows = sorted(csv.DictReader(log.open()), key=lambda r: float(r["timestamp"]))
    requests = [{"history": [h["item"] for h in rows if h["user"] == row["user"]
                             and h["label"] == "1"
                             and float(h["timestamp"]) < float(row["timestamp"])],
                 "candidates": [row["item"]],
                 "features": {"Genres": row["genres"], "HOUR": row["hour"],
                              "Price": float(row["price"])}}
                for row in rows[len(rows) - len(test):]]
    path, out = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    path.write_text("\n".join(map(json.dumps, requests)) + "\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(path),
                 "--output", str(out)]) == 0
    assert "0 unknown candidate(s)" not in capsys.readouterr().err      # rare ones among them
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def awkward_requests(count=24, seed=1) -> list:
    """Requests of 1-5 candidates and histories of 0-8 items, rare, known
    and unknown ids, multi-valued cells with empty parts and duplicates,
    features given once or per candidate, numbers as JSON numbers or strings."""
    rng = random.Random(seed)
    items = [f"i{i}" for i in range(40)] + ["never", "i99"]
    cells = ["g1", "g1|g2", "g1||g2", "g3|", "", "|", "g1|g1", "unseen", " g2 | g4 "]
    requests = []
    for _ in range(count):
        candidates = rng.sample(items, rng.randint(1, 5))
        per = lambda value: [value() for _ in candidates] if rng.random() < 0.5 else value()
        requests.append({"history": rng.sample(items, rng.randint(0, 8)),
                         "candidates": candidates,
                         "features": {"Genres": per(lambda: rng.choice(cells)),
                                      "HOUR": per(lambda: rng.choice([3, "23", "99"])),
                                      "Price": per(lambda: rng.choice([9.5, "11", -3.25, 0]))}})
    return requests


def test_the_exported_model_scores_as_predict(trained, tmp_path):
    """The ONNX model, its inputs built from raw requests by the Encoder of
    the id maps beside it (the layout its inputs list), scores every
    candidate as predict does; and predict scores a request's candidates
    together as it does each alone."""
    pytest.importorskip("onnxruntime")
    from din_fast.ctr.serving import Encoder, OnnxModel

    _, checkpoint, _ = trained
    _, config = checkpoint_for_run(str(checkpoint), "torch", "cpu")
    requests = awkward_requests()
    alone = [{**r, "candidates": [c], "features": {
        k: v[i] if isinstance(v, list) else v for k, v in r["features"].items()}}
        for r in requests for i, c in enumerate(r["candidates"])]
    scores = []
    for name, given in (("together", requests), ("alone", alone)):
        path, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.scores.jsonl"
        path.write_text("\n".join(map(json.dumps, given)) + "\n")
        assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(path),
                     "--output", str(out)]) == 0
        scores.append([json.loads(line)["score"] for line in out.read_text().splitlines()])
    np.testing.assert_allclose(scores[0], scores[1], rtol=0, atol=1e-6)
    onnx = tmp_path / "din.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(onnx), "--format",
                 "onnx"]) == 0
    layout = json.loads((tmp_path / "din.ids.json").read_text())["inputs"]
    batch = Encoder.from_json(tmp_path / "din.ids.json").encode(
        [r["history"] for r in requests], [r["candidates"] for r in requests],
        max_len=config.max_len, features=[r["features"] for r in requests])
    inputs = batch.inputs()
    assert [spec["name"] for spec in layout] == [
        "history_items", "history_categories", "lengths", "target_items", "target_categories",
        "features_genres", "features_hour", "numeric"]
    logits = OnnxModel(onnx)(**{spec["name"]: t for spec, t in zip(layout, inputs)})
    exported = torch.cat([torch.sigmoid(logits[b, :len(r["candidates"])].double())
                          for b, r in enumerate(requests)])
    np.testing.assert_allclose(exported.numpy(), scores[0], rtol=0, atol=1e-5)


def test_export_refuses_features_that_would_share_an_input_name(tmp_path, capsys):
    """Side features a-b and a.b are both the exported input features_a_b:
    the layout beside the model listed that name twice while the graph
    called the second features_a_b_1, tied the two features' value counts
    and left the second one's ids unchecked (an id past its table read out
    of bounds in a .pt2 package). Both formats refuse, before compiling,
    in one line."""
    log = tmp_path / "log.csv"
    rows = list(csv.reader(write_labeled_log(log).open()))
    log.write_text("\n".join(",".join(row + (["a-b", "a.b"] if n == 0 else [f"x{n % 3}", "y"]))
                             for n, row in enumerate(rows)) + "\n")
    checkpoint = tmp_path / "din.pt"
    assert main(["train", "--data", str(log), "--label-column", "label", "--features",
                 "a-b,a.b", "--embed-dim", "4", "--epochs", "1", "--no-progress",
                 "--checkpoint", str(checkpoint)]) == 0
    capsys.readouterr()
    for out, format_ in ((tmp_path / "din.onnx", "onnx"), (tmp_path / "din.pt2", "pt2")):
        assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out),
                     "--format", format_, "--device", "cpu"][:None if format_ == "pt2" else -2]) \
            == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"din-fast: error: --checkpoint {checkpoint}: side features 'a-b' and 'a.b' would "
            "both be the exported input features_a_b (lower case, every character but letters "
            "and digits '_'); train with column names that differ there to export the model"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["din.pt", "din.run.pt", "log.csv"]


def test_the_encoder_refuses_features_a_model_without_them_would_ignore():
    """A model trained without side features scores the same whatever
    features a request brings: predict refuses them (the request names a
    column the model does not take), and so does the Encoder, which dropped
    them unannounced."""
    from din_fast.ctr.serving import Encoder

    encoder = Encoder(["i1", "i2"], None, None, unknown=True)
    with pytest.raises(ValueError, match=r"features\[1\]: has 'hour', not one of them; the "
                                         "model takes no side features"):
        encoder.encode([["i1"], []], [["i2"], ["i1"]], features=[{}, {"hour": 3}])
    assert encoder.encode([["i1"], []], [["i2"], ["i1"]], features=[{}, {}]).features is None


@pytest.mark.parametrize("unknown", [False, True], ids=["din-protocol", "reserved-id"])
def test_the_encoder_trims_item_ids_as_predict_does(unknown):
    """din-fast train and predict trim the ids they read (" i1" is the item
    i1); the Encoder compared them untrimmed, so a padded id was an unknown
    item (dropped from the history, or the reserved row with the reserved
    category in place of a rare item's own): other scores than predict's."""
    from din_fast.ctr.serving import Encoder

    encoder = Encoder(["i1", "i2"], ["c1", "c2"], [0, 2, 1], unknown=unknown,
                      rare_items=["r1"] if unknown else None,
                      rare_item_category=[1] if unknown else None)
    listed = ["i1", "i2", "r1"] if unknown else ["i1", "i2"]
    plain = encoder.encode([listed], [listed[::-1]])
    padded = encoder.encode([[f" {i}" for i in listed]], [[f"{i}\t " for i in listed[::-1]]])
    for name in ("history_items", "history_categories", "lengths", "target_items",
                 "target_categories", "known"):
        assert torch.equal(getattr(padded, name), getattr(plain, name)), name
    assert padded.unknown_history_items == plain.unknown_history_items == int(unknown)


def test_a_number_beyond_float32_once_standardized_is_refused(trained, tmp_path, capsys):
    """A numeric feature is standardized, then read as float32: a request's
    price of 1e300 passed the finite-number check, became Inf and predict
    wrote NaN scores (``NaN`` in JSON lines, not JSON) with exit status 0;
    such a row in --data made evaluate blame the weights ("diverged").
    Both name the value and the range the model takes."""
    log, checkpoint, _ = trained
    requests, out = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    requests.write_text(json.dumps({"history": ["i1"], "candidates": ["i2", "i3"], "features": {
        "Genres": "g1", "HOUR": 3, "Price": [9.5, 1e300]}}) + "\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--output", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        f"din-fast: error: {requests}, line 1: \"features\" 'Price': 1e+300 is beyond float32's "
        "range once standardized as in training ((value - ") and "expected a number in [" \
        in error[0] and not out.exists()
    rows = log.read_text().splitlines()
    rows[-1] = ",".join(rows[-1].split(",")[:-1] + ["-1e300"])
    data = tmp_path / "huge.csv"
    data.write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        f"din-fast: error: {data}, column Price: -1e+300 is beyond float32's range")
