"""Two-stage attention (SPEC section 6): din_attention_top_k and DINAttention(top_k=...).

Every backend against the literal gather-then-attend oracle
(din_fast.reference_top_k) in float64, outputs and every gradient; the
selection rule (ties to the more recent position, K past the history, empty
rows, masks); padding; the fused search kernel's launch variants against the
torch selection; the module, its "dot" projections and training-mode Dice.
"""

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import din_fast
from din_fast import search as search_module
from din_fast.ctr.checkpoint import load_checkpoint, restored_model
from din_fast.ctr.cli import main
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.problem import validate
from din_fast.reference_top_k import ranked_positions
from din_fast.search import project, select, validate_search
from cli_data import one_torch_thread, write_csv  # noqa: F401 (a fixture)
from helpers import (DEVICE, ZERO_GRAD_ATOL, backend_settings, get_slot, leaf_copy, make_case,
                     map_tensors, on_device, outputs_and_grads, relative_error, tensor_slots,
                     tolerance)

FAST_BACKENDS = ("torch", "triton")


def top_k_case(batch, candidates, length, dim, hidden, *, search, top_k, seed=0,
               projection=3, categories=3, **options):
    """make_case plus the two-stage arguments; on DEVICE."""
    case = make_case(batch, candidates, length, dim, hidden, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed + 1)
    case.update(top_k=top_k, search=search)
    if search == "dot":
        case["search_params"] = tuple(
            torch.randn(projection, dim, generator=gen, dtype=torch.float64).to(
                case["keys"].dtype) for _ in range(2))
    if search == "category":
        case["query_categories"] = torch.randint(0, categories, case["query"].shape[:-1],
                                                 generator=gen)
        case["key_categories"] = torch.randint(0, categories, (batch, length), generator=gen)
    return on_device(case)


def call(case, backend):
    kwargs = dict(case)
    return din_fast.din_attention_top_k(kwargs.pop("query"), kwargs.pop("keys"),
                                        kwargs.pop("lengths"), return_scores=True,
                                        backend=backend, **kwargs)


def results(case, backend):
    """[pooled, weights, then the gradient of every floating input] under a fixed loss."""
    case, leaves = leaf_copy(case)
    return outputs_and_grads(list(call(case, backend)), leaves)


def assert_matches_oracle(case, backend):
    """Outputs and gradients of ``backend`` against the oracle in float64."""
    dtype = case["keys"].dtype
    actual = results(case, backend)
    expected = results(map_tensors(case, lambda t: t.double()), "reference")
    for i, (act, exp) in enumerate(zip(actual, expected)):
        assert act.shape == exp.shape, f"result {i}: shape {act.shape} != {exp.shape}"
        if exp.norm() <= 1e-12:
            assert act.double().norm() <= ZERO_GRAD_ATOL[dtype], f"result {i}: should be ~0"
            continue
        bound = tolerance(dtype, gradients=i >= 2 and backend == "triton")
        assert relative_error(act, exp) <= bound, f"result {i}: {relative_error(act, exp)}"
    return actual


def gradient(case, found, name):
    """The gradient of ``case[name]`` among results(case, ...)."""
    floats = [slot[0] for slot in tensor_slots(case) if get_slot(case, slot).is_floating_point()]
    return found[2 + floats.index(name)]


def selected(case) -> torch.Tensor:
    """[B, C, T] bool: the oracle's selection (ranked_positions, a Python sort)."""
    kwargs = {k: v for k, v in case.items() if k not in (
        "top_k", "search", "search_params", "query_categories", "key_categories")}
    problem = validate(kwargs.pop("query"), kwargs.pop("keys"), kwargs.pop("lengths"),
                       mask=kwargs.pop("mask", None), values=kwargs.pop("values", None),
                       dice_eps=1e-8, **kwargs)
    search = validate_search(problem, case["top_k"], case["search"], case.get("search_params"),
                             case.get("query_categories"), case.get("key_categories"))
    mask = torch.zeros(*problem.query.shape[:2], problem.keys.shape[1], dtype=torch.bool)
    for b, row in enumerate(ranked_positions(problem, search)):
        for c, chosen in enumerate(row):
            mask[b, c, chosen] = True
    return mask.to(DEVICE)


# ------------------------------------------------------------------ against the oracle

