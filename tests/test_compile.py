"""torch.compile when the sizes vary from call to call, as in training, where
every batch is padded to its own longest history: each compiled function
compiles at most twice (a graph for the first sizes, then one with symbolic
sizes that serves every later call), never reaching dynamo's recompile limit;
with fullgraph=True, mark_dynamic and dynamic=True, on both backends (triton
in the interpreter on CPU), in training and under no_grad and inference_mode;
and the results are eager mode's.

The counting backend (CompileCounterWithBackend) counts the graphs and runs
them through aot_eager: dynamo's and AOTAutograd's graphs, as inductor gets
them, without its slow code generation (test_ops compiles with inductor).

Sizes are at least 2 (torch.compile gives sizes 0 and 1 graphs of their own),
and in the first two calls no two sizes are alike: dynamo gives equal sizes
one symbol when it makes a graph, and compiles again when they part.
"""

import copy
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

import din_fast
from din_fast.ctr.checkpoint import load_checkpoint, save_checkpoint
from din_fast.ctr.cli import main
from din_fast.ctr.config import TrainConfig, build_model
from din_fast.ctr.data import iterate_batches, training_samples
from din_fast.ctr.errors import InputError
from din_fast.ctr.loaders import synthetic_interactions
from din_fast.ctr.training import LocalLearner, load_data
from helpers import DEVICE

from cli_data import one_torch_thread, write_csv  # noqa: F401 (a fixture)

DIM = 5
MODES = ("fullgraph", "mark_dynamic", "dynamic")
# Per backend: (B, T, C) of the first two calls, then the bounds of the
# random ones, and how many calls a loop makes. The interpreter is slow: the
# triton backend's loops are short and small.
SIZES = {"torch": ([(6, 11, 2), (9, 17, 3)], (12, 24, 4), 50),
         "triton": ([(3, 6, 2), (4, 7, 3)], (4, 8, 3), 6)}
# (B, C, L) of the first two jagged calls (B + 1 is a size too: the offsets').
FIRST_JAGGED = {"torch": [(6, 2, 23), (9, 3, 41)], "triton": [(3, 2, 9), (6, 3, 14)]}


def counted_compile(function, mode):
    """(compiled function, its counter) for one of MODES."""
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, backend=counter,
                             dynamic=True if mode == "dynamic" else None)
    return compiled, counter


def varying_sizes(backend, seed=0):
    """(B, T, C) of a loop's calls on ``backend``, all at least 2."""
    first, (batch, length, candidates), count = SIZES[backend]
    rng = random.Random(seed)
    return first + [(rng.randint(2, batch), rng.randint(2, length), rng.randint(2, candidates))
                    for _ in range(count - len(first))]


def varying_jagged_sizes(backend, seed=0):
    """(B, C, L) of a jagged loop's calls on ``backend``: rows of at least one
    position."""
    rng = random.Random(seed)
    return FIRST_JAGGED[backend] + [(batch, candidates, batch + rng.randint(2, 2 * length))
                                    for batch, length, candidates
                                    in varying_sizes(backend, seed)[2:]]


def padded_batch(batch, length, candidates, generator, mode):
    """query [B, C, D], keys [B, T, D] (requiring grad) and lengths [B] in [0, T],
    T itself among them; under mark_dynamic every size marked dynamic."""
    query = torch.randn(batch, candidates, DIM, generator=generator).to(DEVICE)
    keys = torch.randn(batch, length, DIM, generator=generator).to(DEVICE).requires_grad_()
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    lengths[0] = length
    lengths = lengths.to(DEVICE)
    if mode == "mark_dynamic":
        for tensor in (query, keys, lengths):
            torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(query, 1)
        torch._dynamo.mark_dynamic(keys, 1)
    return query, keys, lengths


def jagged_batch(batch, candidates, total, generator, mode):
    """query [B, C, D], keys_values [L, D] (requiring grad) and offsets [B + 1]
    of rows of at least one position, the longest returned as well."""
    lengths = torch.ones(batch, dtype=torch.long)
    extra = torch.multinomial(torch.ones(batch), total - batch, replacement=True,
                              generator=generator)
    lengths += torch.bincount(extra, minlength=batch)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(DEVICE)
    query = torch.randn(batch, candidates, DIM, generator=generator).to(DEVICE)
    keys_values = torch.randn(total, DIM, generator=generator).to(DEVICE).requires_grad_()
    if mode == "mark_dynamic":
        for tensor in (query, keys_values, offsets):
            torch._dynamo.mark_dynamic(tensor, 0)
        torch._dynamo.mark_dynamic(query, 1)
    return query, keys_values, offsets, int(lengths.max())


