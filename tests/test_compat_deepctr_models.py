"""DeepCTR-Torch's own DIN and DIEN models with din_fast's adapter patched in,
as the migration guide shows (``din.AttentionSequencePoolingLayer = ...``), against
the same models unpatched: the same initialization, outputs, gradients and
parameters after a fit step.

The data imitate DeepCTR-Torch's model tests: a user, a gender, an item and
a category, a dense score, and the item and category histories (maxlen 4)
with their length column, which DIN passes straight to the attention; some
lengths exceed maxlen, as real data may.
"""

import numpy as np
import pytest
import torch

import din_fast.compat.deepctr
from peers import deepctr_sequence_module

MAXLEN, SAMPLES = 4, 12


def _deepctr():
    deepctr_sequence_module()  # deepctr_torch entered without its __init__ (see peers)
    import deepctr_torch.inputs as inputs
    import deepctr_torch.models.din as din
    import deepctr_torch.models.dien as dien
    return inputs, din, dien


def _features(max_length: int, negatives: bool):
    """(x, y, feature columns, behaviour feature list), from a fixed seed."""
    inputs, _, _ = _deepctr()
    rng = np.random.default_rng(5)
    columns = [inputs.SparseFeat("user", 5, embedding_dim=4),
               inputs.SparseFeat("gender", 2, embedding_dim=4),
               inputs.SparseFeat("item_id", 6, embedding_dim=8),
               inputs.SparseFeat("cate_id", 4, embedding_dim=4),
               inputs.DenseFeat("pay_score", 1)]
    histories = ["hist_item_id", "hist_cate_id"] + \
        (["neg_hist_item_id", "neg_hist_cate_id"] if negatives else [])
    for name in histories:
        target = "item_id" if "item" in name else "cate_id"
        columns.append(inputs.VarLenSparseFeat(
            inputs.SparseFeat(name, 6 if target == "item_id" else 4,
                              embedding_dim=8 if target == "item_id" else 4,
                              embedding_name=target),
            maxlen=MAXLEN, length_name="seq_length"))
    lengths = rng.integers(1, max_length + 1, SAMPLES)
    x = {"user": rng.integers(0, 5, SAMPLES), "gender": rng.integers(0, 2, SAMPLES),
         "item_id": rng.integers(1, 6, SAMPLES), "cate_id": rng.integers(1, 4, SAMPLES),
         "pay_score": rng.random(SAMPLES), "seq_length": lengths}
    for name in histories:
        ids = rng.integers(1, 6 if "item" in name else 4, (SAMPLES, MAXLEN))
        x[name] = np.where(np.arange(MAXLEN) < lengths[:, None], ids, 0)
    y = np.arange(SAMPLES) % 2
    return x, y, columns, ["item_id", "cate_id"]


def _model_input(model, x) -> torch.Tensor:
    """x as the model's forward takes it: its feature columns side by side, float32."""
    arrays = [np.asarray(x[name], dtype=np.float64).reshape(SAMPLES, -1)
              for name in model.feature_index]
    return torch.from_numpy(np.concatenate(arrays, axis=-1)).float()


def _pair(module, make, monkeypatch):
    """The model unpatched and patched, each built after the same seed."""
    peer = make()
    monkeypatch.setattr(module, "AttentionSequencePoolingLayer",
                        din_fast.compat.deepctr.AttentionSequencePoolingLayer)
    ours = make()
    monkeypatch.undo()
    assert any(isinstance(m, din_fast.compat.deepctr.AttentionSequencePoolingLayer)
               for m in ours.modules())
    return peer, ours


def _assert_close(got, expected, what):
    # float32, relative to the loss's scale (1) at least: gradients 0 in exact
    # arithmetic (a bias under a softmax) round to ~1e-6.
    error = (got - expected).norm()
    assert error <= 1e-5 * max(expected.norm(), 1.0), f"{what}: error {error:.3g}"


def _assert_same_model(peer, ours, x, y):
    """Same initialization, training-mode outputs and gradients (dropout
    seeded alike), eval-mode predictions, and parameters after a fit step."""
    assert ours.state_dict().keys() == peer.state_dict().keys()
    for name, tensor in peer.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    # Away from DeepCTR's N(0, 1e-4) initialization, under which the history
    # barely moves the prediction.
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in peer.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    ours.load_state_dict(peer.state_dict(), strict=True)
    features = _model_input(peer, x)
    target = torch.from_numpy(y).float()[:, None]
    outputs = []
    for model in (peer, ours):
        model.train()
        torch.manual_seed(0)
        model.zero_grad()
        outputs.append(model(features))
        torch.nn.functional.binary_cross_entropy(outputs[-1], target).backward()
    _assert_close(outputs[1], outputs[0], "training output")
    for (name, expected), got in zip(peer.named_parameters(), ours.parameters()):
        if expected.grad is not None:
            _assert_close(got.grad, expected.grad, f"gradient of {name}")
    _assert_close(torch.from_numpy(ours.predict(x)), torch.from_numpy(peer.predict(x)),
                  "predictions")
    for model in (peer, ours):
        model.compile("sgd", "binary_crossentropy")
        torch.manual_seed(1)
        model.fit(x, y, batch_size=5, epochs=1, verbose=0)
    for name, expected in peer.state_dict().items():
        if expected.is_floating_point():
            _assert_close(ours.state_dict()[name], expected, f"{name} after fit")


@pytest.mark.parametrize("att_activation,att_weight_normalization",
                         [("Dice", False), ("sigmoid", True), ("linear", True)])
def test_din(att_activation, att_weight_normalization, monkeypatch):
    _, din, _ = _deepctr()
    x, y, columns, behaviours = _features(max_length=MAXLEN + 2, negatives=False)
    peer, ours = _pair(din, lambda: din.DIN(columns, behaviours, dnn_dropout=0.5,
                                           att_activation=att_activation,
                                           att_weight_normalization=att_weight_normalization),
                       monkeypatch)
    _assert_same_model(peer, ours, x, y)


@pytest.mark.parametrize("gru_type,use_negsampling",
                         [("GRU", False), ("AIGRU", True), ("AGRU", False), ("AUGRU", True)])
def test_dien(gru_type, use_negsampling, monkeypatch):
    _, _, dien = _deepctr()
    x, y, columns, behaviours = _features(max_length=MAXLEN, negatives=use_negsampling)
    peer, ours = _pair(dien, lambda: dien.DIEN(columns, behaviours, gru_type=gru_type,
                                              use_negsampling=use_negsampling,
                                              dnn_hidden_units=[4, 4, 4], dnn_dropout=0.5),
                       monkeypatch)
    _assert_same_model(peer, ours, x, y)
