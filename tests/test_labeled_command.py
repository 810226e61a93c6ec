"""din-fast on labeled logs: train, evaluate, predict and export with side
features; resumed runs; checkpoints that refuse foreign data; the options'
defaults; bad input through the real command."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from din_fast.ctr.checkpoint import load_checkpoint
from din_fast.ctr.cli import available_cores, build_parser, main
from din_fast.ctr.errors import CheckpointError
from din_fast.ctr.training import LocalLearner, TrainConfig

from cli_data import (LABELED_HEADER, Case, labeled_rows,  # noqa: F401 (a fixture)
                      one_torch_thread, run, write_labeled_log)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LABELED = ["--label-column", "label", "--features", "genres,hour", "--numeric-features", "price",
           "--embed-dim", "4", "--batch-size", "32", "--no-progress"]
TIMINGS = ("epoch_seconds", "samples_per_second", "train_seconds")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return write_labeled_log(tmp_path_factory.mktemp("labeled") / "log.csv")


@pytest.fixture(scope="module")
def trained(log):
    """A DIN with side features and its linear part, trained 2 epochs, and its metrics."""
    directory = log.parent
    checkpoint, metrics = directory / "din.pt", directory / "din.json"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--data", str(log), *LABELED, "--linear", "--epochs", "2",
                     "--checkpoint", str(checkpoint), "--metrics-out", str(metrics)]) == 0
    finally:
        torch.set_num_threads(threads)
    return checkpoint, json.loads(metrics.read_text())


def without_timings(metrics: dict) -> dict:
    strip = lambda record: {k: v for k, v in record.items() if k not in TIMINGS}
    return {**strip(metrics), "epochs": [strip(e) for e in metrics["epochs"]]}


def test_train_and_evaluate_a_labeled_log(log, trained, tmp_path, capsys):
    checkpoint, metrics = trained
    # 600 rows: the latest 60 test, the 60 before them validate; no negative sampled.
    assert (metrics["train_samples"], metrics["validation_samples"],
            metrics["test_samples"]) == (480, 60, 60)
    for key in ("test_auc", "test_gauc", "test_logloss", "validation_gauc"):
        assert 0 <= metrics[key] <= 1 or key == "test_logloss", key
    saved = load_checkpoint(checkpoint)
    assert metrics["data_fingerprint"] == saved.id_maps.fingerprint()
    assert saved.config.features == ("genres", "hour") and saved.id_maps.unknown
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(log),
                 "--metrics-out", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for key in ("test_auc", "test_gauc", "test_logloss", "test_samples"):
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-9), key


def test_predict_with_side_features(log, trained, tmp_path, capsys):
    checkpoint, _ = trained
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"user": "u3", "candidates": ["i1", "i2"],
         "features": {"genres": ["g1|g2", ""], "hour": 7, "price": 9.5}},
        {"history": ["i1", "never"], "candidates": ["i4", "unseen"], "request": "r",
         "features": {"genres": "g0", "hour": ["1", "99"], "price": [8, 12]}}]) + "\n")
    out = tmp_path / "scores.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests", str(requests),
                 "--data", str(log), "--output", str(out)]) == 0
    note = capsys.readouterr().err
    # Unknown ids take the reserved id and are scored (and counted).
    assert "1 unknown candidate(s), 1 unknown history item(s) and 1 unknown feature value(s)" \
        in note
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("1", "i1", ""), ("1", "i2", ""),
                                                  ("r", "i4", ""), ("r", "unseen",
                                                                    "unknown item")]
    assert all(0 < float(r[2]) < 1 for r in rows)
    # A request without a feature the model takes: one error line naming it.
    requests.write_text(json.dumps({"history": [], "candidates": ["i1"],
                                    "features": {"genres": "g1", "price": 1}}) + "\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--requests",
                 str(requests)]) == 2
    assert f"{requests}, line 1: \"features\" lacks 'hour'" in capsys.readouterr().err


@pytest.mark.parametrize("averaging", [[], ["--ema", "0.9"]], ids=["trained", "ema"])
def test_resume_gives_the_uninterrupted_run(log, tmp_path, monkeypatch, averaging):
    """Three epochs at once, and the same run stopped by Ctrl-C in its second
    epoch and resumed from the run state of its first: the same records,
    metrics and weights (with --ema, the run state carries the average)."""
    common = ["train", "--data", str(log), *LABELED, "--epochs", "3", "--patience", "3",
              "--lr-decay", "0.9", *averaging]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for directory in (straight, resumed):
        directory.mkdir()
    assert main([*common, "--checkpoint", str(straight / "m.pt"), "--metrics-out",
                 str(straight / "m.json")]) == 0
    calls = []
    train_epoch = LocalLearner.train_epoch

    def interrupted_in_epoch_2(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train_epoch(self, *args)
    monkeypatch.setattr(LocalLearner, "train_epoch", interrupted_in_epoch_2)
    assert main([*common, "--checkpoint", str(resumed / "m.pt")]) == 130
    monkeypatch.setattr(LocalLearner, "train_epoch", train_epoch)
    run_state = resumed / "m.run.pt"
    assert load_checkpoint(run_state).run.epoch == 1
    assert main([*common, "--checkpoint", str(resumed / "m.pt"), "--resume", str(run_state),
                 "--metrics-out", str(resumed / "m.json"), "--log-dir", str(resumed)]) == 0
    results = [json.loads((d / "m.json").read_text()) for d in (straight, resumed)]
    assert without_timings(results[0]) == without_timings(results[1])
    weights = [load_checkpoint(d / "m.pt").state_dict for d in (straight, resumed)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # The CSV log holds every epoch, those before the interruption included.
    lines = (resumed / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,validation_auc") and len(lines) == 4
    if averaging:
        # The checkpoint holds the best epoch's average, apart from the
        # weights trained, and scores the test rows as training did.
        run = load_checkpoint(straight / "m.run.pt")
        assert set(run.run.learner["average"]) == {"weights", "steps"}
        assert all(torch.equal(weights[0][k], run.run.best_weights[k]) for k in weights[0])
        assert not all(torch.equal(run.run.learner["average"]["weights"][k], run.state_dict[k])
                       for k in run.state_dict)
        assert main(["evaluate", "--checkpoint", str(straight / "m.pt"), "--data", str(log),
                     "--metrics-out", str(tmp_path / "e.json")]) == 0
        evaluated = json.loads((tmp_path / "e.json").read_text())
        for key in ("test_auc", "test_gauc", "test_logloss"):
            assert evaluated[key] == pytest.approx(results[0][key], abs=1e-9), key


def test_a_run_state_of_the_previous_format_resumes(log, tmp_path):
    """A labeled run with rare ids, interrupted under format 5 (whose maps
    listed no rare ids of a log, and whose fingerprint covered none),
    resumes on this version's maps, which list them."""
    common = ["train", "--data", str(log), *LABELED, "--min-count", "15", "--epochs", "2",
              "--checkpoint", str(tmp_path / "m.pt")]
    assert main([*common[:-4], "--epochs", "1", *common[-2:]]) == 0
    run_state = tmp_path / "m.run.pt"
    maps = load_checkpoint(run_state).id_maps
    assert len(maps.rare_items) > 0
    state = torch.load(run_state, weights_only=True)
    older = {k: v for k, v in state["id_maps"].items() if not k.startswith("rare_")}
    older["fingerprint"] = replace(maps, rare_items=None, rare_item_category=None,
                                   rare_categories=None, rare_features={}).fingerprint()
    # ... and, written before --ema, has no `ema` in its config.
    config = {k: v for k, v in state["config"].items() if k != "ema"}
    torch.save(dict(state, format="din_fast.checkpoint/5", id_maps=older, config=config),
               run_state)
    assert main([*common, "--resume", str(run_state)]) == 0
    assert load_checkpoint(run_state).run.epoch == 2