def assert_all_close(got, want):
    """Outputs and gradients alike; atol for the gradients that are zero but
    for rounding (the output bias's under softmax)."""
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def attention(backend, **options):
    torch.manual_seed(0)
    return din_fast.DINAttention(DIM, hidden_units=(6, 3), normalization="softmax",
                                 scale=DIM ** -0.5, backend=backend, **options).to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
def test_training_loop_of_varying_sizes_compiles_at_most_twice(mode, backend):
    """A training loop (scores returned and used: their gradient flows too)
    whose B, T, C and lengths change every batch: at most two graphs, and
    eager mode's outputs and gradients on the first and the last batch."""
    layer = attention(backend, return_scores=True)
    compiled, counter = counted_compile(layer, mode)
    generator = torch.Generator().manual_seed(1)
    sizes = varying_sizes(backend)
    for step, (batch, length, candidates) in enumerate(sizes):
        query, keys, lengths = padded_batch(batch, length, candidates, generator, mode)
        leaves = [keys, *layer.parameters()]
        pooled, scores = compiled(query, keys, lengths)
        got = [pooled, *torch.autograd.grad(pooled.square().sum() + scores.sum(), leaves)]
        if step in (0, len(sizes) - 1):
            pooled, scores = layer(query, keys, lengths)
            want = [pooled, *torch.autograd.grad(pooled.square().sum() + scores.sum(), leaves)]
            assert_all_close(got, want)
    assert 1 <= counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("grad_mode,backend", [
    (torch.no_grad, "torch"), (torch.inference_mode, "torch"),
    (torch.inference_mode, "triton")])
def test_inference_of_varying_sizes_compiles_at_most_twice(grad_mode, backend):
    """fullgraph=True under no_grad and inference_mode (the torch backend's
    forward once called an untraceable functorch check there)."""
    layer = attention(backend).eval()
    compiled, counter = counted_compile(layer, "fullgraph")
    generator = torch.Generator().manual_seed(2)
    for batch, length, candidates in varying_sizes(backend)[:12]:
        query, keys, lengths = padded_batch(batch, length, candidates, generator, "fullgraph")
        with grad_mode():
            got, want = compiled(query, keys, lengths), layer(query, keys, lengths)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert 1 <= counter.frame_count <= 2, counter.frame_count


@pytest.mark.parametrize("mode,backend,max_len", [
    ("fullgraph", "torch", "fixed"), ("mark_dynamic", "torch", "varying"),
    ("dynamic", "triton", "varying")])
def test_jagged_loop_of_varying_sizes_compiles_at_most_twice(mode, backend, max_len):
    """din_attention_jagged with B, C and the total length L changing every
    call, max_len fixed (an upper bound) or each batch's longest row."""
    layer = attention(backend, return_scores=True)
    compiled, counter = counted_compile(layer.forward_jagged, mode)
    generator = torch.Generator().manual_seed(3)
    sizes = varying_jagged_sizes(backend)[:12]
    for step, (batch, candidates, total) in enumerate(sizes):
        query, keys_values, offsets, longest = jagged_batch(batch, candidates, total,
                                                            generator, mode)
        bound = 64 if max_len == "fixed" else longest
        leaves = [keys_values, *layer.parameters()]
        pooled, scores = compiled(query, keys_values, offsets, bound)
        got = [pooled, *torch.autograd.grad(pooled.square().sum() + scores.sum(), leaves)]
        if step in (0, len(sizes) - 1):
            pooled, scores = layer.forward_jagged(query, keys_values, offsets, bound)
            want = [pooled, *torch.autograd.grad(pooled.square().sum() + scores.sum(), leaves)]
            assert_all_close(got, want)
    assert 1 <= counter.frame_count <= 2, counter.frame_count


