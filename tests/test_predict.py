"""din-fast predict: scores of new rows, unknown ids reported (din_fast.ctr.predict)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from din_fast.ctr.checkpoint import load_checkpoint
from din_fast.ctr.cli import main
from din_fast.ctr.config import build_model
from din_fast.ctr.data import encode
from din_fast.ctr.loaders import load_interactions, synthetic_interactions
from din_fast.ctr.predict import predict_file
from din_fast.ctr.training import TrainConfig, train

from cli_data import write_csv


@pytest.fixture(scope="module", params=["din", "base"])
def trained(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"predict_{request.param}")
    data = write_csv(tmp / "tiny.csv", synthetic_interactions(num_users=40, seed=5))
    checkpoint = tmp / "model.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(data=str(data), model=request.param, epochs=1, batch_size=64,
                          embed_dim=4), checkpoint=str(checkpoint), progress=False,
              log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return tmp, data, checkpoint


def single_candidate_scores(checkpoint_path, history, candidates):
    """The model's probability of each candidate alone (the 2-D query path)."""
    checkpoint = load_checkpoint(checkpoint_path)
    maps = checkpoint.id_maps
    model = build_model(checkpoint.config, len(maps.item_ids), len(maps.category_ids))
    model.load_state_dict(checkpoint.state_dict)
    model.eval()
    h = torch.from_numpy(maps.dense_items(pa.array(history, pa.string())))[None]
    c = torch.from_numpy(maps.dense_items(pa.array(candidates, pa.string())))
    category = torch.from_numpy(maps.item_category)
    with torch.no_grad():
        logits = model(h.expand(len(c), -1), category[h].expand(len(c), -1),
                       torch.full((len(c),), h.shape[1]), c, category[c])
    return torch.sigmoid(logits.double()).numpy()


def test_predict_through_the_command(trained):
    tmp, data, checkpoint = trained
    interactions = load_interactions(data)
    items = interactions.items.dictionary.take(interactions.items.indices).to_pylist()
    user = interactions.user_ids[3].as_py()
    user_history = items[interactions.offsets[3]:interactions.offsets[4]]
    requests = tmp / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"user": user, "candidates": [items[0], "no-such-item", items[1]]},
        {"history": [items[5], "unseen", items[6]], "candidates": [items[7]], "request": "r2"},
        {"user": "nobody", "candidates": [items[0]]},
    ]) + "\n\n")
    out = tmp / "scores.csv"
    result = subprocess.run([sys.executable, "-m", "din_fast", "predict", "--checkpoint",
                             str(checkpoint), "--requests", str(requests), "--data", str(data),
                             "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "3 score(s) for 3 request(s); 1 unknown candidate(s) and 1 unknown user(s)" \
        in result.stderr and "1 unknown history item(s) skipped" in result.stderr
    rows = list(csv.DictReader(out.open()))
    assert [(r["request"], r["candidate"], r["note"]) for r in rows] == [
        ("1", items[0], ""), ("1", "no-such-item", "unknown item"), ("1", items[1], ""),
        ("r2", items[7], ""), ("3", items[0], "unknown user")]
    assert rows[1]["score"] == rows[4]["score"] == ""
    # The same numbers as the model's one-candidate path.
    expected = single_candidate_scores(checkpoint, user_history[-50:], [items[0], items[1]])
    assert np.allclose([float(rows[0]["score"]), float(rows[2]["score"])], expected, rtol=1e-5)
    expected = single_candidate_scores(checkpoint, [items[5], items[6]], [items[7]])
    assert np.allclose(float(rows[3]["score"]), expected, rtol=1e-5)


def test_predict_json_lines_to_stdout(trained, capsys):
    tmp, data, checkpoint = trained
    items = load_checkpoint(checkpoint).id_maps.item_ids.to_pylist()
    requests = tmp / "history_only.jsonl"
    requests.write_text(json.dumps({"history": items[:3], "candidates": items[3:5]}) + "\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--format", "jsonl"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["request"], r["candidate"]) for r in lines] == [("1", items[3]), ("1", items[4])]
    assert all(0 < r["score"] < 1 for r in lines)


@pytest.mark.parametrize("content, expected", [
    ('{"user": "1", "candidates": ["1"]}\nnot json\n', "line 2: not a JSON object"),
    ('{"user": "1"}\n', 'line 1: "candidates" must be a non-empty list'),
    ('{"user": "1", "history": [], "candidates": ["1"]}\n', "exactly one of"),
    ('{"history": "1 2", "candidates": ["1"]}\n', '"history" must be a list'),
    ("\n\n", "no requests"),
])
def test_bad_requests_name_the_line(trained, tmp_path, capsys, content, expected):
    _, data, checkpoint = trained
    requests = tmp_path / "bad.jsonl"
    requests.write_text(content)
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("din-fast: error: ") and str(requests) in error and expected in error


def test_user_requests_need_data(trained, tmp_path, capsys):
    _, _, checkpoint = trained
    requests = tmp_path / "users.jsonl"
    requests.write_text('{"user": "1", "candidates": ["1"]}\n')
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests",
                 str(requests)]) == 2
    assert "--data must give their behaviours" in capsys.readouterr().err


def test_many_candidates_in_batches_equal_one_at_a_time(trained, tmp_path, monkeypatch):
    # Requests of different widths split over several batches: each score is
    # the one-candidate path's.
    _, data, checkpoint = trained
    monkeypatch.setattr("din_fast.ctr.predict.CANDIDATES_PER_BATCH", 7)
    items = encode(load_interactions(data)).id_maps.item_ids.to_pylist()
    rng = np.random.default_rng(0)
    requests = [{"history": rng.choice(items, 4).tolist(),
                 "candidates": rng.choice(items, n).tolist()} for n in (1, 5, 3, 2)]
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out_path = tmp_path / "many.csv"
    counts = predict_file(checkpoint, path, output=str(out_path))
    assert counts.scores == 11
    rows = list(csv.DictReader(out_path.open()))
    position = 0
    for request in requests:
        expected = single_candidate_scores(checkpoint, request["history"], request["candidates"])
        got = [float(r["score"]) for r in rows[position:position + len(expected)]]
        assert np.allclose(got, expected, rtol=1e-5)
        position += len(expected)


def test_a_bad_request_stops_predict_before_any_score_is_written(trained, tmp_path, capsys):
    # Requests were checked as scoring reached them: a bad one late in the
    # file came after the header and the earlier requests' scores on stdout
    # (a partial table behind exit status 2).
    _, _, checkpoint = trained
    items = load_checkpoint(checkpoint).id_maps.item_ids.to_pylist()
    requests = tmp_path / "late_mistake.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in [
        {"history": items[:3], "candidates": items[3:5]},
        {"history": items[:2], "candidates": items[5:6], "features": {"hour": 3}}]))
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        f"din-fast: error: {requests}, line 2: \"features\" has 'hour', not one of them; the "
        "model takes no side features"]
