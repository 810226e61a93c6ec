"""din-fast tune (din_fast.ctr.tune) and train --config, through the real
command on tiny data: a couple of one- or two-epoch trials each."""

import json
import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest

optuna = pytest.importorskip("optuna")   # the tune extra; .ci/run installs it

from din_fast.ctr import training, tune
from din_fast.ctr.checkpoint import load_checkpoint
from din_fast.ctr.cli import main
from din_fast.ctr.config import TrainConfig
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.tune import STUDY_NAME, median_pruner, trial_params

from cli_data import one_torch_thread, unwritable_directory, write_csv, write_labeled_log  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--epochs", "1", "--batch-size", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("tune") / "tiny.csv",
                     synthetic_interactions(num_users=40, seed=5))


def trials_of(study) -> list:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{study}").trials


def test_tune_writes_what_train_takes_and_resumes(data, tmp_path, monkeypatch, capsys):
    scored = []
    evaluate = training.evaluate
    monkeypatch.setattr(training, "evaluate",
                        lambda *args: scored.append(args[-1]) or evaluate(*args))
    study, out = tmp_path / "study.db", tmp_path / "runs" / "out"  # parents created too
    command = ["tune", "--data", str(data), "--study", str(study), "--out", str(out), *TINY]
    assert main([*command, "--trials", "2"]) == 0
    assert set(scored) == {"validation"}            # the test split is never looked at
    printed = capsys.readouterr().out
    assert "trial 0: validation GAUC" in printed and "wrote" in printed
    trials = trials_of(study)
    assert trials[0].params == trial_params(TrainConfig())     # the defaults first
    best = max(trials, key=lambda t: t.value)
    # The best trial's config is a file train --config takes, and gives its run.
    config_file = out / "best_config.json"
    settings = json.loads(config_file.read_text())
    assert settings["lr"] == best.params["lr"] and settings["epochs"] == 1
    assert load_checkpoint(out / "best.pt").config == TrainConfig(**settings)
    metrics = tmp_path / "train.json"
    assert main(["train", "--config", str(config_file), "--threads", "1", "--no-progress",
                 "--metrics-out", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["validation_gauc"] == pytest.approx(best.value)
    # Options given on the command line override the file.
    assert main(["train", "--config", str(config_file), "--threads", "1", "--no-progress",
                 "--lr", "0.02", "--metrics-out", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["config"]["lr"] == 0.02
    capsys.readouterr()
    # The same command resumes the study, up to --trials in all ...
    assert main([*command, "--trials", "3"]) == 0
    assert "2 trial(s) finished, 1 to run" in capsys.readouterr().out
    assert len(trials_of(study)) == 3 and len({str(t.params) for t in trials_of(study)}) == 3
    # ... within the time budget (one trial starts within 1 ms, none after) ...
    assert main([*command, "--trials", "9", "--time-budget", "0.001"]) == 0
    assert len(trials_of(study)) == 4
    # ... into another --out, created for the best trial trained again ...
    elsewhere = tmp_path / "elsewhere" / "out"
    assert main(["tune", "--data", str(data), "--study", str(study), "--out", str(elsewhere),
                 *TINY, "--trials", "4"]) == 0
    assert "0 to run" in capsys.readouterr().out
    assert load_checkpoint(elsewhere / "best.pt").config == \
        TrainConfig(**json.loads((elsewhere / "best_config.json").read_text()))
    # ... and with the settings it was started with.
    assert main([*command[:-2], "--batch-size", "32", "--trials", "4"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("din-fast: error: --study") and "batch-size 64" in error


class PruneTrialOne(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return trial.number == 1


def test_a_pruned_trial_stops_after_its_epoch(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **_: PruneTrialOne())
    assert main(["tune", "--data", str(data), "--study", str(tmp_path / "s.db"), "--out",
                 str(tmp_path / "out"), "--trials", "2", *TINY, "--epochs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "trial 1: pruned after epoch 1" in printed and "1 pruned" in printed
    pruned = trials_of(tmp_path / "s.db")[1]
    assert pruned.state == optuna.trial.TrialState.PRUNED and list(pruned.intermediate_values) \
        == [1]


def test_the_pruner_spares_every_trials_first_epoch():
    """Epochs count from 1: the median pruner stops a trial below the
    earlier ones' median from its second epoch on, never after its first."""
    study = optuna.create_study(direction="maximize", pruner=median_pruner(optuna))
    for value in (0.7, 0.8, 0.9):                  # the startup trials, all above
        trial = study.ask()
        trial.report(value, 1), trial.report(value, 2)
        study.tell(trial, value)
    low = study.ask()
    low.report(0.1, 1)
    assert not low.should_prune()
    low.report(0.1, 2)
    assert low.should_prune()


def test_a_labeled_log_is_tuned(tmp_path, capsys):
    log = write_labeled_log(tmp_path / "log.csv")
    # The searched options given (no L2 among them) are the first trial's;
    # with --linear the linear part's rate is searched too.
    assert main(["tune", "--data", str(log), "--label-column", "label", "--features",
                 "genres,hour", "--numeric-features", "price", "--model", "base",
                 "--linear", "--linear-lr", "0.01", "--l2", "0", "--lr", "5e-5",
                 "--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "out"),
                 "--trials", "2", *TINY]) == 0
    settings = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert settings["features"] == ["genres", "hour"] and settings["model"] == "base"
    printed = capsys.readouterr().out
    assert "attention-hidden" not in printed                     # BaseModel has no attention
    assert "--l2 0 " in printed and "--linear-lr 0.01" in printed
    first, second = trials_of(tmp_path / "s.db")
    assert first.params == {"lr": 5e-5, "l2": 0.0, "embed_dim": 32, "mlp_hidden": "200,80",
                            "mlp_activation": "dice", "min_count": 1, "linear_lr": 0.01}
    assert set(second.params) == set(first.params)


def bad_tunes(tmp_path, data) -> list:
    not_a_study = tmp_path / "notes.db"
    not_a_study.write_text("not SQLite\n")
    # SQLite databases tune did not write: Optuna would add its tables (a study) to them.
    with closing(sqlite3.connect(tmp_path / "mine.sqlite")) as mine:
        mine.execute("CREATE TABLE notes (text)")
        mine.commit()
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'theirs.db'}", study_name="theirs")
    (tmp_path / "file").write_text("")
    common = ["--data", str(data), "--trials", "1", *TINY]
    return [
        (["--study", str(data), "--out", str(tmp_path / "o")], "an input of this command"),
        (["--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "file")], "is a file"),
        (["--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "file" / "o")],
         "cannot be created as a directory"),
        (["--study", str(tmp_path / "s.db"), "--out",
          str(unwritable_directory(tmp_path) / "new" / "o")], "not writable"),
        (["--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "s.db")],
         "--out " + str(tmp_path / "s.db") + ": would be created as a directory where --study"),
        (["--study", str(not_a_study), "--out", str(tmp_path / "o")],
         "not an Optuna study database"),
        (["--study", str(tmp_path / "mine.sqlite"), "--out", str(tmp_path / "o")],
         "not an Optuna study database din-fast tune wrote (no Optuna tables)"),
        (["--study", str(tmp_path / "theirs.db"), "--out", str(tmp_path / "o")],
         "not an Optuna study database din-fast tune wrote (no study named 'din-fast')"),
        (["--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "o"), "--lr", "0.1"],
         "--lr 0.1: outside what tune searches; the first trial's lr must be from 3e-05 to "
         "0.01"),
        (["--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "o"), "--l2", "0.5"],
         "--l2 0.5: outside what tune searches; the first trial's l2 must be one of 0.0, "),
        (["--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "o"), "--trials", "0"],
         "--trials: must be a positive integer"),
    ], common


def exit_status(argv) -> int:
    """main's return value, or argparse's exit status."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_tune_errors_are_one_line(data, tmp_path, capsys):
    cases, common = bad_tunes(tmp_path, data)
    databases = {name: (tmp_path / name).read_bytes() for name in ("mine.sqlite", "theirs.db")}
    for arguments, expected in cases:
        assert exit_status(["tune", *common, *arguments]) == 2, arguments
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("din-fast: error:"), error
        assert expected in error[0], error
    # --out is created by the first best trial: a refused tune leaves no directory.
    assert not (tmp_path / "o").exists()
    assert databases == {name: (tmp_path / name).read_bytes() for name in databases}


def test_train_config_file_errors_are_one_line(tmp_path, capsys):
    cases = {"{not json": "not JSON text", "[1, 2]": "holds a JSON list",
             '{"learning_rate": 0.1}': "'learning_rate' is not a setting of din-fast train",
             '{"lr": -1}': "`lr` must be a finite number > 0; got -1",
             '{"mlp_hidden": [0]}': "`mlp_hidden` must be a tuple of positive integers"}
    for text, expected in cases.items():
        path = tmp_path / "config.json"
        path.write_text(text)
        assert main(["train", "--config", str(path), "--threads", "1"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and str(path) in error[0] and expected in error[0], error


def test_without_optuna_the_command_says_how_to_install_it(data, tmp_path):
    script = ("import sys; sys.modules['optuna'] = None; from din_fast.ctr.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "tune", "--data", str(data),
                             "--study", str(tmp_path / "s.db"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "din-fast: error: tune needs Optuna, which is not installed here: pip install "
        "'din-fast[tune]' (or pip install optuna)"]
    assert not (tmp_path / "s.db").exists()


def test_ctrl_c_in_the_first_trial_says_nothing_was_written(data, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(tune, "fit", interrupted)
    study, out = tmp_path / "s.db", tmp_path / "out"
    assert main(["tune", "--data", str(data), "--study", str(study), "--out", str(out),
                 "--trials", "1", *TINY]) == 130
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith(
        f"no trial of this run was the best so far, nothing written to {out}"), error
    assert not out.exists()