def test_dice_training_of_varying_sizes_compiles_at_most_twice():
    """Training-mode Dice (batch statistics over the valid positions, running
    statistics updated in place): eager mode's outputs, gradients and running
    statistics at every batch."""
    torch.manual_seed(0)
    layer = din_fast.DINAttention(DIM, hidden_units=(6, 3), activation="dice",
                                  normalization="softmax").to(DEVICE).train()
    with torch.no_grad():
        for alpha in layer.alphas:
            alpha.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(layer)
    compiled, counter = counted_compile(layer, "fullgraph")
    generator = torch.Generator().manual_seed(4)
    for batch, length, candidates in varying_sizes("torch")[:8]:
        query, keys, lengths = padded_batch(batch, length, candidates, generator, "fullgraph")
        out, eager_out = compiled(query, keys, lengths), twin(query, keys, lengths)
        got = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        want = torch.autograd.grad(eager_out.square().sum(), list(twin.parameters()))
        assert_all_close([out, *got, *layer.buffers()], [eager_out, *want, *twin.buffers()])
    assert 1 <= counter.frame_count <= 2, counter.frame_count


def test_din_training_step_compiles_at_most_twice_per_mode():
    """The DIN model (Dice in the attention and in the scoring MLP) compiled
    whole with fullgraph=True and trained on the command's batches, each
    padded to its longest history: at most two graphs in training and two in
    evaluation, the losses eager mode's (an eager twin takes the same steps)."""
    config = TrainConfig(embed_dim=4, max_len=12)
    data, splits = load_data(None, 0)
    torch.manual_seed(0)
    model = build_model(config, data.num_items, data.num_categories).to(DEVICE)
    twin = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    model.compile(fullgraph=True, backend=counter)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin)]
    samples = training_samples(data, splits.train, 0, 1)
    batches = [batch.to(DEVICE) for _, batch in iterate_batches(
        data, samples, 32, max_len=config.max_len, shuffle=True, rng=np.random.default_rng(0))
        if batch.history_items.shape[1] >= 2][:8]
    assert len({tuple(batch.history_items.shape) for batch in batches}) >= 6
    for batch in batches:
        losses = []
        for net, optimizer in zip((model, twin), optimizers):
            loss = F.binary_cross_entropy_with_logits(net(*batch[:5]), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(*losses, rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2, counter.frame_count
    model.eval()
    twin.eval()
    with torch.no_grad():
        for batch in batches[:4]:
            torch.testing.assert_close(model(*batch[:5]), twin(*batch[:5]), rtol=1e-5,
                                       atol=1e-6)
    assert counter.frame_count <= 4, counter.frame_count


@pytest.mark.usefixtures("one_torch_thread")
def test_train_command_with_compile_matches_eager(tmp_path):
    """din-fast train --compile (through the real command, in a process of its
    own): the metrics of an eager run to float tolerance, the choice recorded
    in the config. The eager backend (dynamo's graphs, run as they are) keeps
    it quick; the other tests cover AOTAutograd's graphs."""
    data = write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=60, seed=4))
    arguments = ["train", "--data", str(data), "--epochs", "2", "--batch-size", "32",
                 "--embed-dim", "4", "--lr", "0.01", "--no-progress", "--metrics-out"]
    assert main(arguments + [str(tmp_path / "eager.json")]) == 0
    result = subprocess.run([sys.executable, "-m", "din_fast", *arguments,
                             str(tmp_path / "compiled.json"), "--compile", "eager"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    runs = {name: json.loads((tmp_path / f"{name}.json").read_text())
            for name in ("eager", "compiled")}
    eager, compiled = runs["eager"], runs["compiled"]
    assert (eager["config"]["compile"], compiled["config"]["compile"]) == (None, "eager")
    assert compiled["best_epoch"] == eager["best_epoch"]
    for key in ("test_auc", "test_gauc", "test_logloss", "validation_auc",
                "validation_gauc", "validation_logloss"):
        assert compiled[key] == pytest.approx(eager[key], abs=1e-5), key
    for got, want in zip(compiled["epochs"], eager["epochs"]):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)


@pytest.mark.usefixtures("one_torch_thread")
def test_weight_average_compiled_matches_eager(tmp_path):
    """train --ema --compile: the average is compiled alike (it is what
    validation and test score), with the eager run's metrics."""
    from din_fast.ctr.training import train

    data = write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=60, seed=4))
    runs = [train(TrainConfig(data=str(data), epochs=2, batch_size=32, embed_dim=4, lr=0.01,
                              ema=0.8, compile=compile), progress=False, log=lambda *_: None)
            for compile in (None, "eager")]
    # Float noise (compiled graphs round differently) may flip a near-tied
    # pair of the 120 test samples: 1/3600 of AUC.
    for key, tolerance in (("test_logloss", 1e-5), ("test_auc", 1e-3), ("test_gauc", 1e-3),
                           ("validation_gauc", 1e-3)):
        assert runs[1][key] == pytest.approx(runs[0][key], abs=tolerance), key
    config = TrainConfig(embed_dim=4, ema=0.8, compile="eager")
    data, _ = load_data(None, 0)
    learner = LocalLearner(build_model(config, data.num_items, data.num_categories), data,
                           config)
    assert learner.scored is learner.average.model is not learner.model
    assert all(m._compiled_call_impl is not None for m in (learner.model, learner.scored))


