"""DeepCTR-Torch's DIN model with din_fast's attention layer patched in.

One assignment swaps DeepCTR-Torch's AttentionSequencePoolingLayer for
din_fast's drop-in adapter: same constructor, forward and state_dict names,
so the model (and checkpoints it saved) stay as they are. This script builds
DeepCTR-Torch's DIN on a small synthetic set, trains it with DeepCTR-Torch's
own layer, loads those weights into the patched model, checks that both score
the same, and trains the patched one on.

    pip install --no-deps deepctr-torch     # its other dependencies are din_fast's
    python examples/deepctr_din.py
"""

import numpy as np
import torch

import deepctr_torch.models.din as din
from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

import din_fast.compat.deepctr

SAMPLES, MAXLEN, ITEMS, CATEGORIES = 1024, 10, 100, 20


def synthetic_data(rng):
    """DeepCTR-Torch's input dict: a user, the candidate item and category, and
    the item and category histories padded with 0 to MAXLEN (plus their length)."""
    lengths = rng.integers(1, MAXLEN + 1, SAMPLES)
    valid = np.arange(MAXLEN) < lengths[:, None]
    x = {"user": rng.integers(0, 50, SAMPLES), "item_id": rng.integers(1, ITEMS, SAMPLES),
         "cate_id": rng.integers(1, CATEGORIES, SAMPLES), "seq_length": lengths,
         "hist_item_id": np.where(valid, rng.integers(1, ITEMS, (SAMPLES, MAXLEN)), 0),
         "hist_cate_id": np.where(valid, rng.integers(1, CATEGORIES, (SAMPLES, MAXLEN)), 0)}
    # A click when the candidate's category is among the history's: what
    # attention is for.
    y = (x["hist_cate_id"] == x["cate_id"][:, None]).any(1).astype(np.float32)
    return x, y


def feature_columns():
    columns = [SparseFeat("user", 50, embedding_dim=8),
               SparseFeat("item_id", ITEMS, embedding_dim=8),
               SparseFeat("cate_id", CATEGORIES, embedding_dim=8)]
    columns += [VarLenSparseFeat(SparseFeat("hist_item_id", ITEMS, embedding_dim=8,
                                            embedding_name="item_id"),
                                 maxlen=MAXLEN, length_name="seq_length"),
                VarLenSparseFeat(SparseFeat("hist_cate_id", CATEGORIES, embedding_dim=8,
                                            embedding_name="cate_id"),
                                 maxlen=MAXLEN, length_name="seq_length")]
    return columns


def build(patched: bool):
    torch.manual_seed(0)
    original = din.AttentionSequencePoolingLayer
    if patched:   # the one line a DeepCTR-Torch user adds
        din.AttentionSequencePoolingLayer = din_fast.compat.deepctr.AttentionSequencePoolingLayer
    try:
        model = din.DIN(feature_columns(), ["item_id", "cate_id"], att_activation="dice",
                        init_std=0.05, device="cpu", seed=0)
    finally:
        din.AttentionSequencePoolingLayer = original
    model.compile("adam", "binary_crossentropy", metrics=["auc"])
    return model


def main():
    x, y = synthetic_data(np.random.default_rng(0))
    peer, ours = build(patched=False), build(patched=True)
    print(f"attention layer: {type(ours.attention).__module__}."
          f"{type(ours.attention).__name__}")
    peer.fit(x, y, batch_size=128, epochs=2, verbose=0)
    ours.load_state_dict(peer.state_dict())     # a checkpoint of the peer loads as it is
    expected, got = peer.predict(x, batch_size=256), ours.predict(x, batch_size=256)
    print(f"the peer's trained weights: scores {expected.min():.4f}..{expected.max():.4f}, "
          f"max |difference| with din_fast's layer {np.abs(expected - got).max():.2e}")
    assert np.abs(expected - got).max() < 1e-5
    history = ours.fit(x, y, batch_size=128, epochs=1, verbose=0)
    print(f"training on with din_fast's layer: loss {history.history['loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
