"""The torch backend's kept activations (din_fast.chunked.KeptActivations): a
call that autograd will differentiate keeps each block's scores and hidden
activations for its backward, within chunking.kept_activations_bytes
(DIN_FAST_KEEP_ACTIVATIONS_MB), all or nothing from the shapes alone; its
outputs and gradients are those of recomputing them, to the bit, for every
activation, normalization, masking and budget of blocks; inference keeps
nothing; a backward that runs twice, or two forwards before one backward,
read what is theirs."""

import pytest
import torch

import din_fast
from din_fast import chunked, chunking
from din_fast.chunking import KEEP_ACTIVATIONS_ENV, working_set
from helpers import DEVICE, call_din_attention, make_case, on_device, run_case
from test_chunked import BUDGETS, HIDDEN, budget, first_layer, unit_size  # noqa: F401 (a fixture)


@pytest.fixture
def kept(monkeypatch):
    """Per KeptActivations.of call, whether the blocks found kept activations
    (forward: written, backward: read)."""
    found = []
    original = chunked.KeptActivations.of.__func__

    def spy(cls, *args, **kwargs):
        result = original(cls, *args, **kwargs)
        found.append(result is not None)
        return result
    monkeypatch.setattr(chunked.KeptActivations, "of", classmethod(spy))
    return found


def both_ways(monkeypatch, run):
    """(run() recomputing, run() keeping), under the environment variable."""
    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, "0")
    recomputed = run()
    monkeypatch.delenv(KEEP_ACTIVATIONS_ENV)
    return recomputed, run()


def assert_same_bits(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


CASES = [  # (B, C, T, masking, normalization, activation, value_dim, dtype)
    (5, None, 1, "lengths", None, "sigmoid", None, torch.float32),    # T = 1, an empty row
    (4, 3, 11, "mask", "softmax", "prelu", 2, torch.float64),
    (3, 2, 7, None, "softmax", "dice", None, torch.float32),
    (6, 1, 8, "lengths", "softmax", "relu", 3, torch.float64),
    (4, 5, 40, "lengths", None, "dice", None, torch.float32),
]


@pytest.mark.parametrize("kind", BUDGETS + ("default",))
@pytest.mark.parametrize("batch,candidates,length,masking,normalization,activation,value_dim,"
                         "dtype", CASES)
def test_kept_equals_recomputed(monkeypatch, kept, first_layer, kind, batch, candidates, length,
                                masking, normalization, activation, value_dim, dtype):
    """Outputs, scores and every gradient (the scores' own too), bitwise, the
    first layer folded or shared: blocks
    of whole rows, of one row in spans and candidate chunks (the activations
    kept across them), and of one pair (more blocks than the shapes' bound
    has room for: nothing kept, recomputed)."""
    case = on_device(make_case(batch, candidates, length, 4, HIDDEN, activation=activation,
                               normalization=normalization, masking=masking,
                               value_dim=value_dim, dtype=dtype, scale=0.7, seed=3))
    unit = unit_size(HIDDEN, 4, value_dim, activation, dtype)
    nbytes = None if kind == "default" else budget(kind, unit, candidates or 1, length)

    def run():
        kept.clear()
        if nbytes is None:
            return run_case(case, "torch")
        with working_set(nbytes):
            return run_case(case, "torch")
    recomputed, kept_run = both_ways(monkeypatch, run)
    assert_same_bits(kept_run, recomputed)
    # The forward wrote them and the backward read them, or neither: blocks
    # of a few pairs may find no room in the bound (the alignment of one
    # block per (row, candidate) and MIN_SPAN positions).
    assert len(kept) == 2 and kept[0] == kept[1]
    assert kept[0] or kind in ("pair", "span")


def test_kept_across_spans_and_candidate_chunks(monkeypatch, kept):
    """One row of 600 positions in spans of at least MIN_SPAN, its candidates
    in chunks: kept, and bitwise the recomputed."""
    case = make_case(2, 6, 600, 4, HIDDEN, normalization="softmax", masking=None, seed=9)
    unit = unit_size(HIDDEN, 4, None, "sigmoid", torch.float32)
    nbytes = unit.element_size * unit.footprint(True).elements(1, 2, 300)

    def run():
        kept.clear()
        with working_set(nbytes):
            return run_case(case, "torch")
    recomputed, kept_run = both_ways(monkeypatch, run)
    assert_same_bits(kept_run, recomputed)
    assert kept == [True, True]


def test_jagged_kept_equals_recomputed(monkeypatch, kept):
    """A jagged batch keeps within its rows padded to max_len."""
    lengths = torch.tensor([4, 0, 9, 1, 0, 6])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(DEVICE)
    case = make_case(6, 3, 9, 4, HIDDEN, normalization="softmax", dtype=torch.float32, seed=4)
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(int(lengths.sum()), 4, generator=generator).to(DEVICE)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in
                  (case["query"], keys, *case["weights"], *case["biases"])]
        query, history, *params = leaves
        pooled, scores = din_fast.din_attention_jagged(
            query, history, offsets, 9, weights=params[:3], biases=params[3:],
            normalization="softmax", return_scores=True, backend="torch")
        grads = torch.autograd.grad((pooled * 0.3).sum() + scores.square().sum(), leaves)
        return {"pooled": pooled, "scores": scores,
                **{f"grad {i}": g for i, g in enumerate(grads)}}
    recomputed, kept_run = both_ways(monkeypatch, run)
    assert_same_bits(kept_run, recomputed)
    assert kept[-2:] == [True, True]


