"""din_fast.compat.fuxictr against outputs saved once from FuxiCTR's own
DIN_Attention (tests/data/make_fuxictr_reference.py says how): a FuxiCTR
state_dict loads with strict=True and gives the same outputs, gradients and
(Dice, training) BatchNorm statistics."""

import pathlib

import pytest
import torch

from din_fast.compat.fuxictr import DIN_Attention

DATA = pathlib.Path(__file__).parent / "data" / "fuxictr_din_attention.pt"
REFERENCE = torch.load(DATA, weights_only=True)


def _unpack(packed):
    tensors, start = {}, 0
    for name, shape, dtype in zip(packed["names"], packed["shapes"], packed["dtypes"]):
        count = int(torch.Size(shape).numel())
        flat = packed["flat"][start:start + count]
        tensors[name] = flat.view(shape).to(getattr(torch, dtype.removeprefix("torch.")))
        start += count
    return tensors


def _section(tensors, prefix):
    return {name[len(prefix) + 1:]: t for name, t in tensors.items()
            if name.startswith(prefix + "/")}


def _close(ours, theirs, what):
    assert ours.shape == theirs.shape, what
    error = (ours - theirs).norm()
    assert error <= 1e-10 * theirs.norm() + 1e-12, f"{what}: error {error:.3g}"


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("index", range(len(REFERENCE["cases"])))
def test_matches_fuxictr(index, backend):
    inputs = _unpack(REFERENCE["inputs"])
    case = REFERENCE["cases"][index]
    options = {k: v for k, v in case["case"].items() if k not in ("mask", "mode")}
    saved = _unpack(case)
    layer = DIN_Attention(embedding_dim=REFERENCE["embedding_dim"],
                          attention_units=REFERENCE["attention_units"], backend=backend,
                          **options).double()
    layer.load_state_dict(_section(saved, "state_dict"), strict=True)
    layer.train(case["case"]["mode"] == "train")
    valid = inputs["valid"]
    mask = {None: None, "bool": valid, "float": valid.double()}[case["case"]["mask"]]
    target = inputs["target_item"].clone().requires_grad_()
    history = inputs["history_sequence"].clone().requires_grad_()
    output = layer(target, history, mask=mask)
    _close(output, saved["output"], "output")
    (output * saved["cotangent"]).sum().backward()
    grads = {"target_item": target.grad, "history_sequence": history.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    expected = _section(saved, "grads")
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        _close(grads[name], grad, f"gradient of {name}")
    for name, tensor in _section(saved, "state_dict_after").items():
        _close(layer.state_dict()[name].double(), tensor.double(), f"{name} after the forward")


def test_errors_use_the_peer_argument_names():
    layer = DIN_Attention(embedding_dim=4, attention_units=[8])
    target, history = torch.randn(3, 4), torch.randn(3, 5, 4)
    with pytest.raises(ValueError, match="DIN_Attention: `target_item`"):
        layer(target[:2], history)
    with pytest.raises(ValueError, match="`history_sequence`"):
        layer(target, history[0])
    with pytest.raises(ValueError, match="`mask`"):
        layer(target, history, mask=torch.full((3, 5), 0.5))
    with pytest.raises(ValueError, match="`hidden_activations`"):
        DIN_Attention(hidden_activations="tanh")
    with pytest.raises(ValueError, match="`batch_norm`"):
        DIN_Attention(batch_norm=True)
    with pytest.raises(ValueError, match="`dropout_rate`"):
        DIN_Attention(embedding_dim=4, attention_units=[8], dropout_rate=0.1)(target, history)