def test_resume_refuses_another_run(log, trained, tmp_path, capsys):
    checkpoint, _ = trained
    run_state = checkpoint.with_name("din.run.pt")
    common = ["train", "--data", str(log), *LABELED, "--linear", "--epochs", "3"]
    cases = [([*common, "--resume", str(checkpoint)], "holds no run state"),
             ([*common, "--lr", "0.01", "--resume", str(run_state)],
              "started with --lr 0.0003, this command gives --lr 0.01"),
             ([*common[:-3], "--epochs", "3", "--resume", str(run_state)], "--linear"),
             ([*common, "--min-count", "1", "--test-fraction", "0.2", "--resume",
               str(run_state)], "--test-fraction"),
             ([*common, "--ema", "0.99", "--resume", str(run_state)],
              "started with --ema none, this command gives --ema 0.99")]
    other = write_labeled_log(tmp_path / "other.csv", labeled_rows(seed=1))
    cases.append(([*common[:2], str(other), *common[3:], "--resume", str(run_state)],
                  "the data gives other id maps than the run's"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err.splitlines()
        assert len(error) == 1 and expected in error[0], (expected, error)


def test_checkpoints_refuse_foreign_data(trained, tmp_path, capsys):
    checkpoint, _ = trained
    # Another source: the same columns, ids of the same kind, other items
    # (most unknown) or other categories for them.
    renamed = [(u, i.replace("i", "j") if n % 2 else i, *rest)
               for n, (u, i, *rest) in enumerate(labeled_rows())]
    recategorized = [(u, i, "c9" if i in ("i1", "i2") else c, *rest)
                     for u, i, c, *rest in labeled_rows()]
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"user": "u1", "candidates": ["i1"], "features": {
        "genres": "g1", "hour": "1", "price": "1"}}) + "\n")
    for rows, expected in ((renamed, "hold an item the checkpoint has never seen"),
                           (recategorized, "have another category in the data")):
        data = write_labeled_log(tmp_path / "foreign.csv", rows)
        for command in (["evaluate"], ["predict", "--requests", str(requests)]):
            assert main([*command, "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
            error = capsys.readouterr().err.splitlines()
            assert len(error) == 1 and expected in error[0] and \
                f"does not fit checkpoint {checkpoint}" in error[0], error
    # Within the tolerance it is scored.
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data",
                 str(write_labeled_log(tmp_path / "foreign.csv", renamed)),
                 "--max-unknown", "0.6"]) == 0


