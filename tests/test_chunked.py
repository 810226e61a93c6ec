"""The torch backend in blocks (din_fast.chunking, din_fast.chunked): any
working-set budget and either form of the first layer (folded per
candidate, or shared) give the same outputs, scores and gradients (several
rows per block, one row in position spans and candidate chunks, one pair
per block), short rows and long, padding stays invisible, jagged histories
too; the plan keeps every block's working set, the folded M included,
within the budget; without kept activations (test_kept_activations) the
forward keeps nothing per position for the backward, and the memory of a
call stays bounded by the budget (and the kept activations' bound), not
by B * C * T."""

import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import din_fast
from din_fast.chunking import (KEEP_ACTIVATIONS_ENV, UnitSize, kept_bound, kept_widths, plan,
                               working_set, working_set_bytes)
from helpers import DEVICE, assert_matches_reference, call_din_attention, make_case, run_case
from test_padding import POISONS, assert_padding_ignored
from test_sizes import check_against_reference, sized_case

HIDDEN = (6, 3)
# Budgets: one pair per block; one row in spans of a few positions and
# candidate chunks; a few whole rows per block.
BUDGETS = ("pair", "span", "rows")


def unit_size(hidden, dim, value_dim=None, activation="sigmoid", dtype=torch.float64,
              device=DEVICE) -> UnitSize:
    return UnitSize(tuple(hidden), dim, value_dim or 0, activation in ("prelu", "dice"),
                    torch.empty((), dtype=dtype).element_size(), torch.device(device))


def budget(kind: str, unit: UnitSize, candidates: int, length: int) -> int:
    """The working set, in bytes, that makes blocks of ``kind`` for rows of
    ``length`` positions against ``candidates`` candidates, whatever the
    form of their first layer."""
    if kind == "pair":
        return 1
    rows, candidates, span = (1, 1, 3) if kind == "span" else (3, candidates, length)
    return unit.element_size * max(unit.footprint(folded).elements(rows, candidates, span)
                                   for folded in (True, False))


def case_budget(kind: str, case) -> int:
    query, keys, values = case["query"], case["keys"], case.get("values")
    unit = unit_size([w.shape[0] for w in case["weights"][:-1]], keys.shape[-1],
                     None if values is None else values.shape[-1], case["activation"],
                     keys.dtype)
    return budget(kind, unit, query.shape[1] if query.dim() == 3 else 1, keys.shape[1])


@pytest.fixture(params=["folded", "shared"])
def first_layer(request, monkeypatch):
    """Every group's first layer in one form, whatever the plan would choose."""
    folded = request.param == "folded"
    monkeypatch.setattr(UnitSize, "folds", lambda self, length, candidates: folded)
    return request.param


CASES = [  # (B, C, T, masking, normalization, activation, value_dim)
    (5, None, 9, "lengths", None, "sigmoid", None),
    (4, 3, 11, "mask", "softmax", "prelu", 2),
    (3, 2, 7, None, "softmax", "dice", None),
    (6, 1, 8, "lengths", "softmax", "relu", 3),
]


@pytest.mark.parametrize("kind", BUDGETS)
@pytest.mark.parametrize("batch,candidates,length,masking,normalization,activation,value_dim",
                         CASES)
def test_any_budget_matches_reference(kind, batch, candidates, length, masking, normalization,
                                      activation, value_dim, first_layer):
    """Outputs, scores and every gradient (through the scores too) in float64."""
    case = make_case(batch, candidates, length, 4, HIDDEN, activation=activation,
                     normalization=normalization, masking=masking, value_dim=value_dim,
                     dtype=torch.float64, scale=0.6, seed=BUDGETS.index(kind))
    with working_set(case_budget(kind, case)):
        assert_matches_reference(case, "torch")


@pytest.mark.parametrize("kind", [None, "span", "rows"])
@pytest.mark.parametrize("length", [1, 2])
@pytest.mark.parametrize("candidates,normalization,activation",
                         [(None, None, "sigmoid"), (3, "softmax", "prelu")])
def test_short_rows_in_blocks(kind, length, candidates, normalization, activation, first_layer):
    """Histories of one or two positions and many rows (groups of hundreds
    of rows under the default budget, of a few under "rows", one row and
    one candidate at a time under "span"): float64, equal to the reference."""
    case = make_case(300, candidates, length, 4, HIDDEN, activation=activation,
                     normalization=normalization, dtype=torch.float64, scale=0.6, seed=length)
    with working_set(case_budget(kind, case)) if kind else contextlib.nullcontext():
        assert_matches_reference(case, "torch")


