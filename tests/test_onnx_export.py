"""ONNX export (din-fast export --format onnx, din_fast.ctr.onnx_export) and the
serving helpers (din_fast.ctr.serving): ONNX Runtime scores what the checkpoint
scores eagerly, for other batch sizes, history lengths and candidate counts,
rows of length 0 and ids in the padding included; bad inputs are refused."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import din_fast
from din_fast.ctr.checkpoint import load_checkpoint, restored_model
from din_fast.ctr.cli import main
from din_fast.ctr.export import din_example_inputs
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.onnx_export import OPSET, OnnxDIN, export_onnx
from din_fast.ctr.serving import Encoder, OnnxModel

from cli_data import one_torch_thread, write_csv  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPES = ((3, 5, 1), (1, 1, 1), (6, 11, 4), (2, 3, 9))     # (B, T, C)


def awkward_inputs(model, batch, history, candidates):
    """OnnxDIN's inputs with every row length from 0 to T, and ids (not the
    padding 0) after each row's length, which must not reach the score."""
    inputs = list(din_example_inputs(model, batch, history, candidates))
    inputs[2] = torch.arange(batch) % (history + 1)
    beyond = torch.arange(history)[None, :] >= inputs[2][:, None]
    inputs[0] = torch.where(beyond, 1, inputs[0])
    inputs[1] = torch.where(beyond, 1, inputs[1])
    return tuple(inputs)


