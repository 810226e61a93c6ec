"""din-fast export: a checkpoint's model as an AOTInductor package plus its id maps."""

import json
import subprocess
import sys

import pytest
import torch

from din_fast.ctr import export
from din_fast.ctr.checkpoint import load_checkpoint, restored_model
from din_fast.ctr.cli import main
from din_fast.ctr.loaders import synthetic_interactions

from cli_data import one_torch_thread, write_csv  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_export_command_packages_what_the_checkpoint_scores(tmp_path):
    data = write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=40, seed=6))
    checkpoint, package = tmp_path / "m.pt", tmp_path / "serving" / "din.pt2"
    package.parent.mkdir()
    assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "64",
                 "--embed-dim", "4", "--no-progress", "--checkpoint", str(checkpoint)]) == 0
    result = subprocess.run([sys.executable, "-m", "din_fast", "export", "--checkpoint",
                             str(checkpoint), "--out", str(package), "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ids_path = tmp_path / "serving" / "din.ids.json"
    assert str(ids_path) in result.stderr
    assert sorted(p.name for p in package.parent.iterdir()) == ["din.ids.json", "din.pt2"]
    saved = load_checkpoint(checkpoint)
    ids = json.loads(ids_path.read_text())
    assert ids["item_ids"] == saved.id_maps.item_ids.to_pylist()
    assert ids["category_ids"] == saved.id_maps.category_ids.to_pylist()
    assert ids["item_category"] == saved.id_maps.item_category.tolist()
    model = restored_model(saved, saved.config)
    scorer = export.load(str(package))
    assert scorer.ids_fingerprint == ids["fingerprint"] == saved.id_maps.fingerprint()
    for batch, history in ((3, 5), (1, 1), (6, 11)):
        inputs = export.din_example_inputs(model, batch, history)
        with torch.no_grad():
            torch.testing.assert_close(scorer(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)


def test_export_command_errors_are_one_line(tmp_path):
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_bytes(b"\x00garbage")
    cases = [(["--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "a.pt2")],
              "not a readable torch checkpoint"),
             (["--checkpoint", str(not_a_checkpoint), "--out",
               str(tmp_path / "missing" / "a.pt2")], "--out"),
             (["--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "a.zip")],
              "must end in .pt2")]
    for arguments, message in cases:
        result = subprocess.run([sys.executable, "-m", "din_fast", "export", *arguments],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("din-fast: error:"), result.stderr
        assert message in lines[0]