def test_a_log_without_a_column_of_the_checkpoint_names_the_checkpoint(trained, tmp_path,
                                                                      capsys):
    """evaluate and predict read the columns the checkpoint was trained with
    (they take no --features): a log that lacks one is refused in one line
    naming the data file, the checkpoint and its columns, no option; nor is
    an option named for an id column holding the features' separator."""
    checkpoint, _ = trained
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"user": "u1", "candidates": ["i1"], "features": {
        "genres": "g1", "hour": "1", "price": "1"}}) + "\n")
    kept = [n for n, name in enumerate(LABELED_HEADER) if name != "hour"]
    csv = write_labeled_log(tmp_path / "no_hour.csv", [[r[n] for n in kept]
                                                        for r in labeled_rows(60)],
                            [LABELED_HEADER[n] for n in kept])
    rows = labeled_rows(60)
    parquet = tmp_path / "no_price.parquet"
    pq.write_table(pa.table({name: [str(r[n]) for r in rows] for n, name
                             in enumerate(LABELED_HEADER) if name != "price"}), parquet)
    separator = write_labeled_log(tmp_path / "separator.csv",
                                  [rows[0], (rows[1][0], "i1|i2") + rows[1][2:]] + rows[2:])
    trained_with = (f"checkpoint {checkpoint} was trained with the columns label, genres, hour, "
                    "price, which --data must hold")
    for data, expected in ((csv, f"{csv}, line 1: the header has no column 'hour' (a side "
                                 f"feature: {trained_with})"),
                           (parquet, f"{parquet}: no column 'price' (a numeric feature: "
                                     f"{trained_with})"),
                           (separator, "item id 'i1|i2' holds '|', the separator of "
                                       "multi-valued features; expected one id")):
        for command in (["evaluate"], ["predict", "--requests", str(requests)]):
            assert main([*command, "--checkpoint", str(checkpoint), "--data", str(data)]) == 2
            error = capsys.readouterr().err.strip().splitlines()
            assert len(error) == 1 and error[0].startswith("din-fast: error: "), error
            assert expected in error[0] and "--features" not in error[0], error