def assert_scores_as_eager(scorer, model):
    for shape in SHAPES:
        inputs = awkward_inputs(model, *shape)
        with torch.no_grad():
            expected = model(*inputs)
        torch.testing.assert_close(scorer(*inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["din", "base"])
@pytest.mark.parametrize("activation,normalization", [("dice", "softmax"), ("sigmoid", None),
                                                      ("relu", "softmax"), ("prelu", None)])
def test_onnx_din_computes_what_the_model_computes(model, activation, normalization):
    """The traced module (stock ops, every position scored, padding masked)
    against the eager model, running statistics and PReLU slopes not at their
    initial values, both MLP inputs and activations, with and without the
    history cross term."""
    torch.manual_seed(0)
    for mlp_activation, mlp_input in itertools.product(("prelu", "dice"), ("concat", "product")):
        options = dict(attention_activation=activation, attention_normalization=normalization) \
            if model == "din" else {}
        # The history cross term with one of the two MLP inputs: each model
        # runs with and without it.
        eager = din_fast.ctr.models.MODELS[model](30, 5, embed_dim=4, mlp_activation=mlp_activation,
                                               mlp_input=mlp_input, **options,
                                               history_cross=3 if mlp_input == "product" else 0)
        for _ in range(2):               # training steps move the running statistics
            eager(*din_example_inputs(eager, 16, 6, 2)).sum()
        with torch.no_grad():
            for parameter in eager.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        eager.eval()
        assert_scores_as_eager(OnnxDIN(eager), eager)


def test_onnx_command_scores_what_the_checkpoint_scores(tmp_path):
    """Through the real command: a tiny checkpoint (with the history cross
    term), `din-fast export --format onnx`, ONNX Runtime against the eager
    model, and from raw ids through the Encoder (an unknown history item and
    an unknown candidate included); the Encoder keeps the model's --max-len
    of a history by default, as din-fast predict does (it kept all, so a
    longer history scored otherwise than predict scores it)."""
    data = write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=40, seed=6))
    checkpoint, onnx_path = tmp_path / "m.pt", tmp_path / "serving" / "din.onnx"
    onnx_path.parent.mkdir()
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "64",
                 "--embed-dim", "4", "--history-cross", "3", "--history-cross-lr", "0.05",
                 "--max-len", "4", "--no-progress", "--checkpoint", str(checkpoint)]) == 0
    result = subprocess.run([sys.executable, "-m", "din_fast", "export", "--format", "onnx",
                             "--checkpoint", str(checkpoint), "--out", str(onnx_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"din-fast: wrote {onnx_path} (inputs: dense ids) and {tmp_path / 'serving' / 'din.ids.json'}"
        " (raw ids -> dense ids)"]
    import onnx

    proto = onnx.load(str(onnx_path))
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", OPSET)]
    assert [i.name for i in proto.graph.input] == list(din_fast.ctr.onnx_export.INPUT_NAMES)
    saved = load_checkpoint(checkpoint)
    model = restored_model(saved, saved.config)
    scorer = OnnxModel(onnx_path)
    ranges = {spec.name: spec.values for spec in scorer.contract.inputs}
    assert ranges["target_items"] == (0, len(saved.id_maps.item_ids))
    assert ranges["history_categories"] == (0, len(saved.id_maps.category_ids))
    assert_scores_as_eager(scorer, model)

    encoder = Encoder.from_json(tmp_path / "serving" / "din.ids.json")
    raw = saved.id_maps.item_ids.to_pylist()
    batch = encoder.encode([[raw[3], "not-an-item", raw[5]], [], [raw[1]] * 7],
                           [[raw[7], raw[8]], [raw[2]], ["nor-this", raw[0], raw[9]]], max_len=5)
    assert batch.unknown_history_items == 1 and batch.unknown_candidates == [(2, "nor-this")]
    assert batch.lengths.tolist() == [2, 0, 5] and batch.shape == (3, 3)
    assert batch.known.tolist() == [[True, True, False], [True, False, False],
                                    [False, True, True]]
    with torch.no_grad():
        expected = model(*batch.inputs())
    torch.testing.assert_close(scorer(*batch.inputs()), expected, rtol=1e-5, atol=1e-5)

    assert json.loads((tmp_path / "serving" / "din.ids.json").read_text())["max_len"] == 4
    histories, candidates = [raw[10:19], raw[:2]], [[raw[20], raw[21]], [raw[22]]]
    requests, scores = tmp_path / "requests.jsonl", tmp_path / "scores.jsonl"
    requests.write_text("".join(json.dumps({"history": h, "candidates": c}) + "\n"
                                for h, c in zip(histories, candidates)))
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--output", str(scores)]) == 0
    predicted = [json.loads(line)["score"] for line in scores.read_text().splitlines()]
    batch = encoder.encode(histories, candidates)
    assert batch.lengths.tolist() == [4, 2]
    served = torch.sigmoid(scorer(*batch.inputs()).double())
    torch.testing.assert_close(torch.cat([served[0], served[1, :1]]),
                               torch.tensor(predicted, dtype=torch.float64), rtol=0, atol=1e-6)


def test_onnx_model_refuses_bad_inputs(tmp_path):
    torch.manual_seed(0)
    model = din_fast.DIN(20, 4, embed_dim=4, attention_activation="sigmoid").eval()
    scorer = OnnxModel(export_onnx(model, tmp_path / "din.onnx"))
    good = din_example_inputs(model, 2, 3, 2)
    torch.testing.assert_close(scorer(*good), model(*good), rtol=1e-5, atol=1e-5)
    cases = [
        (0, good[0].float(), TypeError, "din.onnx: `history_items` must be torch.int64"),
        (2, good[2] != 0, TypeError, "`lengths` must be torch.int64"),
        (2, torch.tensor([1, 4]), ValueError,
         "lengths[1] = 4 is outside [0, T] with T = 3, history_items.shape[1]"),
        (2, torch.tensor([-1, 0]), ValueError, "lengths[0] = -1 is outside"),
        (3, good[3] + 20, ValueError, f"target_items[0, 0] = {int(good[3][0, 0]) + 20} is "
         "outside [0, 20]"),
        (1, torch.full_like(good[1], -2), ValueError, "history_categories[0, 0] = -2 is outside "
         "[0, 4]"),
        (3, good[3][:, 0], ValueError, "`target_items` must be 2-D [B, C]"),
        (1, good[1][:, :2], ValueError, "`history_categories` must have shape [B, T] with T = 3"),
        (2, good[2][:1], ValueError, "`lengths` must have shape [B] with B = 2"),
    ]
    for index, value, error, message in cases:
        inputs = list(good)
        inputs[index] = value
        with pytest.raises(error) as raised:
            scorer(*inputs)
        assert message in str(raised.value)
    int32 = [t.int().numpy() for t in good]          # int32 converts exactly; numpy arrays too
    torch.testing.assert_close(scorer(*int32), model(*good), rtol=1e-5, atol=1e-5)
    by_name = dict(zip(din_fast.ctr.onnx_export.INPUT_NAMES, good))
    torch.testing.assert_close(scorer(**by_name), model(*good), rtol=1e-5, atol=1e-5)
    empty = (torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
             torch.zeros(2, dtype=torch.long), good[3], good[4])       # T = 0: padded
    torch.testing.assert_close(scorer(*empty), model(*empty), rtol=1e-5, atol=1e-5)


def test_export_refusals(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match="must be a din_fast.DIN or BaseModel"):
        OnnxDIN(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="item_category"):
        Encoder(["a", "b"], ["c"], [0, 1])
    with pytest.raises(ValueError, match="item_category"):
        Encoder(["a"], ["c"], [0, 2])
    encoder = Encoder(["a"], ["c"], [0, 1])
    with pytest.raises(ValueError, match="one entry per request"):
        encoder.encode([["a"]], [])
    with pytest.raises(ValueError, match=r"`candidates\[0\]` must be a non-empty"):
        encoder.encode([["a"]], ["a"])
    monkeypatch.setitem(sys.modules, "onnxscript", None)    # as if not installed
    with pytest.raises(ImportError, match="onnx extra"):
        export_onnx(din_fast.DIN(3, 2, embed_dim=2), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_export_command_onnx_errors_are_one_line(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_bytes(b"\x00garbage")
    base = ["--format", "onnx", "--checkpoint", str(not_a_checkpoint)]
    cases = [(base + ["--out", str(tmp_path / "a.pt2")], "must end in .onnx"),
             (base + ["--out", str(tmp_path / "a.onnx")], "not a readable torch checkpoint"),
             (base + ["--out", str(tmp_path / "a.onnx"), "--device", "cpu"],
              "--device cpu: applies to the .pt2 package only"),
             (base + ["--out", str(tmp_path / "a.onnx"), "--backend", "torch"],
              "--backend torch: applies to the .pt2 package only"),
             (["--format", "onnx", "--checkpoint", str(not_a_checkpoint), "--out",
               str(tmp_path / "x.pt" / "a.onnx")], "--out"),
             # The id maps beside the model would overwrite the checkpoint.
             (["--format", "onnx", "--checkpoint", str(tmp_path / "x.ids.json"), "--out",
               str(tmp_path / "x.onnx")], "an input of this command (--checkpoint)")]
    for arguments, message in cases:
        assert main(["export", *arguments]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("din-fast: error:"), lines
        assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_exports_of_one_stem_never_pair_a_model_with_another_checkpoints_ids(tmp_path, capsys,
                                                                           monkeypatch):
    """din.pt2 and din.onnx share din.ids.json: an export that would replace
    the other format's id maps with another checkpoint's is refused (one
    line, nothing written); the same checkpoint's, or a re-export of the same
    format alone, is written. The model records its id maps' fingerprint and
    Encoder.from_json refuses a JSON of another checkpoint for it."""
    checkpoints = []
    for seed in (6, 7):
        data = write_csv(tmp_path / f"data{seed}.csv",
                         synthetic_interactions(num_users=30, seed=seed))
        checkpoints.append(tmp_path / f"m{seed}.pt")
        assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "64",
                     "--embed-dim", "4", "--no-progress", "--checkpoint",
                     str(checkpoints[-1])]) == 0
    first, second = checkpoints
    fingerprints = [load_checkpoint(c).id_maps.fingerprint() for c in checkpoints]
    serving = tmp_path / "serving"
    serving.mkdir()
    onnx_path, package, ids_path = (serving / name for name in ("din.onnx", "din.pt2",
                                                                "din.ids.json"))

    def export(checkpoint, out, *options):
        status = main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *options])
        return status, capsys.readouterr().err.strip().splitlines()

    assert export(first, onnx_path, "--format", "onnx")[0] == 0
    first_ids = ids_path.read_bytes()
    first_model = OnnxModel(onnx_path)
    assert first_model.ids_fingerprint == fingerprints[0]
    assert Encoder.from_json(ids_path, model=first_model).fingerprint == fingerprints[0]
    # Another checkpoint's package beside it: refused before anything is compiled.
    status, error = export(second, package)
    assert status == 2 and len(error) == 1, error
    assert error[0].startswith(f"din-fast: error: --out {package}: {ids_path}, the id maps "
                               f"{onnx_path} is served with, holds other id maps"), error
    assert f"give --out another name ({serving / 'din-2.pt2'} writes " \
           f"{serving / 'din-2.ids.json'})" in error[0], error
    assert sorted(p.name for p in serving.iterdir()) == ["din.ids.json", "din.onnx"]
    assert ids_path.read_bytes() == first_ids
    # Re-exporting the ONNX model while a package of that stem exists: the
    # same checkpoint's id maps are written again, another's refused. (The
    # id maps are what is tested: the model itself is a stand-in.)
    monkeypatch.setattr(din_fast.ctr.onnx_export, "export_onnx",
                        lambda model, path, metadata: Path(path).write_bytes(b"a model"))
    package.write_bytes(b"stands for the first checkpoint's package")
    assert export(first, onnx_path, "--format", "onnx")[0] == 0
    status, error = export(second, onnx_path, "--format", "onnx")
    assert status == 2 and len(error) == 1 and str(package) in error[0], error
    assert ids_path.read_bytes() == first_ids
    # Alone, the ONNX model is replaced with the other checkpoint's, id maps and all.
    package.unlink()
    assert export(second, onnx_path, "--format", "onnx")[0] == 0
    assert json.loads(ids_path.read_text())["fingerprint"] == fingerprints[1]
    with pytest.raises(ValueError, match=f"fingerprint {fingerprints[1][:12]}, but din.onnx "
                       f"was exported with id maps of fingerprint {fingerprints[0][:12]}"):
        Encoder.from_json(ids_path, model=first_model)
    with pytest.raises(TypeError, match="must be a loaded exported model"):
        Encoder.from_json(ids_path, model=str(onnx_path))
