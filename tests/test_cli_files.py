"""Nothing a user owns is lost, through the real command (din_fast.ctr.files).

An output path that names an input (by any spelling: a symlink, a hard link,
``..``), another output, a directory (trailing slash included), a device, a
directory that takes no file or a plot format matplotlib does not write is
refused before any work, in one ``din-fast: error:`` line with exit status
2, and every file stays as it was. A write that fails (the disk full) leaves
the old file and no temporary one; a failure after training keeps the model.
Ctrl-C during training ends with exit status 130 and the best epoch so far
saved. The cases of one kind run as real subprocesses, concurrently (each pays
for importing torch); the rest through the same entry point in this process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from din_fast.ctr.checkpoint import load_checkpoint
from din_fast.ctr.cli import main
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.training import LocalLearner, TrainConfig, train

from cli_data import Case, one_torch_thread, run, unwritable_directory, write_amazon, write_csv  # noqa: F401,E501

TRAIN = ["train", "--epochs", "1", "--batch-size", "64", "--embed-dim", "4", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CSV, a DIN checkpoint trained on it and a requests file."""
    tmp = tmp_path_factory.mktemp("owned")
    data = write_csv(tmp / "tiny.csv", synthetic_interactions(num_users=40, seed=4))
    checkpoint = tmp / "din.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(TrainConfig(data=str(data), epochs=1, batch_size=64, embed_dim=4),
              checkpoint=str(checkpoint), progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    requests = tmp / "requests.jsonl"
    requests.write_text('{"user": "1", "candidates": ["1", "2"]}\n')
    return data, checkpoint, requests


def owned_copy(directory: Path, trained) -> tuple:
    """The data, checkpoint and requests copied into a directory of their own."""
    directory.mkdir()
    copies = []
    for source in trained:
        copy = directory / source.name
        copy.write_bytes(source.read_bytes())
        copies.append(copy)
    return tuple(copies)


