"""The output rules and atomic writes of din_fast.ctr.files, and checkpoints read
whole into memory.

Property tests (hypothesis, bounded): which output path names which input,
however each is spelled (symlinks, chains of them, hard links, relative paths,
``..``, trailing slashes); and a write failing at any point (inside the
writer, the flush, the permissions, the rename; an OSError, another error or
Ctrl-C) leaves the old file as it was and no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from din_fast.ctr import files
from din_fast.ctr.checkpoint import load_checkpoint, save_checkpoint
from din_fast.ctr.config import TrainConfig, build_model
from din_fast.ctr.data import encode
from din_fast.ctr.errors import CheckpointError, OutputError
from din_fast.ctr.loaders import synthetic_interactions

from cli_data import unwritable_directory

# name in the world -> which file it is (None: no file there yet)
WORLD = {"real/data.csv": "data", "real/other.csv": "other", "data_link.csv": "data",
         "chain.csv": "data", "hard.csv": "data", "dir_link/data.csv": "data",
         "dir_link/other.csv": "other", "new.json": None, "real/new.json": None,
         "dangling.csv": None}


def build_world(root: Path) -> None:
    """real/{data,other}.csv; symlinks to data.csv (one, a chain of two, one
    through a symlinked directory), a hard link, and a dangling symlink."""
    (root / "real").mkdir()
    (root / "real/data.csv").write_text("user,item,category,timestamp\n")
    (root / "real/other.csv").write_text("other\n")
    os.symlink(root / "real/data.csv", root / "data_link.csv")
    os.symlink("data_link.csv", root / "chain.csv")
    os.link(root / "real/data.csv", root / "hard.csv")
    os.symlink("real", root / "dir_link")
    os.symlink(root / "real/missing.csv", root / "dangling.csv")


def identity(root: Path, name: str):
    """What a name in the world is: a file's label, or the path a new file there
    would take (a dangling symlink's target)."""
    return WORLD[name] or os.path.realpath(root / name)


def spell(root: Path, name: str, how: str) -> str:
    absolute = str(root / name)
    return {"absolute": absolute,
            "relative": os.path.relpath(absolute),
            "dotted": str(root / "real" / ".." / name),
            "dot": os.path.join(os.path.relpath(root), ".", name)}[how]


spelling = st.tuples(st.sampled_from(sorted(WORLD)),
                     st.sampled_from(("absolute", "relative", "dotted", "dot")))


@settings(max_examples=60)
@given(outputs=st.lists(spelling, min_size=1, max_size=2),
       source=st.tuples(st.sampled_from(["real/data.csv", "chain.csv", "hard.csv",
                                         "real/other.csv"]),
                        st.sampled_from(("absolute", "relative", "dotted"))),
       slash=st.booleans())
def test_an_output_may_name_no_input_and_no_other_output(outputs, source, slash):
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        build_world(root)
        paths = {f"--out{i}": spell(root, *spelled) for i, spelled in enumerate(outputs)}
        if slash:
            paths["--out0"] += "/"
        input_path = spell(root, *source)
        targets = [identity(root, name) for name, _ in outputs]
        clash = len(set(targets)) < len(targets) or identity(root, source[0]) in targets
        with pytest.raises(OutputError) if slash or clash else _no_error() as error:
            files.check_outputs(paths, {"--data": input_path})
        if slash:
            assert "is a directory" in str(error.value)
        elif clash:
            assert ("an input of this command (--data)" in str(error.value)
                    or "each output needs a path of its own" in str(error.value))


class _no_error:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@settings(max_examples=40)
@given(stage=st.sampled_from(["write", "flush", "permissions", "rename"]),
       written=st.integers(0, 3),
       failure=st.sampled_from(["disk full", "bug", "Ctrl-C"]),
       existed=st.booleans())
def test_a_failed_write_leaves_the_old_file_and_no_temporary(stage, written, failure, existed):
    raised = {"disk full": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
              "bug": ValueError("a bug in the writer"), "Ctrl-C": KeyboardInterrupt()}[failure]
    with tempfile.TemporaryDirectory() as directory:
        target = Path(directory) / "metrics.json"
        if existed:
            target.write_text("old contents\n")
        patched = {"flush": (os, "fsync"), "permissions": (os, "chmod"),
                   "rename": (os, "replace")}.get(stage)
        expected = OutputError if failure == "disk full" else type(raised)
        with pytest.raises(expected) as error:
            with mock.patch.object(*patched, side_effect=raised) if patched else _no_error():
                with files.open_replacing(target, "--metrics-out") as handle:
                    for _ in range(written):
                        handle.write("new contents, " * 1000)
                        handle.flush()
                    if stage == "write":
                        raise raised
        assert os.listdir(directory) == (["metrics.json"] if existed else [])
        if existed:
            assert target.read_text() == "old contents\n"
        if failure == "disk full":
            message = str(error.value)
            assert message.startswith(f"--metrics-out {target}: could not be written (No "
                                      "space left on device)")
            assert ("the existing file is unchanged" if existed else "nothing was written") \
                in message


def test_a_write_replaces_whole_keeps_permissions_and_writes_through_symlinks(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old")
    target.chmod(0o640)
    link = tmp_path / "link.json"
    link.symlink_to(target)
    files.write_json(link, {"new": 1}, "--metrics-out")
    assert link.is_symlink() and target.read_text() == '{\n  "new": 1\n}'
    assert target.stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_an_error_about_another_file_is_not_a_write_failure(tmp_path):
    """A compiler that is missing (FileNotFoundError naming it) is the
    writer's own error, not a failure to write the output."""
    with pytest.raises(FileNotFoundError):
        with files.replacing(tmp_path / "din.pt2", "--out"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "g++")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("path, expected", [
    ("/dev/full", "not a regular file"),
    ("/dev/stdout", "names an open file descriptor"),
    ("/dev/fd/1", "names an open file descriptor"),
    ("{tmp}/nodir/m.json", "does not exist"),
    ("{tmp}/nodir/", "is a directory"),
    ("{tmp}", "is a directory"),
    ("", "an empty path"),
])
def test_paths_that_cannot_take_an_output(tmp_path, path, expected):
    with pytest.raises(OutputError, match=expected):
        files.check_output("--metrics-out", path.format(tmp=tmp_path))


def test_a_read_only_file_is_kept(tmp_path):
    kept = tmp_path / "kept.pt"
    kept.write_bytes(b"a model")
    kept.chmod(0o444)
    if os.access(kept, os.W_OK):
        pytest.skip("root may write any file")
    with pytest.raises(OutputError, match="exists and is read-only"):
        files.check_output("--checkpoint", kept)


def test_an_unwritable_directory_is_found_before_any_work(tmp_path):
    with pytest.raises(OutputError, match="is not writable"):
        files.check_output("--checkpoint", unwritable_directory(tmp_path) / "m.pt")


def small_checkpoint(path: Path, seed: int) -> None:
    data = encode(synthetic_interactions(num_users=30, num_categories=8 + seed, seed=seed))
    config = TrainConfig(embed_dim=4)
    save_checkpoint(path, build_model(config, data.num_items, data.num_categories),
                    data.id_maps, config)


def test_a_loaded_checkpoint_does_not_change_with_its_file(tmp_path):
    path, other = tmp_path / "m.pt", tmp_path / "other.pt"
    small_checkpoint(path, seed=1)
    small_checkpoint(other, seed=2)
    loaded = load_checkpoint(path)
    items, categories = loaded.id_maps.item_ids.to_pylist(), loaded.id_maps.category_ids
    item_category = loaded.id_maps.item_category.copy()
    weights = {k: v.clone() for k, v in loaded.state_dict.items()}
    path.write_bytes(other.read_bytes())          # rewritten in place, as a plain write does
    assert loaded.id_maps.item_ids.to_pylist() == items
    assert loaded.id_maps.category_ids.equals(categories)
    assert (loaded.id_maps.item_category == item_category).all()
    for name, tensor in loaded.state_dict.items():
        assert torch.equal(tensor, weights[name]), name
    with open(path, "r+b") as handle:             # truncated under the reader: no SIGBUS
        handle.truncate(os.path.getsize(path) // 3)
    assert sum(float(t.float().sum()) for t in loaded.state_dict.values()) == \
        sum(float(t.float().sum()) for t in weights.values())
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(path)
