"""DINAttention: parameters in nn.Linear layout, backends, Dice statistics."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import din_fast
from helpers import backend_settings


def _inputs(batch=6, candidates=None, length=7, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, dim) if candidates is None else (batch, candidates, dim)
    query = torch.randn(shape, generator=gen, dtype=torch.float64)
    keys = torch.randn(batch, length, dim, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (batch,), generator=gen)
    lengths[0], lengths[1] = 0, length
    return query, keys, lengths


def _literal_dice_training(layer, query, keys, lengths):
    """Dice with batch statistics over the valid positions, written out plainly."""
    q = query[:, None, :] if query.dim() == 2 else query
    candidates, length = q.shape[1], keys.shape[1]
    q_b = q[:, :, None, :].expand(-1, -1, length, -1)
    k_b = keys[:, None].expand(-1, candidates, -1, -1)
    h = torch.cat([q_b, k_b, q_b - k_b, q_b * k_b], dim=-1)
    valid = (torch.arange(length)[None, :] < lengths[:, None])[:, None, :].expand(
        -1, candidates, -1)
    stats = []
    for linear, alpha in zip(layer.hidden, layer.alphas):
        z = linear(h)
        picked = z[valid]
        mu, var = picked.mean(0), picked.var(0, unbiased=False)
        stats.append((mu, picked.var(0, unbiased=True)))
        p = torch.sigmoid((z - mu) / torch.sqrt(var + layer.dice_eps))
        h = p * z + (1 - p) * alpha * z
    s = layer.output(h).squeeze(-1)
    w = torch.where(valid, s, torch.zeros_like(s))
    out = w @ keys
    return (out.squeeze(1) if query.dim() == 2 else out), stats


@pytest.mark.parametrize("candidates", [None, 3])
def test_dice_training_uses_valid_positions_and_updates_running_stats(candidates):
    query, keys, lengths = _inputs(candidates=candidates)
    layer = din_fast.DINAttention(5, (6, 4), activation="dice").double()
    with torch.no_grad():
        for alpha in layer.alphas:
            alpha.uniform_(-0.5, 0.5)
    expected, stats = _literal_dice_training(layer, query, keys, lengths)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(layer.parameters()))

    layer.train()
    out = layer(query, keys, lengths)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    for i, (mu, unbiased_var) in enumerate(stats):
        torch.testing.assert_close(getattr(layer, f"running_mean_{i}"), 0.1 * mu.detach())
        torch.testing.assert_close(getattr(layer, f"running_var_{i}"),
                                   0.9 + 0.1 * unbiased_var.detach())


def test_dice_eval_uses_running_stats():
    query, keys, lengths = _inputs()
    layer = din_fast.DINAttention(5, (6,), activation="dice").double()
    layer.running_mean_0.uniform_(-1, 1)
    layer.running_var_0.uniform_(0.5, 2)
    layer.eval()
    out = layer(query, keys, lengths)
    expected = din_fast.din_attention(
        query, keys, lengths, weights=[layer.hidden[0].weight, layer.output.weight],
        biases=[layer.hidden[0].bias, layer.output.bias], activation="dice",
        activation_params=[(layer.alphas[0], layer.running_mean_0, layer.running_var_0)],
        backend="reference")
    torch.testing.assert_close(out, expected)
    before = layer.running_mean_0.clone()
    layer(query, keys, lengths)
    assert torch.equal(layer.running_mean_0, before)


def test_dice_training_batch_of_empty_histories_keeps_running_stats():
    query, keys, _ = _inputs()
    layer = din_fast.DINAttention(5, (6,), activation="dice").double().train()
    out = layer(query, keys, torch.zeros(6, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(layer.running_mean_0, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(layer.running_var_0, torch.ones(6, dtype=torch.float64))


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice"])
@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_module_backends_agree(activation, normalization):
    query, keys, lengths = _inputs(candidates=2)
    layer = din_fast.DINAttention(5, (7, 3), activation=activation, normalization=normalization,
                                  scale=0.5, return_scores=True).double().eval()
    results = {}
    for backend in ("reference", "torch"):
        layer.backend = backend
        out, scores = layer(query, keys, lengths)
        grads = torch.autograd.grad(out.sum() + scores.square().sum(), list(layer.parameters()))
        results[backend] = (out, scores, grads)
    torch.testing.assert_close(results["torch"][:2], results["reference"][:2])
    for g, e in zip(results["torch"][2], results["reference"][2]):
        torch.testing.assert_close(g, e)


def test_parameters_in_linear_layout():
    layer = din_fast.DINAttention(8, (80, 40), activation="prelu")
    names = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert names == {"hidden.0.weight": (80, 32), "hidden.0.bias": (80,),
                     "hidden.1.weight": (40, 80), "hidden.1.bias": (40,),
                     "output.weight": (1, 40), "output.bias": (1,),
                     "alphas.0": (80,), "alphas.1": (40,)}


@pytest.mark.parametrize("kwargs,argument", [
    (dict(embed_dim=0), "embed_dim"),
    (dict(embed_dim=4, hidden_units=()), "hidden_units"),
    (dict(embed_dim=4, hidden_units=(3, 0)), "hidden_units"),
    (dict(embed_dim=4, activation="gelu"), "activation"),
])
def test_bad_constructor_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        din_fast.DINAttention(**kwargs)


def test_resolved_backend_names_what_runs(monkeypatch):
    monkeypatch.delenv("DIN_FAST_BACKEND", raising=False)
    layer = din_fast.DINAttention(5, (6,), activation="dice")
    assert layer.resolved_backend() == "torch"  # training-mode Dice, whatever the backend
    layer.eval()
    expected = "triton" if torch.cuda.is_available() else "torch"
    assert layer.to("cuda" if torch.cuda.is_available() else "cpu").resolved_backend() == expected
    monkeypatch.setenv("DIN_FAST_BACKEND", "reference")
    assert layer.resolved_backend() == "reference"
    assert din_fast.DINAttention(5, backend="torch").resolved_backend() == "torch"


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "dice"])
def test_forward_jagged_matches_forward_on_padding(activation, training):
    """The layer on jagged histories (TorchRec's layout) scores what it scores
    on the same histories padded, in both modes: training-mode Dice's batch
    statistics (and running statistics) and the gradients included."""
    torch.manual_seed(0)
    layers = [din_fast.DINAttention(4, (6, 3), activation, normalization="softmax",
                                    return_scores=True).train(training) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    query, keys = torch.randn(3, 2, 4, requires_grad=True), torch.randn(3, 5, 4)
    lengths = torch.tensor([5, 0, 2])
    valid = torch.arange(5) < lengths[:, None]
    offsets = torch.tensor([0, 5, 5, 7])
    jagged_keys = keys[valid].requires_grad_()
    pooled, scores = layers[0].forward_jagged(query, jagged_keys, offsets, 5)
    want_pooled, want_scores = layers[1](query, keys.requires_grad_(), lengths)
    torch.testing.assert_close(pooled, want_pooled)
    torch.testing.assert_close(scores, want_scores.transpose(1, 2)[valid])
    torch.testing.assert_close(layers[0].state_dict(), layers[1].state_dict())
    grads = torch.autograd.grad(pooled.sum() + scores.sum(), (query, jagged_keys))
    want = torch.autograd.grad(want_pooled.sum() + want_scores.sum(), (query, keys))
    torch.testing.assert_close(grads[0], want[0])
    torch.testing.assert_close(grads[1], want[1][valid])


@st.composite
def jagged_batches(draw):
    """A training batch for forward_jagged: its lengths (empty rows, a batch
    of empty rows, one row), a 2-D or 3-D query, values or not, 1 or 2 layers."""
    lengths = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    return dict(lengths=lengths, candidates=draw(st.sampled_from([None, 1, 3])),
                dim=draw(st.integers(1, 4)), value_dim=draw(st.sampled_from([None, 2])),
                hidden=tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))),
                max_len=max(lengths) + draw(st.integers(0, 2)),
                return_scores=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@backend_settings("torch")
@given(jagged_batches())
def test_forward_jagged_dice_training_properties(batch):
    """Training-mode Dice on jagged rows, over sizes and layouts: the outputs,
    running statistics and every gradient (query, keys, values, parameters)
    are those of the padded forward on the same rows, whose padding holds NaN."""
    gen = torch.Generator().manual_seed(batch["seed"])
    lengths = torch.tensor(batch["lengths"])
    rows, width, max_len = len(batch["lengths"]), batch["dim"], batch["max_len"]
    value_dim = batch["value_dim"]
    layers = [din_fast.DINAttention(width, batch["hidden"], "dice", normalization="softmax",
                                    return_scores=batch["return_scores"]).double().train()
              for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    shape = (rows, width) if batch["candidates"] is None else (rows, batch["candidates"], width)
    query = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.arange(max_len) < lengths[:, None]

    def jagged_and_padded(dim):
        jagged = torch.randn(int(lengths.sum()), dim, generator=gen, dtype=torch.float64)
        padded = torch.full((rows, max_len, dim), float("nan"), dtype=torch.float64)
        padded[valid] = jagged
        return jagged.requires_grad_(), padded.requires_grad_()

    keys, padded_keys = jagged_and_padded(width)
    values, padded_values = jagged_and_padded(value_dim) if value_dim else (None, None)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    got = layers[0].forward_jagged(query, keys, offsets, max_len, values=values)
    want = layers[1](query, padded_keys, lengths, values=padded_values)
    if batch["return_scores"]:
        scores = want[1] if want[1].dim() == 2 else want[1].transpose(1, 2)
        want = (want[0], scores[valid])
    else:
        got, want = (got,), (want,)
    for output, expected in zip(got, want):
        torch.testing.assert_close(output, expected)
    torch.testing.assert_close(layers[0].state_dict(), layers[1].state_dict())
    loss = sum(output.sum() for output in got)
    want_loss = sum(output.sum() for output in want)
    histories = [(keys, padded_keys)] + ([(values, padded_values)] if value_dim else [])
    ours = [query, *(jagged for jagged, _ in histories), *layers[0].parameters()]
    theirs = [query, *(padded for _, padded in histories), *layers[1].parameters()]
    grads = torch.autograd.grad(loss, ours)
    want_grads = list(torch.autograd.grad(want_loss, theirs))
    for index in range(1, 1 + len(histories)):      # the padded histories' rows
        assert torch.equal(want_grads[index][~valid], torch.zeros_like(want_grads[index][~valid]))
        want_grads[index] = want_grads[index][valid]
    for grad, expected in zip(grads, want_grads):
        torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("option,value", [
    ("activation", "tanh"), ("normalization", "sparsemax"), ("scale", float("nan")),
    ("scale", "2"), pytest.param("scale", 10**400, id="scale-10**400"), ("backend", "cuda"), ("dice_eps", 0.0), ("momentum", 1.5),
    ("momentum", True)])
def test_bad_options_fail_at_construction(option, value):
    """A bad option is named when the layer is built, not at its first forward."""
    with pytest.raises((ValueError, TypeError), match=rf"DINAttention: `{option}`"):
        din_fast.DINAttention(4, (5,), **{option: value})


@pytest.mark.parametrize("jagged", [False, True])
def test_loaded_dice_variance_below_minus_eps_is_named(jagged):
    """A running_var corrupted through load_state_dict would make every score
    NaN: the eval forward names it instead."""
    layer = din_fast.DINAttention(5, (6, 3), activation="dice").double().eval()
    state = layer.state_dict()
    state["running_var_1"] = torch.tensor([1.0, -0.5, 1.0], dtype=torch.float64)
    layer.load_state_dict(state)
    query, keys, lengths = _inputs()
    with pytest.raises(ValueError, match=r"`activation_params\[1\]\[2\] \(var\)` must be "
                                         r"greater than -dice_eps = -1e-08.*got -0\.5"):
        if jagged:
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            layer.forward_jagged(query, keys.flatten(0, 1)[:int(offsets[-1])], offsets, 7)
        else:
            layer(query, keys, lengths)
