"""Writes fuxictr_din_attention.pt: FuxiCTR's DIN_Attention, run once.

FuxiCTR's install pulls in ray and more, so the compat test compares against
outputs saved from the real layer instead. To regenerate:

    pip download --no-deps fuxictr==2.3.10 && unzip fuxictr-2.3.10-py3-none-any.whl -d SRC
    python tests/data/make_fuxictr_reference.py SRC

Only the modules DIN_Attention needs are imported (the package __init__
files pull in the rest). Every case: the layer's options and mode, its
state_dict (random, float64), the output and the gradients of
sum(output * cotangent) on the shared inputs, and for Dice in training the
state_dict after the forward (its BatchNorm statistics); each case's tensors
packed into one (see pack; the test unpacks them).
"""

import importlib
import pathlib
import sys
import types

import torch

B, T, E, UNITS = 4, 4, 2, [4, 2]
CASES = [
    dict(hidden_activations="ReLU", use_softmax=False, mask="float", mode="eval"),
    dict(hidden_activations="sigmoid", use_softmax=True, mask="float", mode="eval"),
    dict(hidden_activations="prelu", use_softmax=True, mask=None, mode="eval"),
    dict(hidden_activations="dice", use_softmax=True, mask="bool", mode="train"),
    dict(hidden_activations="dice", use_softmax=False, mask="float", mode="eval"),
    dict(hidden_activations="ReLU", use_softmax=True, mask="bool", mode="eval",
         output_activation="Sigmoid"),
    dict(hidden_activations=["relu", "relu"], use_softmax=False, mask="bool", mode="eval",
         dropout_rate=0.3),
]


def import_din_attention(source: pathlib.Path):
    for package in ("fuxictr", "fuxictr.pytorch", "fuxictr.pytorch.layers",
                    "fuxictr.pytorch.layers.attentions", "fuxictr.pytorch.layers.blocks"):
        module = types.ModuleType(package)
        module.__path__ = [str(source.joinpath(*package.split(".")))]
        sys.modules[package] = module
    return importlib.import_module("fuxictr.pytorch.layers.attentions.target_attention")


def main(source: str, out: pathlib.Path) -> None:
    din_attention_cls = import_din_attention(pathlib.Path(source)).DIN_Attention
    generator = torch.Generator().manual_seed(2026)
    target = torch.randn(B, E, generator=generator, dtype=torch.float64)
    history = torch.randn(B, T, E, generator=generator, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]],
                         dtype=torch.bool)
    masks = {None: None, "bool": valid, "float": valid.double()}
    cases = []
    for case in CASES:
        options = {k: v for k, v in case.items() if k not in ("mask", "mode")}
        layer = din_attention_cls(embedding_dim=E, attention_units=UNITS, **options).double()
        with torch.no_grad():
            for name, tensor in layer.state_dict().items():
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                elif not name.endswith("num_batches_tracked"):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.train(case["mode"] == "train")
        inputs = [target.clone().requires_grad_(), history.clone().requires_grad_()]
        output = layer(*inputs, mask=masks[case["mask"]])
        cotangent = torch.randn(output.shape, generator=generator, dtype=torch.float64)
        (output * cotangent).sum().backward()
        grads = {"target_item": inputs[0].grad, "history_sequence": inputs[1].grad}
        grads.update({name: p.grad for name, p in layer.named_parameters()})
        tensors = {f"state_dict/{k}": v for k, v in state.items()}
        tensors.update({f"grads/{k}": v for k, v in grads.items()})
        tensors.update(output=output.detach(), cotangent=cotangent)
        if case["mode"] == "train":
            tensors.update({f"state_dict_after/{k}": v for k, v in layer.state_dict().items()})
        cases.append(dict(case=case, **pack(tensors)))
    torch.save(dict(inputs=pack(dict(target_item=target, history_sequence=history,
                                      valid=valid)),
                    embedding_dim=E, attention_units=UNITS, cases=cases), out)


def pack(tensors: dict) -> dict:
    """One float64 tensor for many small ones: torch.save's per-tensor
    overhead would be most of the file otherwise."""
    return dict(names=list(tensors), shapes=[tuple(t.shape) for t in tensors.values()],
                dtypes=[str(t.dtype) for t in tensors.values()],
                flat=torch.cat([t.detach().double().flatten() for t in tensors.values()]))


if __name__ == "__main__":
    main(sys.argv[1], pathlib.Path(__file__).with_name("fuxictr_din_attention.pt"))