def contents(directory: Path) -> dict:
    """Every file under ``directory`` (temporary ones included) -> its bytes,
    and every directory -> None: a refused command leaves neither behind."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))
            if (p.is_file() or p.is_dir()) and not p.is_symlink()}


def refused_cases(tmp: Path, trained) -> dict:
    """name -> (Case, its directory): outputs refused before any work."""
    cases = {}

    def case(name, make_argv, *expected):
        directory = tmp / name
        data, checkpoint, requests = owned_copy(directory, trained)
        cases[name] = (Case(make_argv(directory, data, checkpoint, requests), expected),
                       directory)

    def link(directory, target, name, hard=False):
        path = directory / name
        (os.link if hard else os.symlink)(target, path)
        return path

    case("predict_output_is_data", lambda d, data, c, r: [
        "predict", "--checkpoint", str(c), "--requests", str(r), "--data", str(data),
        "--output", str(data)], "--output", "an input of this command (--data)")
    case("predict_output_is_requests", lambda d, data, c, r: [
        "predict", "--checkpoint", str(c), "--requests", str(r), "--output", str(r)],
        "an input of this command (--requests)")
    case("predict_output_links_to_checkpoint", lambda d, data, c, r: [
        "predict", "--checkpoint", str(c), "--requests", str(r),
        "--output", str(link(d, c, "scores.csv"))], "an input of this command (--checkpoint)")
    case("evaluate_metrics_hard_link_to_checkpoint", lambda d, data, c, r: [
        "evaluate", "--checkpoint", str(c), "--data", str(data),
        "--metrics-out", str(link(d, c, "m.json", hard=True))],
        "an input of this command (--checkpoint)")
    case("train_metrics_out_is_checkpoint", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--checkpoint", str(c), "--metrics-out", str(c)],
        "each output needs a path of its own")
    case("train_checkpoint_is_data_spelled_otherwise", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--checkpoint", os.path.relpath(d / ".." / d.name /
                                                                     data.name)],
        "an input of this command (--data)")
    case("train_checkpoint_is_a_file_of_the_data_directory", lambda d, data, c, r: [
        *TRAIN, "--data", str(write_amazon(d / "amazon")), "--checkpoint",
        str(d / "amazon" / "Small.txt")], "Small.txt", "an input of this command (--data)")
    def config_file(directory):
        settings = directory / "settings.json"
        settings.write_text('{"epochs": 1}')
        return settings
    case("train_checkpoint_is_config", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--config", str(config_file(d)), "--checkpoint",
        str(link(d, d / "settings.json", "new.pt"))], "an input of this command (--config)")
    case("train_metrics_out_trailing_slash", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--metrics-out", str(d / "nodir") + "/"],
        "--metrics-out", "is a directory")
    case("train_checkpoint_trailing_slash", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--checkpoint", str(d / "nodir") + "/"],
        "--checkpoint", "is a directory")
    case("train_metrics_out_dev_full", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--metrics-out", "/dev/full"], "not a regular file")
    case("predict_output_dev_full", lambda d, data, c, r: [
        "predict", "--checkpoint", str(c), "--requests", str(r), "--output", "/dev/full"],
        "not a regular file")
    case("train_plot_unknown_format", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--checkpoint", str(d / "new.pt"), "--plot",
        str(d / "curves.xyz")], "--plot", "a format matplotlib writes", ".png")
    case("export_out_unwritable", lambda d, data, c, r: [
        "export", "--checkpoint", str(c), "--out", str(unwritable_directory(d) / "din.pt2")],
        "--out", "is not writable")
    case("export_out_is_checkpoint", lambda d, data, c, r: [
        "export", "--checkpoint", str(c), "--out", str(link(d, c, "din.pt2", hard=True))],
        "an input of this command (--checkpoint)")
    def export_beside_checkpoint(d, data, c, r):
        link(d, c, "din.ids.json")      # where the package's id maps would go
        return ["export", "--checkpoint", str(c), "--out", str(d / "din.pt2")]
    case("export_id_maps_are_checkpoint", export_beside_checkpoint, "--out's id maps",
         "an input of this command (--checkpoint)")
    # --log-dir is created by the first epoch's row, never by a refused command.
    case("train_log_dir_then_checkpoint_trailing_slash", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--log-dir", str(d / "logs" / "run"), "--checkpoint",
        str(d / "nodir") + "/"], "--checkpoint", "is a directory")
    case("train_log_dir_then_missing_data", lambda d, data, c, r: [
        *TRAIN, "--data", str(d / "missing.csv"), "--log-dir", str(d / "logs")],
        "missing.csv", "does not exist")
    case("train_log_dir_under_a_file", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--log-dir", str(c / "logs")],
        "--log-dir", "cannot be created as a directory", "is a file")
    case("train_log_dir_through_a_dangling_link", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--log-dir", str(link(d, d / "gone", "logs") / "run")],
        "--log-dir", "cannot be created as a directory", "logs is a symbolic link to nothing")
    case("train_log_dir_unwritable", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--log-dir", str(unwritable_directory(d) / "logs")],
        "--log-dir", "cannot be created", "not writable")
    # A --log-dir still to be created may not take another output's path.
    case("train_log_dir_is_plot", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--log-dir", str(d / "curves.png"), "--plot",
        str(d / "curves.png")], "--log-dir", "where --plot", "a path of its own")
    case("train_log_dir_under_metrics_out", lambda d, data, c, r: [
        *TRAIN, "--data", str(data), "--metrics-out", str(d / "m.json"), "--log-dir",
        str(d / "m.json" / "logs")], "--log-dir", "where --metrics-out")
    return cases


# The cases issue 19 found run as real subprocesses; the rest go through the
# same entry point in this process, which keeps the suite's time down.
SUBPROCESS_CASES = ("predict_output_is_data", "predict_output_is_requests",
                    "predict_output_links_to_checkpoint",
                    "evaluate_metrics_hard_link_to_checkpoint",
                    "train_metrics_out_is_checkpoint",
                    "train_checkpoint_is_data_spelled_otherwise",
                    "train_metrics_out_trailing_slash", "train_checkpoint_trailing_slash",
                    "train_metrics_out_dev_full", "predict_output_dev_full",
                    "train_plot_unknown_format", "export_out_unwritable",
                    "train_log_dir_then_checkpoint_trailing_slash")
IN_PROCESS_CASES = ("train_checkpoint_is_a_file_of_the_data_directory",
                    "train_checkpoint_is_config",
                    "export_out_is_checkpoint", "export_id_maps_are_checkpoint",
                    "train_log_dir_then_missing_data", "train_log_dir_under_a_file",
                    "train_log_dir_unwritable", "train_log_dir_through_a_dangling_link",
                    "train_log_dir_is_plot",
                    "train_log_dir_under_metrics_out")


def test_every_refused_case_is_run(cases):
    assert set(cases) == {*SUBPROCESS_CASES, *IN_PROCESS_CASES}


def disk_full_case(tmp: Path, trained) -> tuple:
    """train --checkpoint over an existing checkpoint, with room for less than
    the new one (RLIMIT_FSIZE: the write fails with EFBIG, as ENOSPC would)."""
    directory = tmp / "disk_full"
    data, checkpoint, _ = owned_copy(directory, trained)
    limit = checkpoint.stat().st_size // 2
    setup = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
             f"({limit}, {limit})); sys.argv[0] = 'din-fast'; "
             "runpy.run_module('din_fast', run_name='__main__')")
    argv = [*TRAIN, "--data", str(data), "--checkpoint", str(checkpoint)]
    return Case(argv, ("--checkpoint", "could not be written", "the existing file is "
                       "unchanged")), directory, ["-c", setup]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, trained):
    return refused_cases(tmp_path_factory.mktemp("refused"), trained)


@pytest.fixture(scope="module")
def subprocess_results(cases, trained, tmp_path_factory):
    """name -> (CompletedProcess, the files of its directory before it ran)."""
    disk_full = disk_full_case(tmp_path_factory.mktemp("full"), trained)

    def run_one(name):
        case, directory, *prefix = disk_full if name == "disk_full" else cases[name]
        before = contents(directory)
        if prefix:
            result = subprocess.run([sys.executable, *prefix[0], *case.argv],
                                    capture_output=True, text=True, timeout=600)
        else:
            result = run(case)
        return result, before

    names = [*SUBPROCESS_CASES, "disk_full"]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return {**dict(zip(names, pool.map(run_one, names))), "disk_full_case": disk_full}


def check_refused(case: Case, status: int, stdout: str, stderr: str, before_work=True):
    lines = stderr.splitlines()
    assert status == 2, (status, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("din-fast: error: "), stderr[-2000:]
    for fragment in case.expected:
        assert fragment in lines[0], (fragment, lines[0])
    assert "C++ compiler" not in lines[0]
    if before_work:
        assert "data:" not in stdout        # refused before any data was read


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_command_refuses_an_output_before_any_work(cases, subprocess_results, name):
    case, directory = cases[name]
    result, before = subprocess_results[name]
    check_refused(case, result.returncode, result.stdout, result.stderr)
    assert contents(directory) == before     # nothing written, nothing changed


@pytest.mark.parametrize("name", IN_PROCESS_CASES)
def test_the_entry_point_refuses_an_output_before_any_work(cases, name, capsys,
                                                           one_torch_thread):
    case, directory = cases[name]
    before = contents(directory)
    status = main(case.argv)
    captured = capsys.readouterr()
    check_refused(case, status, captured.out, captured.err)
    assert contents(directory) == before


def test_a_full_disk_leaves_the_old_checkpoint(subprocess_results):
    result, before = subprocess_results["disk_full"]
    case, directory, _ = subprocess_results["disk_full_case"]
    check_refused(case, result.returncode, result.stdout, result.stderr, before_work=False)
    assert contents(directory) == before     # the old checkpoint, byte for byte; no temporary


def test_a_failure_after_training_keeps_the_model(tmp_path, trained, capsys, monkeypatch,
                                                   one_torch_thread):
    """The checkpoint is written first, then the metrics, then the plot: the
    metrics failing (disk full) still leaves a checkpoint that loads."""
    data = trained[0]
    checkpoint, metrics, plot = tmp_path / "m.pt", tmp_path / "m.json", tmp_path / "c.png"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(json, "dump", full)
    assert main([*TRAIN, "--data", str(data), "--checkpoint", str(checkpoint),
                 "--metrics-out", str(metrics), "--plot", str(plot)]) == 2
    error = capsys.readouterr().err.splitlines()
    assert error == [f"din-fast: error: --metrics-out {metrics}: could not be written "
                     "(No space left on device); nothing was written"]
    assert load_checkpoint(checkpoint).config.data == str(data)
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "m.run.pt"]      # the run state too


def test_ctrl_c_saves_the_best_epoch_so_far(tmp_path, trained):
    """SIGINT once the first epoch's line shows: exit status 130, one line,
    the best epoch so far in a checkpoint that loads, no metrics (a finished
    run writes them) and no temporary file."""
    data = trained[0]
    checkpoint, metrics = tmp_path / "best.pt", tmp_path / "m.json"
    command = [sys.executable, "-m", "din_fast", *TRAIN, "--epochs", "1000", "--patience",
               "1000", "--data", str(data), "--checkpoint", str(checkpoint), "--metrics-out",
               str(metrics)]
    # A job started in the background of a non-interactive shell (`cmd &`)
    # ignores SIGINT, its children inherit that and Python then keeps it
    # ignored, as a nohup'd run should: the child gets the default back so
    # that it hears the Ctrl-C this test sends, wherever the suite runs.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        shown = []
        for line in process.stdout:
            shown.append(line)
            if line.startswith("epoch 1:"):
                process.send_signal(signal.SIGINT)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    shown += stdout.splitlines()
    lines = stderr.splitlines()
    assert process.returncode == 130, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("din-fast: interrupted during epoch "), stderr
    best_shown = max(int(line.split()[1].rstrip(":")) for line in shown
                     if line.startswith("epoch ") and "best so far" in line)
    saved = int(lines[0].partition("saved epoch ")[2].split(",")[0])
    assert saved >= best_shown and f"to {checkpoint}" in lines[0]
    assert load_checkpoint(checkpoint).config.data == str(data)
    # The run state of the last finished epoch, which --resume continues from.
    run_state = tmp_path / "best.run.pt"
    assert f"continue the run with --resume {run_state}" in lines[0]
    assert load_checkpoint(run_state).run.epoch >= saved
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "best.run.pt"]


def test_ctrl_c_before_an_epoch_finished_saves_nothing(tmp_path, trained, capsys, monkeypatch,
                                                        one_torch_thread):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(LocalLearner, "train_epoch", interrupted)
    assert main([*TRAIN, "--data", str(trained[0]), "--checkpoint",
                 str(tmp_path / "m.pt")]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "din-fast: interrupted during epoch 1: no epoch had finished, nothing saved; metrics "
        "and plots are written by finished runs"]
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_a_resumed_run_names_the_run_state_that_exists(tmp_path, trained, capsys,
                                                                 monkeypatch, one_torch_thread):
    """Resumed with another --checkpoint and stopped before an epoch
    finished: the best epoch is saved there, and the run continues from the
    --resume file (the new checkpoint's run state is not written yet)."""
    data, checkpoint, _ = owned_copy(tmp_path / "run", trained)
    run_state = checkpoint.with_name("din.run.pt")
    run_state.write_bytes(trained[1].with_name("din.run.pt").read_bytes())

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(LocalLearner, "train_epoch", interrupted)
    other = tmp_path / "other.pt"
    assert main([*TRAIN, "--epochs", "2", "--data", str(data), "--resume", str(run_state),
                 "--checkpoint", str(other)]) == 130
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and "saved epoch 1, the best so far" in error[0], error
    assert error[0].endswith(f"to {other}; continue the run with --resume {run_state}; metrics "
                             "and plots are written by finished runs"), error
    assert sorted(os.listdir(tmp_path)) == ["other.pt", "run"]