@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("search,candidates,normalization,masking,activation", [
    ("din", 3, "softmax", "lengths", "sigmoid"),
    ("din", None, None, "mask", "dice"),
    ("dot", 2, "softmax", "mask", "prelu"),
    ("dot", None, None, None, "relu"),
    ("category", 3, None, "lengths", "sigmoid"),
    ("category", None, "softmax", "mask", "dice"),
])
def test_matches_oracle(backend, search, candidates, normalization, masking, activation):
    case = top_k_case(3, candidates, 11, 5, (6, 3), search=search, top_k=4,
                      normalization=normalization, masking=masking, activation=activation,
                      value_dim=3 if search == "dot" else None, scale=0.7, seed=2)
    actual = assert_matches_oracle(case, backend)
    weights = actual[1] if candidates else actual[1][:, None]
    assert not (weights != 0)[~selected(case)].any()


@pytest.mark.parametrize("backend,search", [
    ("torch", "din"), ("torch", "dot"), ("torch", "category"), ("reference", "din"),
    ("triton", "dot")])
def test_at_most_k_valid_positions_is_exact_din(backend, search):
    # K >= T: every valid position is kept and the result is din_attention's.
    case = top_k_case(3, 2, 6, 4, (5,), search=search, top_k=9, normalization="softmax",
                      masking="mask", value_dim=2)
    exact = {k: v for k, v in case.items() if k not in (
        "top_k", "search", "search_params", "query_categories", "key_categories")}
    two_stage = results(case, backend)
    exact_case, leaves = leaf_copy(exact)
    reference = outputs_and_grads(list(din_fast.din_attention(
        exact_case.pop("query"), exact_case.pop("keys"), exact_case.pop("lengths"),
        return_scores=True, backend=backend, **exact_case)), leaves)
    for i, (a, e) in enumerate(zip(two_stage, reference)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=f"result {i}")


# ------------------------------------------------------------------ the selection rule