def log_with_newcomers(seed: int = 0, users: str = "u", items: str = "i") -> list:
    """labeled_rows with a ``user_id`` feature (the user's id, as the MovieLens
    benchmark takes it), whose last fifth (the validation and test rows of
    the default split) holds only users and items the earlier rows never saw:
    the training log itself is 20% new ids, above the 10% --max-unknown."""
    rows = labeled_rows(400, num_users=15, num_items=20, seed=seed)
    rows = [(u if r < 320 else u.replace("u", "new-u"), i if r < 320 else i.replace("i", "new-i"),
             *rest) for r, (u, i, *rest) in enumerate(rows)]
    return [(u.replace("u", users, 1), i.replace("i", items, 1), *rest, u.replace("u", users, 1))
            for u, i, *rest in rows]


NEWCOMERS_HEADER = LABELED_HEADER + ("user_id",)


def test_evaluate_and_predict_take_the_training_log_whatever_its_time_split_brings(tmp_path,
                                                                                  capsys):
    """Issue 21: a checkpoint never refuses its own data. Its maps list every
    id of the training rows (the rare ones of --min-count 15 too) and only
    those rows count for unknown ids; the later rows' new users and items do
    not. evaluate then reports train's test metrics; another log is refused."""
    data = write_labeled_log(tmp_path / "log.csv", log_with_newcomers(), NEWCOMERS_HEADER)
    checkpoint, metrics = tmp_path / "din.pt", tmp_path / "train.json"
    assert main(["train", "--data", str(data), "--label-column", "label", "--features",
                 "genres,hour,user_id", "--min-count", "15", "--embed-dim", "4",
                 "--batch-size", "32", "--epochs", "1", "--no-progress", "--checkpoint",
                 str(checkpoint), "--metrics-out", str(metrics)]) == 0
    trained = json.loads(metrics.read_text())
    maps = load_checkpoint(checkpoint).id_maps
    assert len(maps.rare_items) and len(maps.rare_features["hour"])    # rare ids are listed
    result = run(Case(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data)], ()))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout)
    for key in ("test_auc", "test_gauc", "test_logloss", "test_samples"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-9), key
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"user": "new-u1", "candidates": ["i1", "new-i2"],
                                    "features": {"genres": "g1", "hour": 3,
                                                 "user_id": "new-u1"}}) + "\n")
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(data),
                 "--requests", str(requests)]) == 0
    # Another log with the same columns and other ids is still refused, in one line.
    foreign = write_labeled_log(tmp_path / "foreign.csv",
                                log_with_newcomers(seed=1, users="x", items="y"),
                                NEWCOMERS_HEADER)
    result = run(Case(["evaluate", "--checkpoint", str(checkpoint), "--data", str(foreign)], ()))
    error = result.stderr.splitlines()
    assert result.returncode == 2 and len(error) == 1, result.stderr
    assert error[0].startswith(f"din-fast: error: {foreign} does not fit checkpoint "
                               f"{checkpoint}: ") and "training rows" in error[0], error
    # A checkpoint of the previous format, which kept the rare ids of a log
    # without listing them, loads, and takes its own data as this one does:
    # the ids its training rows hold fewer than --min-count times are its rare
    # ones, not unknown (38.7% of the training rows hold such an item here).
    state = torch.load(checkpoint, weights_only=True)
    older = {k: v for k, v in state["id_maps"].items() if not k.startswith("rare_")}
    older["fingerprint"] = replace(maps, rare_items=None, rare_item_category=None,
                                   rare_categories=None, rare_features={}).fingerprint()
    old = tmp_path / "old.pt"
    torch.save(dict(state, format="din_fast.checkpoint/5", id_maps=older), old)
    loaded = load_checkpoint(old).id_maps
    assert loaded.rare_items is None and loaded.rare_categories is None
    assert loaded.rare_features == {} and loaded.item_ids.equals(maps.item_ids)
    assert main(["evaluate", "--checkpoint", str(old), "--data", str(data), "--metrics-out",
                 str(tmp_path / "old.json")]) == 0
    assert json.loads((tmp_path / "old.json").read_text()) == evaluated
    assert main(["predict", "--checkpoint", str(old), "--data", str(data), "--requests",
                 str(requests)]) == 0
    capsys.readouterr()
    # ... and still refuses the other log, whose frequent ids it never saw.
    assert main(["evaluate", "--checkpoint", str(old), "--data", str(foreign)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"does not fit checkpoint {old}: " in error[0], error


def test_a_tampered_id_map_is_refused(trained, tmp_path):
    checkpoint, _ = trained
    state = torch.load(checkpoint, weights_only=True)
    state["id_maps"]["numeric"]["price"][0] += 1          # the standardization's mean
    torch.save(state, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="do not match the fingerprint"):
        load_checkpoint(tmp_path / "tampered.pt")


def test_every_option_shows_its_default_and_threads_follow_the_cores():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, command in commands.items():
        text = command.format_help()
        for action in command._actions:
            if not action.option_strings or action.required or action.dest == "help":
                continue
            help_text = command._get_formatter()._expand_help(action) if action.help else ""
            assert "default" in command.formatter_class("x")._get_help_string(action) \
                or "default" in help_text, (name, action.option_strings)
        assert "(default: none)" in text or name != "train"
    assert commands["train"].get_default("threads") == available_cores() == \
        len(os.sched_getaffinity(0))


def test_log_file_gets_one_line_per_epoch_without_a_bar(log, tmp_path, capsys):
    """stderr not a terminal (captured here, a file or a pipe in a job): no
    progress bar (no carriage returns) although one was not refused, one
    line per epoch."""
    assert main(["train", "--data", str(log), *LABELED[:-1], "--epochs", "2", "--log-dir",
                 str(tmp_path / "logs")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    assert [line.split(":")[0] for line in out.splitlines()
            if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    assert len((tmp_path / "logs" / "metrics.csv").read_text().splitlines()) == 3


def on_one_core():
    """Pins a child process to the first core it may run on (what taskset or a
    container's CPU set does)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def terminal_output(argv) -> tuple:
    """``python -m din_fast`` on one core, stderr an 80-column terminal (a
    pseudo-terminal): (exit status, stdout, what the terminal showed)."""
    import fcntl
    import pty
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "din_fast", *argv], stdout=subprocess.PIPE,
                               stderr=terminal, preexec_fn=on_one_core)
    os.close(terminal)
    shown = []
    while True:
        try:
            chunk = os.read(controller, 1 << 16)
        except OSError:     # the child closed the terminal (EIO)
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(controller)
    out = process.stdout.read().decode()
    return process.wait(timeout=600), out, b"".join(shown).decode(errors="replace")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity here")
def test_the_command_on_a_terminal_draws_a_bar_and_takes_the_cores_it_may_use(log, tmp_path):
    """Through the real command on one core of a terminal: --help shows one
    thread as the default, training draws a bar per epoch on the terminal
    while its epoch lines go to stdout, and --log-dir gets the epochs' CSV."""
    status, out, shown = terminal_output(["train", "--help"])
    option = "\n  --threads THREADS"
    assert status == 0 and option in out
    threads_help = " ".join(out.split(option, 1)[1].split("\n  -", 1)[0].split("\n\n")[0].split())
    assert threads_help.endswith("(default: 1)"), threads_help
    status, out, shown = terminal_output(
        ["train", "--data", str(log), *LABELED[:-1], "--epochs", "2", "--log-dir",
         str(tmp_path / "logs")])
    assert status == 0, shown
    assert "\r" in shown and "epoch 1/2" in shown and "epoch 2/2" in shown, shown
    assert [line.split(":")[0] for line in out.splitlines()
            if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]
    lines = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["epoch", "train_loss"] and len(lines) == 3
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]


def bad_input_cases(tmp):
    """(argv, fragments the one error line must hold)."""
    rows = labeled_rows(30)
    train = lambda path, *options: ["train", "--data", str(path), "--label-column", "label",
                                    *options]
    cases = {}

    def csv_case(name, rows, options, *expected, header=None):
        path = write_labeled_log(tmp / f"{name}.csv", rows,
                                 *(() if header is None else (header,)))
        cases[name] = (train(path, *options), (str(path),) + expected)
    csv_case("no_label_column", [r[:4] + r[5:] for r in rows], (), "line 1", "'label'",
             "--label-column", header=("user", "item", "category", "timestamp", "genres",
                                       "hour", "price"))
    csv_case("label_not_binary", rows[:5] + [rows[5][:4] + (2,) + rows[5][5:]], (), "line 7",
             "column label", "not 0 or 1")
    csv_case("label_empty", rows[:3] + [rows[3][:4] + ("",) + rows[3][5:]], (), "line 5",
             "column label", "empty cell")
    # Words a reader might take for a missing value are what they are: not a label.
    for word in ("NA", "null", "N/A"):
        csv_case("label_" + word.replace("/", "_"),
                 rows[:6] + [rows[6][:4] + (word,) + rows[6][5:]], (), "line 8",
                 "column label", f"{word!r} is not a number", "expected a label")
    csv_case("feature_absent", rows, ("--features", "genres,brand"), "line 1", "'brand'",
             "--features")
    csv_case("feature_empty", [r[:5] + ("",) + r[6:] for r in rows], ("--features", "genres"),
             "column genres", "empty on every row")
    csv_case("numeric_not_a_number", rows[:8] + [rows[8][:7] + ("cheap",)],
             ("--numeric-features", "price"), "line 10", "column price", "'cheap' is not a "
             "number")
    csv_case("separator_in_an_id", rows[:2] + [(rows[2][0], "i1|i2") + rows[2][2:]], (),
             "line 4", "column item", "'|'")
    table = pa.table({"user": ["u1"], "item": ["i1"], "timestamp": [1], "label": [1],
                      "price": ["cheap"]})
    pq.write_table(table, tmp / "string_price.parquet")
    cases["numeric_of_the_wrong_type"] = (
        train(tmp / "string_price.parquet", "--numeric-features", "price"),
        (str(tmp / "string_price.parquet"), "column price", "type string", "numbers"))
    cases["features_without_a_label"] = (["train", "--features", "genres"],
                                         ("`features` needs `label_column`",))
    return cases


SUBPROCESS = ("separator_in_an_id",)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return bad_input_cases(tmp_path_factory.mktemp("bad_labeled"))


@pytest.mark.parametrize("name", ["no_label_column", "label_not_binary", "label_empty",
                                  "label_NA", "label_null", "label_N_A",
                                  "feature_absent", "feature_empty", "numeric_not_a_number",
                                  "separator_in_an_id", "numeric_of_the_wrong_type",
                                  "features_without_a_label"])
def test_bad_input_is_one_error_line(bad_inputs, name, capsys):
    argv, expected = bad_inputs[name]
    if name in SUBPROCESS:      # a few through the real command, the rest through main()
        result = run(Case(argv, expected))
        status, err = result.returncode, result.stderr
    else:
        status, err = main(argv), capsys.readouterr().err
    lines = err.splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("din-fast: error: "), err
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])


def test_exported_model_takes_the_side_features(trained, tmp_path, capsys):
    """ONNX through the command: the id maps JSON lists the inputs in call
    order, the Encoder builds them from raw requests with features, and the
    model scores as the eager one. The .pt2 package's program (the
    AOTInductor compile aside) takes the same inputs, by the same names."""
    pytest.importorskip("onnxruntime")
    import din_fast.ctr.export as export
    from din_fast.ctr.checkpoint import restored_model
    from din_fast.ctr.package_inputs import InputContract
    from din_fast.ctr.serving import Encoder, OnnxModel
    from din_fast.ctr.training import checkpoint_for_run

    checkpoint, _ = trained
    out = tmp_path / "din.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), "--format",
                 "onnx"]) == 0
    maps = json.loads((tmp_path / "din.ids.json").read_text())
    names = ["history_items", "history_categories", "lengths", "target_items",
             "target_categories", "features_genres", "features_hour", "numeric"]
    assert [i["name"] for i in maps["inputs"]] == names
    assert maps["unknown"] and maps["numeric"]["price"]["std"] > 0
    batch = Encoder.from_json(tmp_path / "din.ids.json").encode(
        [["i1", "i7", "never"], []], [["i2", "unseen"], ["i3"]], max_len=50,
        features=[{"genres": ["g1|g2", ""], "hour": 3, "price": 9.5},
                  {"genres": "g9", "hour": "23", "price": "11"}])
    assert batch.unknown_candidates == [(0, "unseen")] and batch.unknown_feature_values == 1
    model = restored_model(*checkpoint_for_run(str(checkpoint), "torch", "cpu"))
    args = batch.inputs()
    eager = model(*args[:5], features=dict(zip(("genres", "hour"), args[5:7])),
                  numeric=args[7])
    assert torch.allclose(OnnxModel(out)(*args), eager.detach(), atol=1e-5)
    # The .pt2 export's program and what its package would record.
    program = torch.export.export(model, export.din_example_inputs(model),
                                  dynamic_shapes=export.din_dynamic_shapes(model))
    contract = InputContract.of_program(program, export.din_dynamic_shapes(model),
                                        export.din_value_ranges(model),
                                        export.din_padding_dims(model))
    assert [spec.name for spec in contract.inputs] == names
    assert contract.padding_dims == ("T", "V_genres", "V_hour")
    prepared = contract.prepare("din.pt2", args, {})
    assert torch.allclose(program.module()(*prepared[:5],
                                           dict(zip(("genres", "hour"), prepared[5:7])),
                                           prepared[7]),
                          eager.detach(), atol=1e-5)


