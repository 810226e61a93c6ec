"""Every mistake a user can make with din-fast, through the real command.

Each case runs ``python -m din_fast ...`` in a subprocess and must end in
exactly one stderr line ``din-fast: error: ...`` naming the file (and line,
where there is one) and what was expected, with exit status 2: no traceback,
nothing of the file's contents beyond a short quote. The commands run
concurrently (one session fixture), since each pays for importing torch.
"""

from __future__ import annotations

import codecs
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from din_fast.ctr.cli import main
from din_fast.ctr.loaders import load_interactions, synthetic_interactions
from din_fast.ctr.training import TrainConfig, train

from cli_data import Case, run, write_amazon, write_csv

SECRET = "s3cr3t-c0ntent"  # written into files whose contents no message may quote
MAX_MESSAGE_CHARS = 400


def random_bytes(path, size=4096, seed=0):
    path.write_bytes(torch.randint(0, 256, (size,), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(seed)).numpy()
                     .tobytes())
    return path


def data_cases(tmp):
    """train --data <bad file>: name -> Case."""
    good = write_csv(tmp / "good.csv", synthetic_interactions(num_users=30, seed=1))
    text = good.read_text()
    cases = {}

    def csv_case(name, content, *expected, suffix=".csv"):
        path = tmp / f"{name}{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        cases[name] = Case(["train", "--data", str(path)], (str(path),) + expected)

    header = "user,item,category,timestamp\n"
    csv_case("random_bytes", random_bytes(tmp / "r.bin").read_bytes(), "line", "UTF-8")
    csv_case("truncated", text[:len(text) // 2 - 3], "line", "expected 4 fields")
    csv_case("empty", "", "line 1", "empty file")
    csv_case("utf16", text.encode("utf-16"), "UTF-16", "UTF-8")
    csv_case("nul_byte", header + "1,2,3,4\n1,\0,3,5\n", "line 3", "NUL")
    csv_case("nan_timestamp", header + "1,2,3,nan\n", "line 2", "finite numeric timestamp")
    csv_case("too_few_behaviours", header + "1,1,1,0\n1,2,1,1\n1,4,1,2\n2,3,2,0\n",
             "at least 4 behaviours")
    csv_case("user_touched_every_item", header + "".join(
        f"{u},{i},1,{i}\n" for u in (1, 2) for i in range(1, 5)), "touched every one")
    cases["missing_path"] = Case(["train", "--data", str(tmp / "nowhere.csv")],
                                 (str(tmp / "nowhere.csv"), "does not exist"))
    empty_dir = tmp / "empty_dir"
    empty_dir.mkdir()
    cases["directory_without_amazon_files"] = Case(
        ["train", "--data", str(empty_dir)], (str(empty_dir), "_item2attributes.json"))

    def amazon_case(name, expected, lines=None, attributes=None, raw_json=None, raw_txt=None):
        directory = write_amazon(tmp / name, lines=lines, attributes=attributes)
        if raw_json is not None:
            (directory / "Small_item2attributes.json").write_bytes(raw_json)
        if raw_txt is not None:
            (directory / "Small.txt").write_bytes(raw_txt)
        cases[name] = Case(["train", "--data", str(directory)], expected)

    amazon_case("json_truncated", ("Small_item2attributes.json", "line 1", "JSON object"),
                raw_json=b'{"10": [7, 1], "11": [')
    amazon_case("json_nested_too_deeply", ("Small_item2attributes.json", "nested"),
                raw_json=b"[" * 200000)
    amazon_case("json_random_bytes", ("Small_item2attributes.json", "UTF-8"),
                raw_json=b'{"10": [7\xff\xfe]}')
    amazon_case("amazon_txt_random_bytes", ("Small.txt", "line", "UTF-8"),
                raw_txt=random_bytes(tmp / "r2.bin", seed=1).read_bytes())
    return cases


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny DIN checkpoint, its data and its state loaded back."""
    tmp = tmp_path_factory.mktemp("trained")
    data = write_csv(tmp / "tiny.csv", synthetic_interactions(num_users=40, seed=4))
    checkpoint = tmp / "din.pt"
    torch.manual_seed(0)
    train(TrainConfig(data=str(data), epochs=1, batch_size=64, embed_dim=4),
          checkpoint=str(checkpoint), progress=False, log=lambda *_: None)
    return data, checkpoint, torch.load(checkpoint, weights_only=True)


def id_strings(state) -> list:
    """The ids a checkpoint's {offsets, bytes} pair holds."""
    offsets, data = state["offsets"].tolist(), bytes(state["bytes"].tolist())
    return [data[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])]


def strings_state(ids) -> dict:
    encoded = [i.encode() for i in ids]
    offsets = [0]
    for e in encoded:
        offsets.append(offsets[-1] + len(e))
    return {"offsets": torch.tensor(offsets, dtype=torch.int64),
            "bytes": torch.tensor(list(b"".join(encoded)), dtype=torch.uint8)}


def tampered(state, change):
    """A deep-enough copy of a checkpoint's state, changed by ``change``."""
    copy = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
    change(copy)
    return copy


def checkpoint_cases(tmp, trained):
    """evaluate --checkpoint <bad file> --data <good data>: name -> Case."""
    data, good, state = trained
    cases = {}

    def case(name, write, *expected):
        path = tmp / f"{name}.pt"
        write(path)
        cases[name] = Case(["evaluate", "--checkpoint", str(path), "--data", str(data)],
                           (str(path),) + expected)

    def change(update):
        return lambda path: torch.save(tampered(state, update), path)

    case("random_bytes", lambda p: random_bytes(p, seed=2), "not a readable torch checkpoint")
    case("truncated", lambda p: p.write_bytes(good.read_bytes()[:good.stat().st_size // 2]),
         "not a readable torch checkpoint")
    case("empty", lambda p: p.write_bytes(b""), "not a readable torch checkpoint")
    case("foreign_torch_file", lambda p: torch.save({"weights": torch.zeros(3)}, p),
         "not a din_fast checkpoint")
    case("pickled_object", lambda p: torch.save(torch.nn.Linear(2, 2), p),
         "not a readable torch checkpoint")
    case("format_only", lambda p: torch.save({"format": state["format"]}, p),
         "`config` must be a dict")
    case("earlier_format", change(lambda s: s.update(format="din_fast.checkpoint/1")),
         "written by another version of din-fast", "train again")
    case("embed_dim_tampered", change(lambda s: s["config"].update(embed_dim=10 ** 9)),
         "state_dict['item_embedding.weight'] must be", "shape")
    case("config_type_tampered", change(lambda s: s["config"].update(lr=SECRET)),
         "config field `lr` must be a finite number > 0")
    case("config_model_tampered", change(lambda s: s["config"].update(model=SECRET)),
         "config field `model` must be one of")
    case("config_unknown_field", change(lambda s: s["config"].update({SECRET: 1})),
         "1 field(s) TrainConfig does not have")
    case("config_missing_field", change(lambda s: s["config"].pop("embed_dim")),
         "config field `embed_dim` must be present")
    case("config_compile_tampered", change(lambda s: s["config"].update(compile=SECRET)),
         "config field `compile` must be None (eager) or one of")
    ids = id_strings(state["id_maps"]["item_ids"])
    case("id_maps_unsorted", change(lambda s: s["id_maps"].update(
        item_ids=strings_state(ids[::-1]))), "sorted, without repeats")
    case("id_maps_duplicated", change(lambda s: s["id_maps"].update(
        item_ids=strings_state(ids[:1] + ids[:1] + ids[2:]))), "sorted, without repeats")
    case("id_maps_not_utf8", change(lambda s: s["id_maps"].update(
        item_ids={**s["id_maps"]["item_ids"], "bytes": torch.full_like(
            s["id_maps"]["item_ids"]["bytes"], 0xff)})), "UTF-8 ids")
    case("id_maps_offsets_out_of_range", change(lambda s: s["id_maps"].update(
        item_ids={**s["id_maps"]["item_ids"], "offsets": s["id_maps"]["item_ids"]["offsets"] * 2})),
         "'offsets': int64 tensor")
    case("id_maps_wrong_dtype", change(lambda s: s["id_maps"].update(
        category_ids={**s["id_maps"]["category_ids"], "offsets": s["id_maps"]["category_ids"][
            "offsets"].float()})), "'offsets': int64 tensor")
    case("item_category_out_of_range", change(lambda s: s["id_maps"].update(
        item_category=s["id_maps"]["item_category"] + 1000)), "item_category")
    case("tensor_shape_tampered", change(lambda s: s["state_dict"].update(
        {"attention.output.weight": torch.zeros(1, 3)})), "attention.output.weight", "shape")
    case("tensor_missing", change(lambda s: s["state_dict"].pop("mlp.0.weight")), "1 missing")
    case("tensor_nan", change(lambda s: s["state_dict"].update(
        {"mlp.0.bias": torch.full_like(s["state_dict"]["mlp.0.bias"], float("nan"))})),
         "NaN or Inf")
    directory = tmp / "checkpoint_dir"
    directory.mkdir()
    cases["directory"] = Case(["evaluate", "--checkpoint", str(directory), "--data", str(data)],
                              (str(directory), "not a regular file"))
    cases["missing"] = Case(["evaluate", "--checkpoint", str(tmp / "no.pt"), "--data",
                             str(data)], (str(tmp / "no.pt"), "does not exist"))
    # config.data names another file: evaluate must not read it on its own.
    secret_file = tmp / "secret.csv"
    secret_file.write_text(f"{SECRET}\n")
    path = tmp / "points_elsewhere.pt"
    torch.save(tampered(state, lambda s: s["config"].update(data=str(secret_file))), path)
    cases["config_data_is_not_read"] = Case(["evaluate", "--checkpoint", str(path)],
                                            (str(path), "--data"))
    return cases


def machine_cases(tmp, trained):
    """Devices, backends and options this machine or the data cannot serve."""
    data, checkpoint, _ = trained
    bad_data = tmp / "never_read.csv"
    bad_data.write_text("not,a,din,file\n")
    cases = {}
    if not torch.cuda.is_available():
        # Checked before the data is read: the (bad) data file is never named.
        cases["train_device_cuda"] = Case(["train", "--data", str(bad_data), "--device", "cuda"],
                                          ("device 'cuda'", "CUDA is not available"))
        cases["evaluate_device_cuda"] = Case(
            ["evaluate", "--checkpoint", str(checkpoint), "--data", str(bad_data), "--device",
             "cuda"], ("device 'cuda'", "CUDA is not available"))
        cases["train_backend_triton_on_cpu"] = Case(
            ["train", "--data", str(bad_data), "--backend", "triton", "--device", "cpu"],
            ("backend 'triton'", "CUDA tensors"), unset=("TRITON_INTERPRET",))
    cases["bad_backend_override"] = Case(["train", "--data", str(bad_data)],
                                         ("DIN_FAST_BACKEND",),
                                         env={"DIN_FAST_BACKEND": "fastest"})
    cases["metrics_out_in_missing_directory"] = Case(
        ["train", "--data", str(bad_data), "--metrics-out", str(tmp / "no" / "m.json")],
        ("--metrics-out", "does not exist"))
    cases["checkpoint_is_a_directory"] = Case(
        ["train", "--data", str(bad_data), "--checkpoint", str(tmp)], ("--checkpoint",
                                                                        "is a directory"))
    cases["negative_lr"] = Case(["train", "--lr", "-1"], ("--lr", "finite number > 0"))
    cases["negative_seed"] = Case(["train", "--seed", "-1"], ("--seed",))
    cases["ema_of_one"] = Case(["train", "--ema", "1"],
                               ("--ema", "must be a number in (0, 1); got 1"))
    cases["unknown_command"] = Case(["fly"], ("invalid choice",))
    return cases


# The failures issue 10 lists run as real subprocesses; the rest go through
# the same entry point in this process (main(), with the same output checks),
# which keeps the suite's time down: each subprocess pays for importing torch.
SUBPROCESS_CASES = (
    [f"data:{n}" for n in ("random_bytes", "truncated", "empty", "utf16", "too_few_behaviours",
                           "user_touched_every_item", "missing_path",
                           "directory_without_amazon_files")]
    + [f"checkpoint:{n}" for n in ("random_bytes", "truncated", "empty", "foreign_torch_file",
                                   "embed_dim_tampered", "config_type_tampered",
                                   "id_maps_unsorted", "id_maps_duplicated",
                                   "tensor_shape_tampered", "directory",
                                   "config_data_is_not_read")]
    + [f"machine:{n}" for n in ("train_device_cuda", "train_backend_triton_on_cpu")])
IN_PROCESS_CASES = (
    [f"data:{n}" for n in ("nul_byte", "nan_timestamp", "json_truncated",
                           "json_nested_too_deeply", "json_random_bytes",
                           "amazon_txt_random_bytes")]
    + [f"checkpoint:{n}" for n in ("pickled_object", "format_only", "earlier_format",
                                   "config_model_tampered",
                                   "config_unknown_field", "config_missing_field",
                                   "id_maps_wrong_dtype", "id_maps_not_utf8",
                                   "id_maps_offsets_out_of_range", "item_category_out_of_range",
                                   "tensor_missing", "tensor_nan", "missing")]
    + [f"machine:{n}" for n in ("evaluate_device_cuda", "bad_backend_override",
                                "metrics_out_in_missing_directory", "checkpoint_is_a_directory",
                                "negative_lr", "negative_seed", "unknown_command")])


@pytest.fixture(scope="session")
def cases(tmp_path_factory, trained):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    return {**{f"data:{k}": v for k, v in data_cases(tmp).items()},
            **{f"checkpoint:{k}": v for k, v in checkpoint_cases(tmp, trained).items()},
            **{f"machine:{k}": v for k, v in machine_cases(tmp, trained).items()}}


@pytest.fixture(scope="session")
def subprocess_results(cases):
    chosen = [name for name in SUBPROCESS_CASES if name in cases]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(chosen, pool.map(lambda name: run(cases[name]), chosen)))


def check_error(case: Case, status: int, stdout: str, stderr: str):
    lines = stderr.splitlines()
    assert status == 2, (status, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("din-fast: error: "), stderr[-2000:]
    message = lines[0]
    for fragment in case.expected:
        assert fragment in message, (fragment, message)
    assert len(message) < MAX_MESSAGE_CHARS + sum(len(f) for f in case.expected), message
    assert SECRET not in message and "Traceback" not in stderr
    assert "data:" not in stdout        # failed before any data was loaded or trained on


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_command_fails_with_one_error_line(cases, subprocess_results, name):
    if name not in cases:
        pytest.skip("needs a machine without CUDA")
    result = subprocess_results[name]
    check_error(cases[name], result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("name", IN_PROCESS_CASES)
def test_entry_point_fails_with_one_error_line(cases, name, capsys, monkeypatch):
    if name not in cases:
        pytest.skip("needs a machine without CUDA")
    case = cases[name]
    for variable in case.unset:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in case.env.items():
        monkeypatch.setenv(variable, value)
    threads = torch.get_num_threads()
    try:
        status = main(case.argv)
    except SystemExit as exit:          # argparse's own errors
        status = exit.code
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    check_error(case, status, captured.out, captured.err)


def rows_of(path):
    header, *rows = path.read_text().splitlines()
    return header, [row.split(",") for row in rows]


def write_rows(path, header, rows):
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def evaluate_json(checkpoint, data, tmp_path, name):
    out = tmp_path / f"{name}.json"
    result = run(Case(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data),
                       "--metrics-out", str(out)], ()))
    return result, (json.loads(out.read_text()) if result.returncode == 0 else None)


def test_evaluate_skips_unknown_history_items_and_leaves_out_unknown_targets(trained, tmp_path):
    data, checkpoint, _ = trained
    header, rows = rows_of(data)
    _, baseline = evaluate_json(checkpoint, data, tmp_path, "baseline")
    # Unknown items inserted early in three users' histories (timestamps -1,
    # so never the last behaviour): skipped, every number unchanged.
    users = sorted({r[0] for r in rows})
    inserted = [[u, str(10 ** 6 + i), "1", "-1"] for i, u in enumerate(users[:3])]
    result, with_unknown_history = evaluate_json(
        checkpoint, write_rows(tmp_path / "history.csv", header, rows + inserted), tmp_path,
        "history")
    assert result.returncode == 0, result.stderr
    assert with_unknown_history["skipped_history_items"] == 3
    assert with_unknown_history["excluded_test_samples"] == 0
    for key in ("test_auc", "test_gauc", "test_logloss", "test_samples"):
        assert with_unknown_history[key] == baseline[key], key
    assert "3 unknown history item(s) skipped" in result.stderr
    # Two users whose last behaviour is an unknown item: both of their test
    # samples (positive and negative) are left out and counted.
    last = [[u, str(2 * 10 ** 6 + i), "1", "1000000"] for i, u in enumerate(users[3:5])]
    result, without_targets = evaluate_json(
        checkpoint, write_rows(tmp_path / "targets.csv", header, rows + last), tmp_path,
        "targets")
    assert result.returncode == 0, result.stderr
    assert without_targets["excluded_test_samples"] == 4
    assert without_targets["test_samples"] == baseline["test_samples"] - 4
    assert "4 test sample(s) left out" in result.stderr
    # No test item known at all: an error, not metrics of nothing (data this
    # foreign is refused first; with every row allowed to be unknown, it
    # reaches the empty test set).
    unknown = [[r[0], str(3 * 10 ** 6 + int(r[1])), r[2], r[3]] for r in rows]
    all_new = write_rows(tmp_path / "all_new.csv", header, unknown)
    for extra, expected in (((), "100.0% of its rows"),
                            (("--max-unknown", "1"), "no test sample left")):
        result = run(Case(["evaluate", "--checkpoint", str(checkpoint), "--data", str(all_new),
                           *extra], ()))
        assert result.returncode == 2 and result.stderr.startswith("din-fast: error: ")
        assert expected in result.stderr and len(result.stderr.splitlines()) == 1


def test_categories_come_from_the_checkpoint(trained, tmp_path):
    # A known item's category in the new file is ignored: the model scores
    # the item as it was trained, so one relabelled item changes nothing.
    # Relabelling more than 1% of the items is data of another source: refused.
    data, checkpoint, _ = trained
    header, rows = rows_of(data)
    items = sorted({i for _, i, _, _ in rows})
    _, baseline = evaluate_json(checkpoint, data, tmp_path, "baseline")
    for relabelled_items in ({items[0]}, set(items)):
        relabelled = [[u, i, str(int(c) + 500) if i in relabelled_items else c, t]
                      for u, i, c, t in rows]
        result, other = evaluate_json(checkpoint, write_rows(tmp_path / "relabelled.csv", header,
                                                             relabelled), tmp_path, "relabelled")
        if len(relabelled_items) == 1:
            assert other["test_auc"] == baseline["test_auc"]
        else:
            assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
            assert "100.0% of the items both know" in result.stderr
            assert f"does not fit checkpoint {checkpoint}" in result.stderr


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = write_csv(tmp_path / "bom.csv", synthetic_interactions(num_users=30, seed=2))
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
    assert len(load_interactions(path).user_ids) == 30