@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
@pytest.mark.parametrize("search", ["din", "dot", "category"])
def test_ties_go_to_the_more_recent_position(backend, search):
    # Every key the same: every score ties, so the K latest valid positions win.
    case = top_k_case(3, 2, 7, 4, (5,), search=search, top_k=3, normalization="softmax",
                      masking="lengths", categories=1)
    case["keys"] = case["keys"][:, :1].expand(-1, 7, -1)
    case["lengths"] = torch.tensor([0, 4, 7], device=DEVICE)
    weights = call(case, backend)[1]
    kept = [[t for t in range(7) if weights[b, 0, t] != 0] for b in range(3)]
    assert kept == [[], [1, 2, 3], [4, 5, 6]]
    assert torch.equal(weights[:, 0] != 0, weights[:, 1] != 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_k_of_one_keeps_the_best_and_category_tops_up_with_recent_others(backend):
    case = top_k_case(2, 3, 9, 4, (5,), search="din", top_k=1, normalization="softmax",
                      masking="lengths")
    weights = call(case, backend)[1]                # row 0 is empty, row 1 full
    assert torch.equal(weights != 0, selected(case))
    assert torch.equal((weights != 0).sum(-1), torch.tensor([[0] * 3, [1] * 3], device=DEVICE))
    # Category: the matching positions first (the latest of them), then the latest others.
    case = top_k_case(1, None, 6, 4, (5,), search="category", top_k=3,
                      normalization="softmax", masking=None)
    case["query_categories"] = torch.tensor([1], device=DEVICE)
    case["key_categories"] = torch.tensor([[1, 0, 1, 0, 0, 2]], device=DEVICE)
    weights = call(case, backend)[1]
    assert [t for t in range(6) if weights[0, t] != 0] == [0, 2, 5]


@pytest.mark.parametrize("backend", FAST_BACKENDS + ("reference",))
def test_empty_rows_and_sizes(backend):
    # Rows without a valid position pool to zeros; B, C and T of 0 keep their shapes;
    # every input gets a gradient, zero (the reference's too, with no (row,
    # candidate) pair at all).
    for batch, candidates, length in ((3, 2, 5), (0, 2, 5), (2, 0, 5), (2, 3, 0)):
        case = top_k_case(batch, candidates, length, 4, (5,), search="din", top_k=2,
                          normalization="softmax", masking="mask", value_dim=3)
        if batch:
            case["mask"] = torch.zeros_like(case["mask"])
        out, weights, *grads = results(case, backend)
        assert out.shape == (batch, candidates, 3) and weights.shape == (batch, candidates,
                                                                         length)
        assert not out.any() and not weights.any()
        assert not any(grad.any() for grad in grads)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("search", ["din", "dot"])
def test_padding_never_read(backend, search):
    # NaN at every invalid position of keys and values: exactly the zero-padded
    # results, zero gradients there and at every valid position not selected.
    case = top_k_case(3, 2, 9, 4, (5,), search=search, top_k=3, normalization="softmax",
                      masking="lengths", value_dim=2, seed=5)
    invalid = torch.arange(9, device=DEVICE)[None, :] >= case["lengths"][:, None]
    clean = results(dict(case, keys=case["keys"].masked_fill(invalid[..., None], 0.0),
                         values=case["values"].masked_fill(invalid[..., None], 0.0)), backend)
    dirty = results(dict(case, keys=case["keys"].masked_fill(invalid[..., None], float("nan")),
                         values=case["values"].masked_fill(invalid[..., None], float("nan"))),
                    backend)
    for i, (d, c) in enumerate(zip(dirty, clean)):
        assert torch.equal(d, c), f"result {i}"
    grad_keys, grad_values = (gradient(case, dirty, name) for name in ("keys", "values"))
    unselected = ~selected(case).any(1)                       # [B, T]: no candidate kept it
    assert not grad_keys[unselected].any() and not grad_values[unselected].any()
    assert unselected[~invalid].any()                         # some valid ones are not kept


def test_torch_selection_in_chunks(monkeypatch):
    # A running top K over chunks of 5 positions selects what one chunk does.
    case = top_k_case(2, 3, 23, 4, (5,), search="dot", top_k=4, masking="mask", seed=3)
    problem = validate(case["query"], case["keys"], None, weights=case["weights"],
                       biases=case["biases"], activation="sigmoid", activation_params=None,
                       mask=case["mask"], normalization=None, scale=1.0, values=None,
                       dice_eps=1e-8)
    search = validate_search(problem, 4, "dot", case["search_params"], None, None)
    whole = select(problem, search, "torch")
    monkeypatch.setattr(search_module, "MIN_CHUNK", 5)
    monkeypatch.setattr(search_module, "CHUNK_ELEMENTS", 1)
    chunked = select(problem, search, "torch")
    assert torch.equal(whole.positions, chunked.positions)
    assert torch.equal(whole.counts, chunked.counts)


# ------------------------------------------------------------------ the fused search kernel

@pytest.mark.parametrize("search,candidates,length,top_k,splits", [
    ("din", 2, 70, 20, 3),         # positions split over programs, merged on the host
    ("dot", 17, 40, 5, None),      # 16 candidates per program: the tensor-core product
    ("category", 2, 90, 40, None),  # K wider than a tile: the tile widened to the top-M
])
def test_search_kernel_variants(search, candidates, length, top_k, splits):
    from din_fast.kernels.din_search import din_search

    case = top_k_case(2, candidates, length, 8, (16,), search=search, top_k=top_k,
                      masking="mask", seed=7)
    if search == "din":      # ties among repeated keys, too
        case["keys"] = case["keys"][:, :5].repeat(1, length // 5, 1)
    problem = validate(case["query"], case["keys"], None, weights=case["weights"],
                       biases=case["biases"], activation="sigmoid", activation_params=None,
                       mask=case["mask"], normalization=None, scale=1.0, values=None,
                       dice_eps=1e-8)
    search_ = validate_search(problem, top_k, search, case.get("search_params"),
                              case.get("query_categories"), case.get("key_categories"))
    expected = select(problem, search_, "torch")
    projected = None if search != "dot" else project(problem.query, problem.keys,
                                                     search_.projections, torch.float32)
    positions, counts = din_search(problem, search, top_k, projected, search_.categories,
                                   num_splits=splits)
    assert torch.equal(counts, expected.counts)
    kept = expected.slot_valid()
    assert torch.equal(positions[kept], expected.positions[kept])


def test_search_kernel_skips_only_tiles_that_cannot_enter():
    # One candidate: tiles of 128 positions. The first tile all matches (its
    # keys fill the running top), the second matches nowhere (skipped: no key
    # beats the 128th best), the third matches at 290 (merged, it is the best).
    case = top_k_case(1, None, 300, 4, (5,), search="category", top_k=3,
                      normalization="softmax", masking=None)
    categories = torch.zeros(1, 300, dtype=torch.long, device=DEVICE)
    categories[0, :128] = categories[0, 290] = 1
    case.update(query_categories=torch.ones(1, dtype=torch.long, device=DEVICE),
                key_categories=categories)
    weights = call(case, "triton")[1]
    assert (weights[0] != 0).nonzero().flatten().tolist() == [126, 127, 290]


# ------------------------------------------------------------------ property

@given(data=st.data())
@backend_settings("triton", factor=0.5)
def test_property_matches_oracle(data):
    # "category" and integer-valued "dot" scores are exact in every dtype, so
    # the selection is the oracle's whatever the rounding of stage two.
    search = data.draw(st.sampled_from(["category", "dot"]))
    candidates = data.draw(st.sampled_from([None, 1, 3]))
    length = data.draw(st.integers(0, 8))
    case = top_k_case(data.draw(st.integers(1, 3)), candidates, length,
                      data.draw(st.integers(1, 5)), (data.draw(st.integers(1, 6)),),
                      search=search, top_k=data.draw(st.integers(1, 9)),
                      normalization=data.draw(st.sampled_from([None, "softmax"])),
                      masking=data.draw(st.sampled_from(["lengths", "mask", None])),
                      value_dim=data.draw(st.sampled_from([None, 2])),
                      seed=data.draw(st.integers(0, 2 ** 16)),
                      categories=data.draw(st.integers(1, 3)))
    if search == "dot":
        case["search_params"] = tuple(p.round() for p in case["search_params"])
        case["query"], case["keys"] = case["query"].round(), case["keys"].round()
    for backend in FAST_BACKENDS:
        assert_matches_oracle(case, backend)


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("change,message", [
    (dict(top_k=0), "`top_k` must be a positive int"),
    (dict(search="cosine"), "`search` must be one of"),
    (dict(search="dot"), "`search_params` for search='dot' must be"),
    (dict(search="dot", search_params=(torch.ones(3, 4), torch.ones(3, 5))),
     "must be a float tensor [P, 4]"),
    (dict(search="category"), "`query_categories` must be an integer tensor"),
    (dict(search="category", query_categories=torch.zeros(2, 3, dtype=torch.long),
          key_categories=torch.zeros(2, 6, dtype=torch.long)), "`query_categories` must have"),
    (dict(search_params=(torch.ones(3, 4), torch.ones(3, 4))), "is for search='dot'"),
])
def test_bad_arguments_are_named(change, message):
    case = top_k_case(2, None, 6, 4, (5,), search="din", top_k=2)
    case.update(change)
    with pytest.raises((TypeError, ValueError), match="din_attention_top_k: ") as error:
        call(case, "torch")
    assert message in str(error.value)


def test_triton_refuses_a_search_past_its_kernel():
    case = top_k_case(2, None, 6, 4, (5,), search="din", top_k=1025)
    with pytest.raises(ValueError, match="backend='triton' cannot run this search: top_k is "
                                         "1025; the fused search selects at most 1024"):
        call(case, "triton")


# ------------------------------------------------------------------ the module

def test_module_two_stage_and_its_projections():
    torch.manual_seed(0)
    layer = din_fast.DINAttention(4, (6, 3), normalization="softmax", top_k=3, search="dot",
                                  search_dim=2).double()
    query, keys = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 8, 4,
                                                                         dtype=torch.float64)
    lengths = torch.tensor([0, 5, 8])
    out = layer(query, keys, lengths)
    functional = din_fast.din_attention_top_k(
        query, keys, lengths, top_k=3, search="dot", search_params=layer.search_params(),
        **{k: v for k, v in layer._functional_kwargs().items() if k != "mask"})
    torch.testing.assert_close(out, functional)
    # The selection has no gradient: the main output does not reach the projections;
    # SIM's auxiliary logits do, and nothing else (query and keys are detached).
    out.sum().backward()
    assert layer.search_query.weight.grad is None and layer.hidden[0].weight.grad is not None
    layer.zero_grad()
    query.requires_grad_()
    logits = layer.search_logits(query, keys, lengths)
    assert logits.shape == (3, 2) and logits[0].eq(0).all()     # an empty row: logit 0
    logits.sum().backward()
    assert layer.search_query.weight.grad.abs().sum() > 0 and query.grad is None
    assert layer.hidden[0].weight.grad is None
    with pytest.raises(ValueError, match="`top_k` must be None or a positive int"):
        din_fast.DINAttention(4, top_k=0)
    with pytest.raises(ValueError, match="give `top_k` too"):
        din_fast.DINAttention(4, search="dot")


def test_module_dice_training_over_the_selected_positions():
    # With K at least T, training-mode Dice (batch statistics, running
    # statistics, gradients) is the exact layer's.
    torch.manual_seed(1)
    exact = din_fast.DINAttention(4, (5, 3), activation="dice").double()
    two_stage = din_fast.DINAttention(4, (5, 3), activation="dice", top_k=9,
                                      search="category").double()
    two_stage.load_state_dict(exact.state_dict())
    query, keys = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 6, 4,
                                                                         dtype=torch.float64)
    lengths = torch.tensor([2, 6, 0])
    categories = torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 6, dtype=torch.long)
    out = two_stage(query, keys, lengths, query_categories=categories[0],
                    key_categories=categories[1])
    torch.testing.assert_close(out, exact(query, keys, lengths))
    for name, buffer in exact.named_buffers():
        torch.testing.assert_close(dict(two_stage.named_buffers())[name], buffer)
    with pytest.raises(TypeError, match="DINAttention: `query_categories`"):
        two_stage(query, keys, lengths)