def test_linear_lr_is_the_linear_parts_own_rate(log, capsys):
    """--linear-lr puts the linear part, and nothing else, in its own Adam
    group; without --linear it is refused in one line."""
    from din_fast.ctr.config import build_model
    from din_fast.ctr.errors import InputError
    from din_fast.ctr.training import parameter_groups

    config = TrainConfig(linear=True, linear_lr=0.05, lr=0.002)
    model = build_model(config, 10, 3, {"genres": 4})
    deep, linear = parameter_groups(model, config)
    assert linear["lr"] == 0.05 and "lr" not in deep     # deep: Adam's lr, config.lr
    assert {id(p) for p in linear["params"]} == {id(p) for p in model.linear.parameters()}
    assert sorted(map(id, deep["params"] + linear["params"])) == \
        sorted(map(id, model.parameters()))
    assert len(parameter_groups(model, TrainConfig(linear=True))) == 1
    with pytest.raises(InputError, match="`linear_lr`.*needs `linear`"):
        TrainConfig(linear_lr=0.05)
    assert main(["train", "--data", str(log), *LABELED, "--linear-lr", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("din-fast: error:") and "linear_lr" in err[0]


def test_a_log_trained_without_its_label_column_gets_a_note(log, tmp_path, capsys):
    """By the DIN protocol every row is a behaviour: an impression log given
    without --label-column trains on its non-clicks as clicks, without an
    error; a note names the column and the option (CSV and Parquet)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pacsv.read_csv(log)
    parquet = tmp_path / "log.parquet"
    pq.write_table(table.rename_columns([("Clicked" if n == "label" else n)
                                         for n in table.column_names]), parquet)
    quick = ["--epochs", "1", "--embed-dim", "4", "--batch-size", "64", "--no-progress",
             "--checkpoint", str(tmp_path / "din.pt")]
    for data, column in ((log, "label"), (parquet, "Clicked")):
        capsys.readouterr()
        assert main(["train", "--data", str(data), *quick]) == 0
        notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
        assert notes == [f"din-fast: note: {data} has a column {column!r}, which the DIN "
                         "protocol (no --label-column) does not read: every row is taken as a "
                         "behaviour and the negatives are sampled; to train on the labels, give "
                         f"--label-column {column}"], notes
    assert main(["train", "--data", str(log), *LABELED, *quick]) == 0
    assert "note" not in capsys.readouterr().err
