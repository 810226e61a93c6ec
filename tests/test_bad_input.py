"""Bad input at scale (SPEC section 4): Hypothesis builds a valid call, breaks
one argument (shape, dtype, device, range, type), and the call must raise
ValueError or TypeError whose message names that argument: never another
exception, never a result."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import din_fast
from din_fast.compat.deepctr import AttentionSequencePoolingLayer
from din_fast.compat.fuxictr import DIN_Attention

SETTINGS = settings(max_examples=int(__import__("os").environ.get("BAD_INPUT_EXAMPLES", 150)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# What a broken tensor becomes: another dtype, the meta device, another rank,
# another size of one of its dims, or not a tensor at all.
WRONG_DTYPES = (torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8)


def _breakages(tensor, data, allowed_dtypes=(), free_dims=(), optional=False):
    """``tensor`` broken one way; ``free_dims`` are dims any size of which is valid."""
    sized = [d for d in range(tensor.dim()) if d not in free_dims]
    kind = data.draw(st.sampled_from(["dtype", "device", "rank", "type"] + ["size"] * bool(sized)))
    if kind == "dtype":
        dtype = data.draw(st.sampled_from([d for d in WRONG_DTYPES + (torch.float64,)
                                           if d != tensor.dtype and d not in allowed_dtypes]))
        return tensor.to(dtype)
    if kind == "device":
        return tensor.to("meta")
    if kind == "rank":  # two more dims, or none: no argument takes either
        return tensor[None, None] if data.draw(st.booleans()) \
            else torch.zeros((), dtype=tensor.dtype)
    if kind == "size":
        dim = data.draw(st.sampled_from(sized))
        shape = list(tensor.shape)
        shape[dim] += data.draw(st.sampled_from([-1, 1, 2])) if shape[dim] > 1 else 1
        return torch.zeros(shape, dtype=tensor.dtype)
    # None only where the argument is required (None is a valid values/lengths/mask).
    return data.draw(st.sampled_from([None, 1.5, "tensor", [1, 2]][optional:])) \
        if not data.draw(st.booleans()) else tensor.tolist()


def _valid_call(data):
    batch = data.draw(st.integers(1, 4), "B")
    length = data.draw(st.integers(1, 5), "T")
    dim = data.draw(st.integers(1, 4), "D")
    hidden = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3), "hidden")
    activation = data.draw(st.sampled_from(["sigmoid", "relu", "prelu", "dice"]))
    candidates = data.draw(st.sampled_from([None, 1, 3]))
    widths = [4 * dim] + hidden + [1]
    call = dict(
        query=torch.randn((batch, dim) if candidates is None else (batch, candidates, dim)),
        keys=torch.randn(batch, length, dim),
        weights=[torch.randn(o, i) for i, o in zip(widths[:-1], widths[1:])],
        biases=[torch.randn(o) for o in widths[1:]],
        activation=activation,
        activation_params={"prelu": [torch.rand(h) for h in hidden],
                           "dice": [(torch.rand(h), torch.rand(h), torch.rand(h) + 1)
                                    for h in hidden]}.get(activation),
        normalization=data.draw(st.sampled_from([None, "softmax"])),
        backend=data.draw(st.sampled_from(["auto", "torch", "reference"])),
    )
    if data.draw(st.booleans()):
        call["values"] = torch.randn(batch, length, data.draw(st.integers(1, 3)))
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, length), min_size=batch,
                                              max_size=batch)))
    if data.draw(st.booleans()):
        call["lengths"] = lengths
    else:
        call["mask"] = torch.arange(length)[None, :] < lengths[:, None]
    return call


def _break_tensor_list(call, name, data):
    tensors = list(call[name])
    index = data.draw(st.integers(0, len(tensors) - 1))
    how = data.draw(st.sampled_from(["one", "drop", "extra"]))
    if how == "one":
        tensors[index] = _breakages(tensors[index], data, allowed_dtypes=(
            torch.float64,))  # float64 parameters are allowed
    elif how == "drop":
        del tensors[index]
    else:
        tensors.append(torch.randn(1))
    call[name] = tensors


def _break_activation_params(call, data):
    params = call["activation_params"]
    if params is None:
        call["activation_params"] = [torch.ones(3)]
        return
    params = list(params)
    index = data.draw(st.integers(0, len(params) - 1))
    if data.draw(st.booleans()):
        del params[index]
    elif isinstance(params[index], tuple):
        params[index] = params[index][:2]
    else:
        params[index] = torch.ones(params[index].shape[0] + 2)
    call["activation_params"] = params


def _break_range(call, data):
    """Lengths outside [0, T], or lengths and mask together."""
    length = call["keys"].shape[1]
    if "mask" in call:
        call["lengths"] = call["mask"].sum(1)
        return "lengths"
    lengths = call["lengths"].clone()
    lengths[data.draw(st.integers(0, lengths.shape[0] - 1))] = \
        data.draw(st.sampled_from([-1, length + 1, 10**6]))
    call["lengths"] = lengths
    return "lengths"


def _break_option(call, data):
    name = data.draw(st.sampled_from(["activation", "normalization", "scale", "backend",
                                      "dice_eps", "return_scores"]))
    call[name] = data.draw(st.sampled_from({
        "activation": ["gelu", "Sigmoid", None, 3, ["relu"]],
        "normalization": ["sparsemax", "", 1, True],
        "scale": [float("nan"), float("inf"), "1", True, None],
        "backend": ["cuda", "", None, "TORCH"],
        "dice_eps": [0.0, -1e-8, float("nan"), "1e-8"],
        "return_scores": ["yes", "False", 2, [True]],
    }[name]))
    return name


def _assert_names(error, *names):
    message = str(error.value)
    assert any(f"`{name}" in message for name in names), (names, message)


@SETTINGS
@given(st.data())
def test_din_attention_rejects_broken_arguments(data):
    call = _valid_call(data)
    target = data.draw(st.sampled_from(["query", "keys", "values", "lengths", "mask", "weights",
                                        "biases", "activation_params", "range", "option"]))
    if target in ("weights", "biases"):
        _break_tensor_list(call, target, data)
        names = (target,)
    elif target == "activation_params":
        _break_activation_params(call, data)
        names = (target,)
    elif target == "range":
        names = (_break_range(call, data),)
    elif target == "option":
        names = (_break_option(call, data),)
    else:
        present = target in call
        if not present and target in ("lengths", "mask"):
            target = "mask" if target == "lengths" else "lengths"
        if target == "values" and "values" not in call:
            call["values"] = torch.randn(call["keys"].shape[0] + 1, 2, 2)
        else:
            allowed = (torch.int32, torch.int64) if target == "lengths" else ()
            # Any number of candidates, any history length (lengths and mask
            # are checked against the keys), any value size is valid.
            free = {"query": (1,) if call["query"].dim() == 3 else (), "keys": (1,),
                    "values": (2,)}.get(target, ())
            call[target] = _breakages(call[target], data, allowed, free,
                                      optional=target in ("values", "lengths", "mask"))
        # A broken query or keys may be caught where another argument is checked
        # against it, so the message names the pair.
        names = {"query": ("query", "keys"), "keys": ("keys", "query")}.get(target, (target,))
    with pytest.raises((ValueError, TypeError)) as error:
        din_fast.din_attention(**call)
    _assert_names(error, *names)


@SETTINGS
@given(st.data())
def test_din_attention_jagged_rejects_broken_arguments(data):
    call = _valid_call(data)
    keys = call.pop("keys")
    lengths = call.pop("lengths", None)
    if lengths is None:
        lengths = call.pop("mask").sum(1)
    values = call.pop("values", None)
    call["keys_values"] = torch.cat([keys[b, :n] for b, n in enumerate(lengths.tolist())])
    if values is not None:
        call["values"] = torch.cat([values[b, :n] for b, n in enumerate(lengths.tolist())])
    call["offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    call["max_len"] = keys.shape[1]
    if call["backend"] == "auto":
        call["backend"] = "torch"

    target = data.draw(st.sampled_from(["query", "keys_values", "offsets", "max_len",
                                        "offsets_values", "option"]))
    names = (target,)
    if target == "offsets_values":
        offsets = call["offsets"].clone()
        how = data.draw(st.sampled_from(["first", "last", "decreasing", "too long"]))
        if how == "first":
            offsets[0] = 1
        elif how == "last":
            offsets[-1] += 1
        elif how == "decreasing":
            offsets = torch.cat([offsets[:1], offsets[-1:] + 1, offsets[1:]])
            call["query"] = torch.cat([call["query"], call["query"][:1]])
        else:
            call["max_len"] = int((offsets[1:] - offsets[:-1]).max()) - 1
            if call["max_len"] < 0:
                offsets[-1] += 1
        call["offsets"] = offsets
        names = ("offsets", "max_len")
    elif target == "max_len":
        call["max_len"] = data.draw(st.sampled_from([-1, 2.0, None, True, "5"]))
    elif target == "option":
        names = (_break_option(call, data),)
    else:
        free = (1,) if target == "query" and call["query"].dim() == 3 else ()
        allowed = (torch.int32,) if target == "offsets" else ()
        call[target] = _breakages(call[target], data, allowed_dtypes=allowed, free_dims=free)
        if target == "offsets" and isinstance(call[target], torch.Tensor) \
                and call[target].dim() == 1:
            names = ("offsets", "query")  # B + 1 entries no more matching the query
        elif target in ("query", "keys_values"):
            names = ("query", "keys_values")
    with pytest.raises((ValueError, TypeError)) as error:
        din_fast.din_attention_jagged(**call)
    _assert_names(error, *names)


@SETTINGS
@given(st.data())
def test_adapters_reject_broken_arguments(data):
    batch, length, dim = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), 2
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, length), min_size=batch,
                                              max_size=batch)))
    keys = torch.randn(batch, length, dim)
    if data.draw(st.booleans()):
        masking = data.draw(st.booleans())
        layer = AttentionSequencePoolingLayer(att_hidden_units=(3,), embedding_dim=dim,
                                              supports_masking=masking)
        call = dict(query=torch.randn(batch, 1, dim), keys=keys, keys_length=lengths[:, None],
                    mask=torch.arange(length)[None, :] < lengths[:, None])
        targets = ["query", "keys", "mask" if masking else "keys_length"]
        pairs = {"query": ("query", "keys"), "keys": ("keys", "query")}
    else:
        layer = DIN_Attention(embedding_dim=dim, attention_units=[3],
                              use_softmax=data.draw(st.booleans()))
        call = dict(target_item=torch.randn(batch, dim), history_sequence=keys,
                    mask=(torch.arange(length)[None, :] < lengths[:, None]).float())
        targets = ["target_item", "history_sequence", "mask"]
        pairs = {"target_item": ("target_item", "history_sequence"),
                 "history_sequence": ("history_sequence", "target_item")}
    target = data.draw(st.sampled_from(targets))
    if target == "mask" and isinstance(layer, AttentionSequencePoolingLayer) \
            and data.draw(st.booleans()):
        call["mask"] = call["mask"].float()  # DeepCTR-Torch's mask is bool
    else:
        # The peers read keys_length of any real dtype and FuxiCTR's mask of any.
        real = (torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8)
        allowed = real if target == "keys_length" else (torch.bool,) + real \
            if isinstance(layer, DIN_Attention) and target == "mask" else ()
        free = (1,) if target in ("keys", "history_sequence") else ()
        call[target] = _breakages(call[target], data, allowed, free,
                                  optional=target == "mask" and isinstance(layer, DIN_Attention))
        # DeepCTR-Torch reads keys_length.view(-1, 1): any shape of B elements or of one.
        assume(target != "keys_length" or not isinstance(call[target], torch.Tensor)
               or call[target].dtype == torch.bool or call[target].numel() not in (1, batch))
    with pytest.raises((ValueError, TypeError)) as error:
        layer(**call)
    _assert_names(error, *pairs.get(target, (target,)))


def test_return_scores_must_be_a_bool_on_every_entry_point():
    # A string reached the ops' schema (need_scores: bool) as an internal
    # RuntimeError on the torch and triton backends, and meant True on the reference.
    query, keys, lengths = torch.randn(2, 3), torch.randn(2, 4, 3), torch.tensor([4, 1])
    unit = dict(weights=[torch.randn(5, 12), torch.randn(1, 5)],
                biases=[torch.randn(5), torch.randn(1)], return_scores="yes", backend="torch")
    calls = {
        "din_attention": lambda: din_fast.din_attention(query, keys, lengths, **unit),
        "din_attention_jagged": lambda: din_fast.din_attention_jagged(
            query, keys[0], torch.tensor([0, 3, 4]), 4, **unit),
        "din_attention_top_k": lambda: din_fast.din_attention_top_k(
            query, keys, lengths, top_k=2, **unit),
        "DINAttention": lambda: din_fast.DINAttention(3, (5,), return_scores="yes"),
    }
    for owner, call in calls.items():
        with pytest.raises(TypeError, match=f"^{owner}: `return_scores` must be True or False; "
                                            "got str 'yes'"):
            call()
    # What equals a bool is one (NumPy's bools, 0 and 1), as before.
    pooled, scores = din_fast.din_attention(query, keys, lengths, **dict(unit, return_scores=1))
    assert scores.shape == (2, 4)