@pytest.mark.usefixtures("one_torch_thread")
def test_labeled_training_with_compile_makes_one_graph_per_mode(tmp_path):
    """The trainer's compiled model on a labeled log with multi-valued,
    single-valued and numeric side features, the linear part, rare ids and
    two-stage attention: many small batches (the last one smaller), some
    whose histories or genres all hold one position or none. One graph for
    training and one for evaluation, at most one more where two sizes equal
    in the first batch part (dynamo gives equal sizes one symbol); none for
    sizes 0 and 1, nor for the last batch (once four graphs)."""
    from torch._dynamo.utils import counters

    from cli_data import labeled_rows, write_labeled_log
    from din_fast.ctr.training import train

    log = write_labeled_log(tmp_path / "log.csv", labeled_rows(300, num_users=150,
                                                               num_items=30))
    torch._dynamo.reset()
    counters.clear()
    train(TrainConfig(data=str(log), label_column="label", features=("genres", "hour"),
                      numeric_features=("price",), linear=True, embed_dim=4, epochs=1,
                      batch_size=8, min_count=2, top_k=3, search="din", compile="aot_eager"),
          log=lambda *_: None)
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_checkpoints_without_the_compile_field_still_load(tmp_path):
    """Checkpoints written before --compile existed have no such config field:
    they load, as trained eagerly."""
    data, _ = load_data(None, 0)
    config = TrainConfig(embed_dim=4, compile="eager")
    model = build_model(config, data.num_items, data.num_categories)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, data.id_maps, config)
    assert load_checkpoint(path).config.compile == "eager"
    state = torch.load(path, weights_only=True)
    del state["config"]["compile"]
    torch.save(state, path)
    assert load_checkpoint(path).config.compile is None


def test_compile_option_is_checked(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", "--compile", "fast"])
    assert raised.value.code == 2
    assert "--compile: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(InputError, match="`compile` must be None"):
        TrainConfig(compile="fast")


def test_sharded_training_refuses_compile():
    pytest.importorskip("torchrec")
    from din_fast.ctr.sharded import load_trainer

    with pytest.raises(InputError, match="--compile is not supported"):
        load_trainer()(TrainConfig(compile="eager"))


def test_compiled_torch_backend_calls_the_packed_op():
    """What keeps a compiled call as fast as an eager one: the graph calls the
    torch backend's packed forward op, not a traced unpacked MLP."""
    graphs = []

    def recording(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    layer = attention("torch")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=recording)
    query, keys, lengths = padded_batch(6, 11, 2, torch.Generator().manual_seed(5), "fullgraph")
    compiled(query, keys, lengths)
    targets = {str(node.target) for graph in graphs for node in graph.graph.nodes}
    assert "din_fast.torch_attention_forward.default" in targets, targets


def test_torch_func_transforms_compile():
    """torch.func.grad and vmap inside a compiled function take the torch
    backend's differentiable path, as they do in eager mode."""
    layer = attention("torch")
    params = dict(layer.named_parameters())
    query, keys, lengths = padded_batch(6, 11, 2, torch.Generator().manual_seed(6), "fullgraph")
    keys = keys.detach()

    def loss(params, query):
        return torch.func.functional_call(layer, params, (query, keys, lengths)).sum()

    torch._dynamo.reset()
    for transform, args in ((torch.func.grad(loss), (params, query)),
                            (torch.func.vmap(loss, in_dims=(None, 1)), (params, query))):
        got = torch.compile(transform, fullgraph=True, backend="aot_eager")(*args)
        torch.testing.assert_close(got, transform(*args))
