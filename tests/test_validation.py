"""SPEC section 4: every bad input raises ValueError/TypeError naming the argument."""

import pytest
import torch

import din_fast
from helpers import make_case


def call(case, **overrides):
    args = dict(case)
    args.update(overrides)
    query, keys, lengths = args.pop("query"), args.pop("keys"), args.pop("lengths")
    return din_fast.din_attention(query, keys, lengths, **args)


@pytest.fixture
def case():
    return make_case(3, None, 5, 4, (6, 2), normalization="softmax")


BAD_INPUTS = [  # (description, overrides as a function of the case, error type, argument named)
    ("keys rank", lambda c: dict(keys=c["keys"][0]), ValueError, "keys"),
    ("query rank", lambda c: dict(query=c["query"][0]), ValueError, "query"),
    ("query 4-D", lambda c: dict(query=c["query"][:, None, None]), ValueError, "query"),
    ("query D mismatch", lambda c: dict(query=c["query"][:, :3]), ValueError, "query"),
    ("query batch mismatch", lambda c: dict(query=c["query"][:2]), ValueError, "query"),
    ("weights D mismatch", lambda c: dict(weights=[torch.zeros(6, 12)] + c["weights"][1:]),
     ValueError, "weights[0]"),
    ("hidden width mismatch", lambda c: dict(weights=c["weights"][:1] + [torch.zeros(2, 5)]
                                              + c["weights"][2:]), ValueError, "weights[1]"),
    ("output layer not one unit", lambda c: dict(weights=c["weights"][:2] + [torch.zeros(2, 2)]),
     ValueError, "weights[2]"),
    ("bias shape", lambda c: dict(biases=[torch.zeros(5)] + c["biases"][1:]),
     ValueError, "biases[0]"),
    ("too few biases", lambda c: dict(biases=c["biases"][:2]), ValueError, "biases"),
    ("no hidden layer", lambda c: dict(weights=[torch.zeros(1, 16)], biases=[torch.zeros(1)]),
     ValueError, "weights"),
    ("weights not a list", lambda c: dict(weights=c["weights"][0]), TypeError, "weights"),
    ("lengths float", lambda c: dict(lengths=c["lengths"].float()), TypeError, "lengths"),
    ("lengths shape", lambda c: dict(lengths=c["lengths"][:, None]), ValueError, "lengths"),
    ("lengths above T", lambda c: dict(lengths=torch.tensor([1, 6, 2])), ValueError, "lengths"),
    ("lengths negative", lambda c: dict(lengths=torch.tensor([1, -1, 2])), ValueError,
     "lengths"),
    ("lengths and mask", lambda c: dict(mask=torch.ones(3, 5, dtype=torch.bool)), ValueError,
     "mask"),
    ("mask not bool", lambda c: dict(lengths=None, mask=torch.ones(3, 5)), TypeError, "mask"),
    ("mask shape", lambda c: dict(lengths=None, mask=torch.ones(3, 4, dtype=torch.bool)),
     ValueError, "mask"),
    ("query dtype", lambda c: dict(query=c["query"].double()), TypeError, "query"),
    ("values dtype", lambda c: dict(values=torch.zeros(3, 5, 2, dtype=torch.float64)),
     TypeError, "values"),
    ("values shape", lambda c: dict(values=torch.zeros(3, 4, 2)), ValueError, "values"),
    ("integer keys", lambda c: dict(keys=torch.zeros(3, 5, 4, dtype=torch.long)), TypeError,
     "keys"),
    ("weights integer", lambda c: dict(weights=[w.long() for w in c["weights"]]), TypeError,
     "weights[0]"),
    ("device mismatch", lambda c: dict(query=c["query"].to("meta")), ValueError, "query"),
    ("unknown activation", lambda c: dict(activation="tanh"), ValueError, "activation"),
    ("unknown normalization", lambda c: dict(normalization="sum"), ValueError, "normalization"),
    ("unknown backend", lambda c: dict(backend="cuda"), ValueError, "backend"),
    ("scale not a number", lambda c: dict(scale="1"), TypeError, "scale"),
    ("scale infinite", lambda c: dict(scale=float("inf")), ValueError, "scale"),
    ("scale beyond float64", lambda c: dict(scale=10**400), ValueError, "scale"),
    ("scale beyond float32", lambda c: dict(scale=-1e39), ValueError, "scale"),
    ("prelu without params", lambda c: dict(activation="prelu"), ValueError,
     "activation_params"),
    ("prelu wrong count", lambda c: dict(activation="prelu", activation_params=[torch.ones(6)]),
     ValueError, "activation_params"),
    ("prelu wrong width", lambda c: dict(activation="prelu",
                                         activation_params=[torch.ones(6), torch.ones(3)]),
     ValueError, "activation_params[1]"),
    ("dice not triples", lambda c: dict(activation="dice",
                                        activation_params=[torch.ones(6), torch.ones(2)]),
     ValueError, "activation_params[0]"),
    ("sigmoid with params", lambda c: dict(activation_params=[torch.ones(6), torch.ones(2)]),
     ValueError, "activation_params"),
    ("dice_eps zero", lambda c: dict(dice_eps=0.0), ValueError, "dice_eps"),
    ("dice variance below -eps",
     lambda c: dict(activation="dice", activation_params=[
         (torch.ones(6), torch.zeros(6), torch.tensor([1.0, 1, 1, -2e-8, 1, 1])),
         (torch.ones(2), torch.zeros(2), torch.ones(2))]),
     ValueError, "activation_params[0][2] (var)"),
    ("dice variance NaN",
     lambda c: dict(activation="dice", activation_params=[
         (torch.ones(6), torch.zeros(6), torch.ones(6)),
         (torch.ones(2), torch.zeros(2), torch.tensor([float("nan"), 1.0]))]),
     ValueError, "activation_params[1][2] (var)"),
]


@pytest.mark.parametrize("description,overrides,error,argument", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(case, description, overrides, error, argument):
    with pytest.raises(error) as info:
        call(case, **overrides(case))
    assert f"`{argument}`" in str(info.value), str(info.value)


def test_triton_on_cpu_without_interpreter_says_why(case, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton"):
        call(case, backend="triton", keys=case["keys"].double(), query=case["query"].double())


def test_backend_environment_override(case, monkeypatch):
    expected = call(case, backend="reference")
    monkeypatch.setenv("DIN_FAST_BACKEND", "reference")
    assert torch.equal(call(case), expected)
    monkeypatch.setenv("DIN_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DIN_FAST_BACKEND"):
        call(case)
