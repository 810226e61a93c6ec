"""Training, checkpoints and the din-fast command (din_fast.ctr.training, din_fast.ctr.cli)."""

import json
import subprocess
import sys

import pytest
import torch

from din_fast.ctr.cli import main
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.training import TrainConfig, train

from cli_data import one_torch_thread, write_csv  # noqa: F401 (a fixture)

METRICS = ("test_auc", "test_gauc", "test_logloss")
VALIDATION_METRICS = ("validation_auc", "validation_gauc", "validation_logloss")


@pytest.fixture
def tiny_csv(tmp_path):
    return write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=60, seed=4))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_din_beats_base_model_on_synthetic_data(tmp_path):
    # Softmax attention picks the history items of the candidate's category;
    # sum pooling blurs them with the user's other interests. Seeded, one
    # epoch without the L2 penalty (which slows both down); the margin asked
    # for is 0.05 AUC.
    path = write_csv(tmp_path / "synthetic.csv", synthetic_interactions(num_users=600, seed=0))
    auc = {model: train(TrainConfig(data=str(path), model=model, epochs=1, batch_size=64,
                                    lr=5e-3, l2=0.0, embed_dim=8, seed=0),
                        progress=False, log=lambda *_: None)["test_auc"]
           for model in ("din", "base")}
    assert auc["din"] > auc["base"] + 0.05, auc


@pytest.mark.parametrize("model", ["din", "base"])
def test_checkpoint_round_trip_reproduces_metrics(tmp_path, tiny_csv, model, capsys):
    checkpoint, trained, evaluated = (tmp_path / n for n in ("m.pt", "train.json", "eval.json"))
    assert main(["train", "--data", str(tiny_csv), "--model", model, "--epochs", "1",
                 "--batch-size", "64", "--no-progress", "--checkpoint", str(checkpoint),
                 "--metrics-out", str(trained)]) == 0
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_csv),
                 "--metrics-out", str(evaluated)]) == 0
    assert "test_gauc" in capsys.readouterr().out
    trained, evaluated = (json.loads(p.read_text()) for p in (trained, evaluated))
    for key in METRICS:
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_csv),
                 "--backend", "reference", "--metrics-out", str(tmp_path / "ref.json")]) == 0
    on_reference = json.loads((tmp_path / "ref.json").read_text())
    for key in METRICS:
        assert on_reference[key] == pytest.approx(trained[key], abs=1e-5), key
    # The backend that ran ("auto" resolves to torch on CPU tensors), not the one asked for.
    ran = {"din": ("torch", "torch", "reference"), "base": (None, None, None)}[model]
    assert (trained["backend"], evaluated["backend"], on_reference["backend"]) == ran
    assert trained["config"]["backend"] == "auto"


def test_ema_by_the_din_protocol_validates_tests_and_saves_the_average(tmp_path, tiny_csv):
    """train --ema on behaviours: the checkpoint holds the best epoch's
    weight average (evaluate gives train's test metrics), not the weights
    trained, which the run state keeps beside the average; a run state
    that lost its average is refused."""
    from din_fast.ctr.checkpoint import load_checkpoint
    from din_fast.ctr.errors import CheckpointError

    checkpoint, trained, evaluated = (tmp_path / n for n in ("m.pt", "train.json", "eval.json"))
    assert main(["train", "--data", str(tiny_csv), "--epochs", "1", "--batch-size", "64",
                 "--embed-dim", "4", "--ema", "0.8", "--no-progress", "--checkpoint",
                 str(checkpoint), "--metrics-out", str(trained)]) == 0
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_csv),
                 "--metrics-out", str(evaluated)]) == 0
    trained, evaluated = (json.loads(p.read_text()) for p in (trained, evaluated))
    assert trained["config"]["ema"] == 0.8
    for key in METRICS:
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key
    saved, run_state = load_checkpoint(checkpoint), tmp_path / "m.run.pt"
    run = load_checkpoint(run_state)
    assert all(torch.equal(saved.state_dict[k], run.run.best_weights[k]) for k in run.state_dict)
    average = run.run.learner["average"]
    assert average["steps"] > 0 and not all(
        torch.equal(average["weights"][k], run.state_dict[k]) for k in run.state_dict)
    state = torch.load(run_state, weights_only=True)
    del state["run"]["learner"]["average"]
    torch.save(state, run_state)
    with pytest.raises(CheckpointError, match="the weight average"):
        load_checkpoint(run_state)


def test_serving_commands_refuse_a_run_state(tmp_path, tiny_csv, capsys):
    """The run state beside a checkpoint holds the latest epoch's weights
    (the trained ones, not --ema's average): evaluate, predict and export
    scored it as if it were the best epoch's model (test AUC 0.50 against
    the checkpoint's 0.65 after early stopping's extra epochs); each refuses
    it in one line naming the checkpoint to give."""
    checkpoint, run_state = tmp_path / "m.pt", tmp_path / "m.run.pt"
    assert main(["train", "--data", str(tiny_csv), "--epochs", "1", "--batch-size", "64",
                 "--embed-dim", "4", "--no-progress", "--checkpoint", str(checkpoint)]) == 0
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"history": ["1"], "candidates": ["2"]}\n')
    capsys.readouterr()
    for command in (["evaluate", "--data", str(tiny_csv)], ["predict", "--requests", str(requests)],
                    ["export", "--out", str(tmp_path / "m.onnx"), "--format", "onnx"]):
        assert main([command[0], "--checkpoint", str(run_state), *command[1:]]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.splitlines() == [
            f"din-fast: error: --checkpoint {run_state}: a run state (the model after epoch 1, "
            "what train --resume continues from), not the best epoch's model; give the "
            f"checkpoint train --checkpoint wrote beside it ({checkpoint})"], command[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.run.pt", "requests.jsonl",
                                                          "tiny.csv"]


def test_console_command_writes_metrics_json(tmp_path, tiny_csv):
    out = tmp_path / "metrics.json"
    result = subprocess.run([sys.executable, "-m", "din_fast", "train", "--data", str(tiny_csv),
                             "--epochs", "2", "--no-progress", "--metrics-out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "epoch 2: validation AUC" in result.stdout
    metrics = json.loads(out.read_text())
    for key in METRICS + VALIDATION_METRICS + ("train_seconds", "samples_per_second"):
        assert isinstance(metrics[key], float)
    assert (metrics["model"], metrics["backend"]) == ("din", "torch")
    assert 0.0 <= metrics["test_auc"] <= 1.0 and len(metrics["epochs"]) == 2


def test_bad_data_file_exits_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,category\n1,2,3\n")
    assert main(["train", "--data", str(bad), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert str(bad) in error and "line 1" in error and "timestamp" in error


def test_evaluate_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    assert "not a din_fast checkpoint" in capsys.readouterr().err


def test_data_without_training_samples_is_rejected(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("user,item,category,timestamp\n1,1,1,0\n1,2,1,1\n1,4,1,2\n2,3,2,0\n")
    with pytest.raises(ValueError, match="at least 4 behaviours"):
        train(TrainConfig(data=str(path)), progress=False, log=lambda *_: None)


def test_batch_of_one_with_dice_is_refused(capsys):
    """Dice's batch normalization needs two rows: said before any data is read."""
    assert main(["train", "--batch-size", "1", "--no-progress"]) == 2
    assert "`batch_size` must be at least 2 with mlp_activation 'dice'" in capsys.readouterr().err
    assert TrainConfig(batch_size=1, mlp_activation="prelu").batch_size == 1