# ------------------------------------------------------------------ din-fast train --top-k

def test_command_trains_evaluates_and_predicts_two_stage(tmp_path, one_torch_thread):
    # The real command: train (dot through a subprocess, with SIM's auxiliary
    # loss; category, which reads the categories), the checkpoint records
    # top_k and search, and evaluate and predict rebuild the two-stage model.
    data = write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=40, seed=4))
    common = ["--data", str(data), "--epochs", "1", "--batch-size", "64", "--embed-dim", "4",
              "--no-progress", "--top-k", "2"]
    run = subprocess.run([sys.executable, "-m", "din_fast", "train", *common, "--search", "dot",
                          "--checkpoint", str(tmp_path / "dot.pt"),
                          "--metrics-out", str(tmp_path / "dot.json")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    trained = json.loads((tmp_path / "dot.json").read_text())
    assert (trained["config"]["top_k"], trained["config"]["search"]) == (2, "dot")
    assert main(["train", *common, "--search", "category", "--checkpoint",
                 str(tmp_path / "category.pt")]) == 0
    for search in ("dot", "category"):
        checkpoint = load_checkpoint(tmp_path / f"{search}.pt")
        assert (checkpoint.config.top_k, checkpoint.config.search) == (2, search)
        model = restored_model(checkpoint, checkpoint.config)
        assert model.attention.top_k == 2 and model.attention.search == search
    assert main(["evaluate", "--checkpoint", str(tmp_path / "dot.pt"), "--data", str(data),
                 "--metrics-out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["test_gauc"] == pytest.approx(trained["test_gauc"], abs=1e-9)
    requests = tmp_path / "requests.jsonl"
    items = checkpoint.id_maps.item_ids.to_pylist()
    requests.write_text(json.dumps({"history": items[:6], "candidates": items[6:9]}) + "\n")
    assert main(["predict", "--checkpoint", str(tmp_path / "category.pt"), "--requests",
                 str(requests), "--output", str(tmp_path / "scores.csv")]) == 0
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize("flags,message", [
    (["--search", "dot"], "`search` 'dot' is the first stage of two-stage attention"),
    (["--model", "base", "--top-k", "3"], "`top_k` is DIN's two-stage attention"),
    (["--top-k", "0"], "--top-k: must be a positive integer"),
])
def test_command_rejects_bad_two_stage_flags(flags, message, capsys):
    try:
        status = main(["train", "--epochs", "1", "--no-progress", *flags])
    except SystemExit as stop:        # argparse's own errors
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("din-fast: error:") and message in error and "\n" not in error


def test_exported_model_takes_any_history_length():
    # torch.export traces the torch search with K empty slots first (a static
    # width), so one exported graph serves histories shorter and longer than K.
    from din_fast.ctr.export import din_dynamic_shapes, din_example_inputs

    torch.manual_seed(0)
    model = din_fast.DIN(20, 4, embed_dim=4, top_k=3, search="din").eval()
    program = torch.export.export(model, din_example_inputs(model),
                                  dynamic_shapes=din_dynamic_shapes())
    for length in (2, 3, 9):
        inputs = din_example_inputs(model, batch=5, history=length)
        torch.testing.assert_close(program.module()(*inputs), model(*inputs))


def test_onnx_export_refuses_a_two_stage_model():
    # The ONNX model runs exact DIN over stock operators: it has no search.
    from din_fast.ctr.onnx_export import OnnxDIN

    with pytest.raises(ValueError, match="two-stage"):
        OnnxDIN(din_fast.DIN(20, 4, embed_dim=4, top_k=3, search="dot"))
