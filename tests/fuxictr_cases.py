"""The FuxiCTR DIN_Attention configurations the compat tests run, and how one
is run: on FuxiCTR's layer (live, or once to save its results in
data/fuxictr_din_attention.pt) and on din_fast.compat.fuxictr's alike.

Each case: the layer's options (module instances built fresh for each layer
by a function), the mask, train or eval mode, and whether din_fast's adapter
should take its fused path (din_attention) for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

B, T, E, UNITS = 4, 4, 2, [4, 2]
SEED = 2026


@dataclass
class Case:
    options: Callable[[], dict]
    mask: Optional[str]          # None, "bool", "float", "int" (0/1) or "weights" (any reals)
    mode: str                    # "train" or "eval"
    fused: bool
    attention_units: list = field(default_factory=lambda: list(UNITS))


def _options(**options):
    return lambda: dict(options)


CASES = {
    "relu": Case(_options(hidden_activations="ReLU"), "float", "eval", True),
    "sigmoid_softmax": Case(_options(hidden_activations="sigmoid", use_softmax=True),
                            "float", "eval", True),
    "prelu_softmax_unmasked": Case(_options(hidden_activations="prelu", use_softmax=True),
                                   None, "eval", True),
    "dice_eval": Case(_options(hidden_activations="dice"), "float", "eval", True),
    "dice_train_softmax": Case(_options(hidden_activations="dice", use_softmax=True),
                               "bool", "train", False),
    "relu_int_mask_train": Case(_options(hidden_activations="relu"), "int", "train", True),
    "output_activation_name": Case(_options(hidden_activations="ReLU", use_softmax=True,
                                            output_activation="Sigmoid"), "bool", "eval", False),
    "output_activation_module": Case(lambda: dict(hidden_activations="sigmoid",
                                                  output_activation=nn.Tanh()),
                                     "float", "train", False),
    "dropout_eval": Case(_options(hidden_activations=["relu", "relu"], dropout_rate=0.3),
                         "bool", "eval", True),
    "dropout_train": Case(_options(hidden_activations="ReLU", dropout_rate=0.3,
                                   use_softmax=True), "bool", "train", False),
    "dropout_list_train": Case(_options(hidden_activations="sigmoid", dropout_rate=[0.5, 0]),
                               "float", "train", False),
    "tanh": Case(_options(hidden_activations="tanh"), "bool", "train", False),
    "leakyrelu_elu_names": Case(_options(hidden_activations=["LeakyReLU", "ELU"],
                                         use_softmax=True), "float", "eval", False),
    "identity": Case(_options(hidden_activations="Identity"), "bool", "eval", False),
    "mixed_fused_kinds": Case(_options(hidden_activations=["relu", "sigmoid"]), "bool", "eval",
                              False),
    "module_instances": Case(lambda: dict(hidden_activations=[nn.LeakyReLU(0.2), nn.SiLU()],
                                          use_softmax=True), "bool", "train", False),
    "relu_modules": Case(lambda: dict(hidden_activations=[nn.ReLU(), "relu"]), "bool", "eval",
                         True),
    "shared_prelu_instance": Case(lambda: dict(hidden_activations=nn.PReLU(),
                                               use_softmax=True), "bool", "train", True),
    "no_activation_in_a_layer": Case(_options(hidden_activations=[None, "sigmoid"]),
                                     "bool", "eval", False),
    "no_hidden_layer": Case(_options(use_softmax=True), "bool", "train", False,
                            attention_units=[]),
    "no_hidden_layer_output_activation": Case(_options(output_activation="Sigmoid"), "float",
                                              "eval", False, attention_units=[]),
    "batch_norm_eval_relu": Case(_options(batch_norm=True, use_softmax=True), "bool", "eval",
                                 True),
    "batch_norm_eval_dice": Case(_options(batch_norm=True, hidden_activations="dice"), "float",
                                 "eval", True),
    "batch_norm_train_prelu": Case(_options(batch_norm=True, hidden_activations="prelu"),
                                   "bool", "train", False),
    "dice_dropout_train": Case(_options(hidden_activations="dice", dropout_rate=0.2,
                                        use_softmax=True), "float", "train", False),
    "weighted_mask_softmax": Case(_options(use_softmax=True), "weights", "eval", False),
    "weighted_mask": Case(_options(hidden_activations="sigmoid"), "weights", "train", False),
}


def make_inputs() -> dict:
    """The inputs every case shares: a full row, an empty one, a prefix, a
    pattern that is not a prefix."""
    generator = torch.Generator().manual_seed(SEED)
    valid = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]],
                         dtype=torch.bool)
    return dict(target_item=torch.randn(B, E, generator=generator, dtype=torch.float64),
                history_sequence=torch.randn(B, T, E, generator=generator, dtype=torch.float64),
                valid=valid,
                weights=torch.tensor([[1.0, 0.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0],
                                      [0.25, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]]))


def case_mask(case: Case, inputs: dict):
    valid = inputs["valid"]
    return {None: None, "bool": valid, "float": valid.double(), "int": valid.long(),
            "weights": inputs["weights"].double()}[case.mask]


def random_state(layer: nn.Module, generator: torch.Generator) -> dict:
    """Random float64 values for every state_dict entry (BatchNorm variances
    positive), in the state_dict's order."""
    state = {}
    for name, tensor in layer.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = tensor.clone()
        elif name.endswith("running_var"):
            state[name] = torch.rand(tensor.shape, generator=generator, dtype=torch.float64) + 0.5
        else:
            state[name] = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    return state


def run_case(layer_cls, name: str, inputs: dict, state: Optional[dict] = None):
    """Build ``layer_cls`` with the case's options, load ``state`` (random
    when None), run forward and backward of sum(output * cotangent) with the
    global RNG seeded (dropout), and return (state, results): the output, the
    gradients and the state_dict after the forward."""
    case = CASES[name]
    layer = layer_cls(embedding_dim=E, attention_units=list(case.attention_units),
                      **case.options()).double()
    generator = torch.Generator().manual_seed(SEED + sorted(CASES).index(name))
    cotangent = torch.randn(B, E, generator=generator, dtype=torch.float64)
    if state is None:
        state = random_state(layer, generator)
    layer.load_state_dict(state, strict=True)
    layer.train(case.mode == "train")
    target = inputs["target_item"].clone().requires_grad_()
    history = inputs["history_sequence"].clone().requires_grad_()
    torch.manual_seed(SEED)
    output = layer(target, history, mask=case_mask(case, inputs))
    (output * cotangent).sum().backward()
    results = {"output": output.detach(),
               "grads/target_item": target.grad, "grads/history_sequence": history.grad}
    results.update({f"grads/{n}": p.grad for n, p in layer.named_parameters()})
    results.update({f"state_dict_after/{n}": t.clone()
                    for n, t in layer.state_dict().items()})
    return state, results
