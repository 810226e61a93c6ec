"""The torch backend in blocks (din_fast.chunking, din_fast.chunked): any
working-set budget gives the same outputs, scores and gradients (several
rows per block, one row in position spans and candidate chunks, one pair
per block), padding stays invisible, jagged histories too; the forward
keeps nothing per position for the backward, and the memory of a call
stays bounded by the budget, not by B * C * T."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import din_fast
from din_fast.chunking import pair_bytes, plan, working_set
from helpers import DEVICE, assert_matches_reference, call_din_attention, make_case, run_case
from test_padding import POISONS, assert_padding_ignored

HIDDEN = (6, 3)
# Budgets in pairs per block: one pair; a few (one row in spans and
# candidate chunks); enough for whole rows, grouped.
PAIRS = (1, 5, 40)


def budget(pairs: int, dtype=torch.float64, hidden=HIDDEN) -> int:
    return pairs * pair_bytes(hidden, torch.empty((), dtype=dtype).element_size())


CASES = [  # (B, C, T, masking, normalization, activation, value_dim)
    (5, None, 9, "lengths", None, "sigmoid", None),
    (4, 3, 11, "mask", "softmax", "prelu", 2),
    (3, 2, 7, None, "softmax", "dice", None),
    (6, 1, 8, "lengths", "softmax", "relu", 3),
]


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("batch,candidates,length,masking,normalization,activation,value_dim",
                         CASES)
def test_any_budget_matches_reference(pairs, batch, candidates, length, masking, normalization,
                                      activation, value_dim):
    """Outputs, scores and every gradient (through the scores too) in float64."""
    case = make_case(batch, candidates, length, 4, HIDDEN, activation=activation,
                     normalization=normalization, masking=masking, value_dim=value_dim,
                     dtype=torch.float64, scale=0.6, seed=pairs)
    with working_set(budget(pairs)):
        assert_matches_reference(case, "torch")


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_budgets_agree_in_float32(normalization):
    """float32: one pair per block, one row per block and the default give the
    same results to rounding (the online softmax rescales across spans)."""
    case = make_case(4, 5, 30, 8, (10, 5), normalization=normalization, seed=3)
    default = run_case(case, "torch")
    for pairs in (1, 7, 33):
        with working_set(budget(pairs, torch.float32, (10, 5))):
            blocked = run_case(case, "torch")
        for name, want in default.items():
            torch.testing.assert_close(blocked[name], want, rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("pairs", PAIRS)
def test_padding_ignored_in_blocks(pairs):
    @settings(max_examples=4, deadline=None)
    @given(st.sampled_from(POISONS), st.sampled_from(["lengths", "mask"]),
           st.sampled_from([None, "softmax"]), st.integers(0, 2 ** 16))
    def check(poison, masking, normalization, seed):
        case = make_case(4, 2, 9, 3, HIDDEN, normalization=normalization, masking=masking,
                         value_dim=2, dtype=torch.float64, seed=seed)
        with working_set(budget(pairs)):
            assert_padding_ignored(case, poison, lambda c: (call_din_attention(c, "torch"), []))
    check()


@pytest.mark.parametrize("pairs", PAIRS)
@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_jagged_in_blocks(pairs, normalization):
    """Jagged histories with empty rows: equal to the reference on the padded
    histories, outputs, scores and gradients."""
    generator = torch.Generator().manual_seed(pairs)
    lengths = torch.tensor([4, 0, 9, 1, 0, 6])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    case = make_case(6, 3, 9, 4, HIDDEN, normalization=normalization, value_dim=2,
                     dtype=torch.float64, seed=pairs)
    query, weights, biases = case["query"], case["weights"], case["biases"]
    keys = torch.randn(int(offsets[-1]), 4, generator=generator, dtype=torch.float64)
    values = torch.randn(keys.shape[0], 2, generator=generator, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in [query, keys, values, *weights, *biases]]
    options = dict(weights=weights, biases=biases, normalization=normalization, scale=0.8,
                   return_scores=True)
    with working_set(budget(pairs)):
        pooled, scores = din_fast.din_attention_jagged(query, keys, offsets, 9, values=values,
                                                       backend="torch", **options)
    rows = torch.repeat_interleave(torch.arange(6), lengths)
    columns = torch.arange(keys.shape[0]) - offsets[rows]
    padded_keys = keys.new_zeros(6, 9, 4).index_put((rows, columns), keys)
    padded_values = values.new_zeros(6, 9, 2).index_put((rows, columns), values)
    want_pooled, want_scores = din_fast.din_attention(query, padded_keys, lengths,
                                                      values=padded_values,
                                                      backend="reference", **options)
    want_scores = want_scores[rows, :, columns]
    probe = torch.randn(pooled.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad((pooled * probe).sum() + scores.square().sum(), leaves)
    want = torch.autograd.grad((want_pooled * probe).sum() + want_scores.square().sum(), leaves)
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_plan_covers_every_pair_once():
    """Rows longest first, the empty ones left out; grouped rows whole, a long
    row split into spans and candidate chunks within the budget."""
    counts = torch.tensor([3, 0, 50, 7, 7, 1])
    groups = plan(counts, candidates=4, pairs=40)
    seen = {}
    for group in groups:
        for chunk in group.candidate_chunks(4):
            for span in group.spans():
                assert len(group.rows) * (span.stop - span.start) * (chunk.stop - chunk.start) \
                    <= max(40, len(group.rows) * group.length * 4)
                for row, count in zip(group.rows.tolist(), group.counts.tolist()):
                    for c in range(chunk.start, chunk.stop):
                        for t in range(span.start, min(span.stop, count)):
                            seen[row, c, t] = seen.get((row, c, t), 0) + 1
    expected = {(b, c, t) for b, n in enumerate(counts.tolist()) for c in range(4)
                for t in range(n)}
    assert set(seen) == expected and set(seen.values()) == {1}
    assert [g.rows.tolist() for g in groups][0] == [2]
    assert all(g.counts.min() > 0 for g in groups)


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_forward_saves_nothing_per_position(normalization):
    """What autograd keeps between forward and backward: the inputs, the
    pooled output and two statistics per (row, candidate); never a tensor
    of B * C * T pairs."""
    case = make_case(3, 4, 20, 5, (7, 3), normalization=normalization)
    case["query"].requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pooled = din_fast.din_attention(case.pop("query"), case.pop("keys"),
                                        case.pop("lengths"), backend="torch", **case)
    pooled.sum().backward()
    largest_input = 3 * 20 * 5
    assert saved and all(t.numel() <= max(largest_input, pooled.numel()) for t in saved)


def test_memory_bounded_by_the_budget():
    """One row of T = 3000 positions against 64 candidates: scoring every pair
    at once would hold 3000 * 64 * (8 + 4) floats (9 MB) per layer pass;
    the blocks stay within a 1 MiB working set plus the inputs' size,
    forward and backward."""
    from benchmarks.peak_memory import PeakMemory

    case = make_case(1, 64, 3000, 8, (8, 4), masking=None, seed=2)
    for name in ("query", "keys"):
        case[name].requires_grad_()
    inputs_bytes = sum(case[name].numel() * 4 for name in ("query", "keys"))
    with working_set(1 << 20), PeakMemory() as memory:
        pooled = din_fast.din_attention(case.pop("query"), case.pop("keys"),
                                        case.pop("lengths"), backend="torch", **case)
        pooled.sum().backward()
    assert memory.peak_bytes < (1 << 20) + 3 * inputs_bytes


def test_working_set_refuses_a_bad_budget():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="`nbytes` must be a positive int"):
            with working_set(bad):
                pass


def test_triton_launchers_allocate_nothing_per_pair():
    """The fused kernels' launchers (forward, and the fused backward) allocate
    the outputs, per-(row, candidate) statistics and per-program partial sums:
    no tensor as large as one float per (candidate, position) pair."""
    from benchmarks.peak_memory import PeakMemory

    if DEVICE != "cpu":
        pytest.skip("the count is of CPU tensors (the kernels in the interpreter)")

    class LargestStorage(PeakMemory):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    self.largest = max(self.largest, tensor.untyped_storage().nbytes())
            return out

    case = make_case(1, 32, 48, 4, (8, 4), normalization="softmax", masking=None, seed=4)
    for name in ("query", "keys"):
        case[name].requires_grad_()
    with LargestStorage() as memory:
        pooled = din_fast.din_attention(case.pop("query"), case.pop("keys"),
                                        case.pop("lengths"), backend="triton", **case)
        pooled.sum().backward()
    assert 0 < memory.largest < 32 * 48 * 4