@pytest.mark.parametrize("kind", ["span", "rows"])
def test_strided_inputs_in_blocks(kind, first_layer):
    """Keys and query with the feature axis outermost in memory: a block of
    whole rows reads the keys as a strided window of them."""
    case = make_case(6, 3, 5, 4, HIDDEN, masking=None, dtype=torch.float64, seed=11)
    for name in ("query", "keys"):
        case[name] = case[name].transpose(1, 2).contiguous().transpose(1, 2)
    with working_set(case_budget(kind, case)):
        assert_matches_reference(case, "torch")


def test_zero_embedding_size_in_blocks(first_layer):
    """D = 0: every score is b_1's image, in either form of the first layer."""
    check_against_reference(sized_case(3, 2, 4, None, torch.float64, dim=0), "torch")


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_budgets_agree_in_float32(normalization, first_layer):
    """float32: one pair per block, one row per block and the default give the
    same results to rounding (the online softmax rescales across spans)."""
    case = make_case(4, 5, 30, 8, (10, 5), normalization=normalization, seed=3)
    default = run_case(case, "torch")
    for kind in BUDGETS:
        with working_set(case_budget(kind, case)):
            blocked = run_case(case, "torch")
        for name, want in default.items():
            torch.testing.assert_close(blocked[name], want, rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", BUDGETS)
def test_padding_ignored_in_blocks(kind, first_layer):
    @settings(max_examples=4, deadline=None)
    @given(st.sampled_from(POISONS), st.sampled_from(["lengths", "mask"]),
           st.sampled_from([None, "softmax"]), st.integers(0, 2 ** 16))
    def check(poison, masking, normalization, seed):
        case = make_case(4, 2, 9, 3, HIDDEN, normalization=normalization, masking=masking,
                         value_dim=2, dtype=torch.float64, seed=seed)
        with working_set(case_budget(kind, case)):
            assert_padding_ignored(case, poison, lambda c: (call_din_attention(c, "torch"), []))
    check()


@pytest.mark.parametrize("kind", BUDGETS)
@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_jagged_in_blocks(kind, normalization, first_layer):
    """Jagged histories with empty rows: equal to the reference on the padded
    histories, outputs, scores and gradients."""
    generator = torch.Generator().manual_seed(BUDGETS.index(kind))
    lengths = torch.tensor([4, 0, 9, 1, 0, 6])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    case = make_case(6, 3, 9, 4, HIDDEN, normalization=normalization, value_dim=2,
                     dtype=torch.float64, seed=BUDGETS.index(kind))
    query, weights, biases = case["query"], case["weights"], case["biases"]
    keys = torch.randn(int(offsets[-1]), 4, generator=generator, dtype=torch.float64)
    values = torch.randn(keys.shape[0], 2, generator=generator, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in [query, keys, values, *weights, *biases]]
    options = dict(weights=weights, biases=biases, normalization=normalization, scale=0.8,
                   return_scores=True)
    with working_set(budget(kind, unit_size(HIDDEN, 4, 2), 3, 9)):
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


@pytest.mark.parametrize("kind", ["span", "rows"])
def test_plan_covers_every_pair_once(kind):
    """Rows longest first, the empty ones left out; grouped rows whole, a long
    row split into spans and candidate chunks within the budget."""
    counts = torch.tensor([3, 0, 50, 7, 7, 1])
    unit = unit_size(HIDDEN, 4)
    with working_set(budget(kind, unit, 4, 7)):
        groups = plan(counts, 4, unit)
    seen = {}
    for group in groups:
        for chunk in group.candidate_chunks(4):
            for span in group.spans():
                for row, count in zip(group.rows.tolist(), group.counts.tolist()):
                    for c in range(chunk.start, chunk.stop):
                        for t in range(span.start, min(span.stop, count)):
                            seen[row, c, t] = seen.get((row, c, t), 0) + 1
    expected = {(b, c, t) for b, n in enumerate(counts.tolist()) for c in range(4)
                for t in range(n)}
    assert set(seen) == expected and set(seen.values()) == {1}
    assert groups[0].rows.tolist() == [2]
    assert groups[0].span < 50 or groups[0].candidate_step < 4
    assert all(g.counts.min() > 0 for g in groups)
    assert (kind == "rows") == any(len(g.rows) > 1 for g in groups)


PLANNED = [  # (B, C, T, D, hidden, dtype)
    (4000, 1, 1, 64, (80, 40), torch.float32),     # thousands of rows a group, unless M counts
    (4000, 1, 4, 64, (80, 40), torch.float32),
    (1024, 1, 100, 64, (80, 40), torch.float32),   # the training shape
    (1, 512, 10000, 64, (80, 40), torch.float32),  # the serving shape
    (500, 20, 100, 64, (80, 40), torch.float32),
    (64, 3, 300, 256, (200, 80), torch.float64),
    (7, 1000, 2, 16, (32, 16, 8), torch.float16),
]


@pytest.mark.parametrize("form", ["planned", "folded", "shared"])
@pytest.mark.parametrize("nbytes", [None, 64 << 10, 1])
@pytest.mark.parametrize("batch,candidates,length,dim,hidden,dtype", PLANNED)
def test_plan_holds_every_block_within_the_budget(form, nbytes, batch, candidates, length, dim,
                                                   hidden, dtype, monkeypatch):
    """The working set of each block of the plan (its pairs' activations, the
    folded M of its candidates with its gradient and a product of its size,
    its keys and their gradients) fits the budget, but for a block of one
    pair, the least there is. M on its own checked too: 3 * H1 * D per
    (row, candidate) of a folded block."""
    if form != "planned":
        monkeypatch.setattr(UnitSize, "folds", lambda self, length, candidates: form == "folded")
    generator = torch.Generator().manual_seed(batch)
    counts = torch.randint(0, length + 1, (batch,), generator=generator)
    counts[0] = length
    unit = unit_size(hidden, dim, dtype=dtype, device="cpu")
    with working_set(nbytes) if nbytes else working_set(working_set_bytes(unit.device)):
        groups = plan(counts, candidates, unit)
        limit = working_set_bytes(unit.device)
    assert sum(len(g.rows) for g in groups) == int((counts > 0).sum())
    for group in groups:
        # The largest block of the group (its working set grows with each size).
        rows = len(group.rows)
        chunk = min(group.candidate_step, candidates)
        span = min(group.span, group.length)
        if (rows, chunk, span) == (1, 1, 1):
            continue
        elements = unit.footprint(group.folded).elements(rows, chunk, span)
        assert elements * unit.element_size <= limit, (group.length, rows, chunk, span)
        if group.folded:
            assert 3 * rows * chunk * hidden[0] * dim * unit.element_size <= limit


def test_default_budget_by_device():
    """4 MiB on CPU, 256 MiB on CUDA; working_set overrides both."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert working_set_bytes(cpu) == 4 << 20 and working_set_bytes(cuda) == 256 << 20
    with working_set(12345):
        assert working_set_bytes(cpu) == working_set_bytes(cuda) == 12345
    assert working_set_bytes(cuda) == 256 << 20


@pytest.mark.parametrize("normalization", [None, "softmax"])
def test_forward_saves_nothing_per_position(normalization, monkeypatch):
    """What autograd keeps between forward and backward where the activations
    are not kept (DIN_FAST_KEEP_ACTIVATIONS_MB=0; test_kept_activations
    bounds them otherwise): the inputs, the pooled output and two statistics
    per (row, candidate); never a tensor of B * C * T pairs."""
    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, "0")
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


@pytest.mark.parametrize("kept_mib", [0, 64])
def test_memory_bounded_by_the_budget(kept_mib, monkeypatch):
    """One row of T = 3000 positions against 64 candidates: scoring every pair
    at once would hold 3000 * 64 * (8 + 4) floats (9 MB) per layer pass;
    the blocks stay within a 1 MiB working set plus the inputs' size,
    forward and backward, plus the kept activations' (their bound, 10 MB)
    where kept."""
    from benchmarks.peak_memory import PeakMemory

    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, str(kept_mib))
    kept_bytes = 4 * kept_bound(1, 64, 3000, kept_widths((8, 4), "sigmoid"), 4) if kept_mib else 0

    case = make_case(1, 64, 3000, 8, (8, 4), masking=None, seed=2)
    for name in ("query", "keys"):
        case[name].requires_grad_()
    inputs_bytes = sum(case[name].numel() * 4 for name in ("query", "keys"))
    with working_set(1 << 20), PeakMemory() as memory:
        pooled = din_fast.din_attention(case.pop("query"), case.pop("keys"),
                                        case.pop("lengths"), backend="torch", **case)
        pooled.sum().backward()
    assert memory.peak_bytes < (1 << 20) + 3 * inputs_bytes + kept_bytes


@pytest.mark.parametrize("length", [1, 4])
def test_memory_of_short_rows_bounded_by_the_budget(length, first_layer, monkeypatch):
    """2,000 rows of one to four positions, forward and backward, the
    activations recomputed: the blocks' allocations, the folded M [80, 64]
    of each row included, stay within the default budget plus the inputs'
    size (M for every row of a group of thousands would be tens of MB)."""
    from benchmarks.peak_memory import PeakMemory

    monkeypatch.setenv(KEEP_ACTIVATIONS_ENV, "0")

    case = make_case(2000, None, length, 64, (80, 40), seed=5)
    for name in ("query", "keys"):
        case[name].requires_grad_()
    inputs_bytes = sum(case[name].numel() * 4 for name in ("query", "keys"))
    with PeakMemory() as memory:
        pooled = din_fast.din_attention(case.pop("query"), case.pop("keys"),
                                        case.pop("lengths"), backend="torch", **case)
        pooled.sum().backward()
    assert memory.peak_bytes < working_set_bytes(torch.device("cpu")) + 3 * inputs_bytes


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