def test_inference_keeps_nothing(kept):
    """No grad mode, or no input that requires grad: nothing kept."""
    case = make_case(4, 2, 9, 4, HIDDEN, seed=5)
    with torch.no_grad():
        call_din_attention(case, "torch")
    call_din_attention(case, "torch")
    assert kept == [False, False]
    case["query"].requires_grad_()
    call_din_attention(case, "torch")
    assert kept[-1]


def test_over_the_budget_keeps_nothing(monkeypatch, kept):
    """All or nothing: the shapes' bound over DIN_FAST_KEEP_ACTIVATIONS_MB keeps
    nothing, within it everything; what is saved for the backward stays
    within the budget."""
    case = make_case(64, 8, 64, 4, (16, 8), seed=6)        # bound 64*8*64*25 floats: 3.3 MB
    case["query"].requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor
    for mib, keeps in (("1", False), ("4", True)):
        monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, mib)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pooled, _ = call_din_attention(case, "torch")
        assert kept[-1] == keeps
        assert max(saved) <= (int(mib) << 20 if keeps else case["keys"].numel() * 4)
        pooled.sum().backward()


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", "64MB"])
def test_environment_variable_refuses_a_bad_value(monkeypatch, value):
    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, value)
    with pytest.raises(ValueError, match=f"{KEEP_ACTIVATIONS_ENV} must be a whole number of "
                                         f"MiB >= 0.*got '{value}'"):
        chunking.kept_activations_bytes()
    case = make_case(2, 1, 3, 4, HIDDEN)
    case["query"].requires_grad_()
    with pytest.raises(ValueError, match=KEEP_ACTIVATIONS_ENV):
        call_din_attention(case, "torch")


def test_environment_variable_read_at_each_call(monkeypatch):
    monkeypatch.delenv(KEEP_ACTIVATIONS_ENV, raising=False)
    assert chunking.kept_activations_bytes() == chunking.KEPT_ACTIVATIONS_BYTES == 64 << 20
    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, " 7 ")
    assert chunking.kept_activations_bytes() == 7 << 20
    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, "")
    assert chunking.kept_activations_bytes() == 64 << 20


def test_backward_twice_and_two_graphs_at_once(kept):
    """retain_graph: a second backward reads the same kept activations (the
    backward never writes them); two forwards before one backward each keep
    their own (the second never takes the first's storage); and a third
    forward after both, which may take one, agrees."""
    case = make_case(5, 2, 12, 4, HIDDEN, normalization="softmax", seed=7)
    query = case.pop("query").requires_grad_()

    def loss():
        pooled = din_fast.din_attention(query, case["keys"], case["lengths"], backend="torch",
                                        **{k: v for k, v in case.items()
                                           if k not in ("keys", "lengths")})
        return (pooled * torch.linspace(-1, 1, pooled.shape[-1])).sum()
    first = loss()
    once, = torch.autograd.grad(first, query, retain_graph=True)
    again, = torch.autograd.grad(first, query)
    assert torch.equal(once, again)
    both, = torch.autograd.grad(loss() + loss(), query)
    torch.testing.assert_close(both, 2 * once, rtol=0, atol=0)
    later, = torch.autograd.grad(loss(), query)
    assert torch.equal(later, once)
    assert all(kept)


def test_compiled_training_keeps_and_matches_recomputed(monkeypatch, kept):
    """torch.compile(fullgraph=True) saves the kept activations through the
    op's fake (their size from the shapes) and gets the eager gradients."""
    case = make_case(6, 3, 11, 4, HIDDEN, normalization="softmax", seed=8)
    kwargs = {k: v for k, v in case.items() if k not in ("query", "keys", "lengths")}

    def step(query, keys, lengths):
        pooled = din_fast.din_attention(query, keys, lengths, backend="torch", **kwargs)
        return pooled.square().sum()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")

    def run(fn):
        query = case["query"].clone().requires_grad_()
        grad, = torch.autograd.grad(fn(query, case["keys"], case["lengths"]), query)
        return {"grad": grad}
    torch._dynamo.reset()
    recomputed, _ = both_ways(monkeypatch, lambda: run(step))
    kept.clear()
    assert_same_bits(run(compiled), recomputed)
    assert kept == [True, True]
