"""Serve a trained DIN without the training code: an AOTInductor package and
an ONNX model, scored from raw ids.

``din-fast export`` (or the functions below) writes the model and, beside it,
``<name>.ids.json``, the map from raw ids to the dense ids the model takes.
din_fast.ctr.serving.Encoder turns raw requests (a history of raw item ids, the
raw candidates to score) into the model's five inputs (``batch.inputs()``,
C candidates per row), which both formats take. Both score what the eager
model scores.

    python examples/serve_exported.py                     # trains a tiny model first
    python examples/serve_exported.py --checkpoint din.pt # your din-fast train checkpoint

The .pt2 export compiles C++ (a compiler must be installed; a minute on a
small CPU); the ONNX export needs the ``onnx`` extra
(``pip install -e ".[onnx]"`` in the checkout).
"""

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import din_fast.ctr.export
from din_fast.ctr.checkpoint import load_checkpoint, restored_model
from din_fast.ctr.config import TrainConfig
from din_fast.ctr.onnx_export import export_checkpoint_onnx
from din_fast.ctr.serving import Encoder, OnnxModel
from din_fast.ctr.training import train


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a din-fast train checkpoint (default: train a "
                        "tiny model on the synthetic set)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="din-serving-") as directory:
        serve(Path(directory), args.checkpoint)


def serve(directory: Path, checkpoint=None):
    """Export ``checkpoint`` (or a tiny model trained here) into ``directory``
    both ways, and score raw requests with each export and the eager model."""
    if checkpoint is None:
        checkpoint = str(directory / "din.pt")
        train(TrainConfig(epochs=1, embed_dim=8), checkpoint=checkpoint, progress=False,
              log=lambda line: None)

    package, ids = din_fast.ctr.export.export_checkpoint(checkpoint, directory / "din.pt2",
                                                     device="cpu")
    onnx_path, _ = export_checkpoint_onnx(checkpoint, directory / "din.onnx")
    print(f"wrote {package}, {onnx_path} and {ids}")

    # A serving process needs only these files: no checkpoint, no training code.
    encoder = Encoder.from_json(ids)
    known_items = json.loads(Path(ids).read_text())["item_ids"]
    histories = [known_items[10:16], [], known_items[3:4] + ["never-seen"]]
    candidates = [known_items[:3], known_items[20:21], ["never-seen-either", known_items[5]]]
    batch = encoder.encode(histories, candidates)     # keeps the model's --max-len
    from_package = din_fast.ctr.export.load(package)(*batch.inputs())
    from_onnx = OnnxModel(onnx_path)(*batch.inputs())

    saved = load_checkpoint(checkpoint)
    eager = restored_model(saved, replace(saved.config, device="cpu"))
    with torch.no_grad():
        expected = eager(*batch.inputs())
    for name, logits in (("AOTInductor", from_package), ("ONNX Runtime", from_onnx)):
        error = (logits - expected)[batch.known].abs().max().item()
        print(f"{name}: max |logit - eager logit| {error:.2e}")
        assert error < 1e-4
    print(f"unknown: {batch.unknown_history_items} history item(s) skipped, candidates "
          f"{batch.unknown_candidates}")
    for b, row in enumerate(candidates):
        for c, raw in enumerate(row):
            score = f"{torch.sigmoid(from_onnx[b, c]):.3f}" if batch.known[b, c] else "no score"
            print(f"request {b}, candidate {raw}: {score}")


if __name__ == "__main__":
    main()
