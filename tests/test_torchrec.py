"""DIN on TorchRec (din_fast.ctr.sharded), with two gloo processes on CPU.

Against din_fast.DIN with the same weights, for every sharding type: the
sharded forward, and a few training steps against a single-process replay of
the same global batches. Then the command under torchrun, and its errors.
One spawn of two processes serves the first two (importing TorchRec in each
process is most of the cost); the checks run here, in the test process.
"""

import datetime
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchrec", reason="TorchRec is not installed (the optional extra "
                    "'torchrec', see docs/install.md)")

from din_fast import DIN  # noqa: E402
from din_fast.ctr.cli import main  # noqa: E402
from din_fast.ctr.data import (Batch, build_samples, encode, iterate_batches,  # noqa: E402
                           training_samples)
from din_fast.ctr.loaders import synthetic_interactions  # noqa: E402
from din_fast.ctr.training import inverse_frequencies, minibatch_l2  # noqa: E402
from din_fast.ctr.sharded import SHARDING_TYPES  # noqa: E402
from cli_data import write_csv  # noqa: E402

WORLD = 2
TIMEOUT_S = 240          # a hung collective fails the test instead of blocking CI
SIZES = dict(embed_dim=8, attention_hidden=(8, 4), mlp_hidden=(16, 8),
             attention_activation="sigmoid", mlp_activation="prelu", mlp_input="product")
# Dice in the attention and the MLP: batch statistics over the global batch.
DICE_SIZES = dict(SIZES, attention_activation="dice", mlp_activation="dice")
# SGD on the dense layers: unlike Adam, it shows any error in the scale of the
# gradients (and does not blow rounding noise up where a gradient is ~0).
DENSE_LR, EMBEDDING_LR = 0.5, 0.1
FBGEMM_EPS = 1e-8        # the fused kernels' default; TorchRec passes only the lr on
OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
L2 = 0.5                 # the mini-batch aware L2 run (with SGD tables)
METRICS = ("test_auc", "test_gauc", "test_logloss")


def tiny_data():
    data = encode(synthetic_interactions(num_users=30, num_categories=8, items_per_category=5,
                                         interests_per_user=3, min_length=3, max_length=9,
                                         seed=3))
    return data, training_samples(data, build_samples(data, seed=0).train, 0, 1)


def reference_din(sizes=SIZES):
    torch.manual_seed(0)
    data, _ = tiny_data()
    return DIN(data.num_items, data.num_categories, **sizes)


def forward_batches():
    """Three batches of the tiny data, the first with two empty histories."""
    data, samples = tiny_data()
    batches = [batch for _, batch in iterate_batches(data, samples, 11, max_len=6)][:3]
    lengths = batches[0].lengths.clone()
    lengths[[0, 3]] = 0
    batches[0] = batches[0]._replace(lengths=lengths)
    return batches


def training_batches(sizes=SIZES):
    """A few shuffled global batches, then awkward ones: 3 samples (shares of 2
    and 1) and, without Dice, 1 sample (rank 1's share is empty: its stand-in
    would enter Dice's statistics, and the trainer never makes one)."""
    data, samples = tiny_data()
    batches = [batch for _, batch in iterate_batches(data, samples, 10, max_len=6, shuffle=True,
                                                     rng=np.random.default_rng(1))][:3]
    small = (3,) if sizes is DICE_SIZES else (3, 1)
    return batches + [batches[0].map(lambda t: t[:n]) for n in small]


def share_of(batch: Batch, rank: int) -> Batch:
    return batch.map(lambda t: t[rank::WORLD])


# ---------------------------------------------------------------- the two processes

def worker(rank, store, out):
    """Every sharding type: the forward on forward_batches (each rank's
    logits saved) and, per table optimizer, training_batches (the gathered
    state saved by rank 0)."""
    from din_fast.ctr.sharded.model import (TorchRecDIN, batch_features, din_state_dict,
                                        load_din_state_dict, plan_summary, shard_model)
    from din_fast.ctr.sharded.training import dense_parameters, train_step

    torch.set_num_threads(1)  # two processes on a 2-core CI machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    try:
        data, _ = tiny_data()

        def sharded_din(sharding, sizes=SIZES, **optimizer):
            model = TorchRecDIN(data.num_items, data.num_categories, **sizes)
            sharded = shard_model(model, torch.device("cpu"), sharding, **optimizer)
            load_din_state_dict(sharded, reference_din(sizes).state_dict())
            return sharded

        def train(sharded, sizes=SIZES, l2=0.0):
            """training_batches, SGD on the dense layers; the gathered state."""
            dense = dense_parameters(sharded)
            assert {id(p) for p in dense} == {
                id(p) for name, p in sharded.named_parameters() if "tables." not in name}
            optimizer = torch.optim.SGD(dense, lr=DENSE_LR)
            for batch in training_batches(sizes):
                train_step(sharded, optimizer, batch, torch.device("cpu"), l2,
                           inverse_frequencies(data, "cpu"))
            return din_state_dict(sharded)

        for sharding in SHARDING_TYPES:
            sharded = sharded_din(sharding)
            logits = [sharded(batch_features(share_of(b, rank)), b.history_items.shape[1])
                      for b in forward_batches()]
            torch.save({"logits": logits, "plan": plan_summary(sharded),
                        "state": din_state_dict(sharded)}, f"{out}/forward-{sharding}-{rank}.pt")
            runs = [(name, 0.0) for name in OPTIMIZERS] + [("sgd", L2)]
            for optimizer_name, l2 in runs:
                sharded = sharded_din(sharding, embedding_optimizer=optimizer_name,
                                      embedding_lr=EMBEDDING_LR)
                state = train(sharded, l2=l2)
                if rank == 0:
                    torch.save({"state": state, "plan": plan_summary(sharded)},
                               f"{out}/train-{sharding}-{optimizer_name}-{l2}.pt")
        sharded = sharded_din("row_wise", DICE_SIZES, embedding_optimizer="sgd",
                              embedding_lr=EMBEDDING_LR)
        state = train(sharded, DICE_SIZES)
        buffers = [None] * WORLD     # Dice's running statistics, as each rank holds them
        dist.all_gather_object(buffers, {name: b for name, b in sharded.named_buffers()
                                         if "tables." not in name})
        if rank == 0:
            torch.save({"state": state, "plan": plan_summary(sharded), "buffers": buffers},
                       f"{out}/train-dice.pt")
        dist.barrier()    # tear down together (test_distributed's _worker says why)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The worker's files, from one run of WORLD processes joined by a file store."""
    out = tmp_path_factory.mktemp("torchrec")
    context = mp.start_processes(worker, args=(str(out / "store"), str(out)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT_S} s")
    return lambda name: torch.load(out / f"{name}.pt", weights_only=True)


# ---------------------------------------------------------------- the forward

@pytest.mark.parametrize("sharding", SHARDING_TYPES)
def test_sharded_forward_equals_din_with_the_same_weights(results, sharding):
    reference = reference_din()
    for rank in range(WORLD):
        saved = results(f"forward-{sharding}-{rank}")
        plan = saved["plan"]
        assert all(p["sharding_type"] == sharding for p in plan.values()), plan
        if sharding != "table_wise":   # both processes hold a part of each table
            assert all(sorted(p["ranks"]) == [0, 1] for p in plan.values()), plan
        for batch, logits in zip(forward_batches(), saved["logits"], strict=True):
            torch.testing.assert_close(logits, reference(*share_of(batch, rank)[:5]))
        if rank == 0:   # the gathered tables are the ones scattered
            assert saved["state"].keys() == reference.state_dict().keys()
            for key, value in reference.state_dict().items():
                assert torch.equal(saved["state"][key], value), key
        else:
            assert saved["state"] is None


# ---------------------------------------------------------------- training steps

def update_table(optimizer_name, weight, grad, state, column_shards):
    """What the fused optimizer does to a table given its gradient (averaged
    over the ranks, as TorchRec does) in FBGEMM's CPU kernels. A row with zero
    gradient is left as it is, so the dense replay also matches rows that a
    batch did not touch. Row-wise Adagrad keeps one state per row of each
    column shard: the mean squared gradient over the shard's columns."""
    if optimizer_name == "sgd":
        weight -= EMBEDDING_LR * grad
    elif optimizer_name == "adagrad":
        state += grad.square()
        weight -= EMBEDDING_LR * grad / (state.sqrt() + FBGEMM_EPS)
    else:
        shards = grad.view(grad.shape[0], column_shards, -1)
        state += shards.square().mean(-1)
        weight -= (EMBEDDING_LR * shards / (state.sqrt() + FBGEMM_EPS)[..., None]).view_as(grad)


def replay(optimizer_name, plan, l2, sizes=SIZES):
    """din_fast.DIN on the whole global batches: SGD on the dense layers, the
    engine's row updates on the tables, the mini-batch aware L2 of ``l2``."""
    din = reference_din(sizes)
    inverse_frequency = inverse_frequencies(tiny_data()[0], "cpu")
    tables = {"item": din.item_embedding.weight, "category": din.category_embedding.weight}
    dense = [p for p in din.parameters() if all(p is not t for t in tables.values())]
    optimizer = torch.optim.SGD(dense, lr=DENSE_LR)
    column_shards = {name: len(plan[name]["ranks"]) if plan[name]["sharding_type"] == "column_wise"
                     else 1 for name in tables}
    states = {name: torch.zeros(t.shape if optimizer_name == "adagrad"
                                else (t.shape[0], column_shards[name]))
              for name, t in tables.items()}
    for batch in training_batches(sizes):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(din(*batch[:5]), batch.labels)
        loss = loss + l2 * minibatch_l2(din, batch, inverse_frequency)
        din.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, table in tables.items():
                update_table(optimizer_name, table, table.grad, states[name], column_shards[name])
    return din.state_dict()


@pytest.mark.parametrize("optimizer_name, l2", [(name, 0.0) for name in OPTIMIZERS]
                         + [("sgd", L2)])
@pytest.mark.parametrize("sharding", SHARDING_TYPES)
def test_sharded_training_steps_match_a_single_process_replay(results, sharding,
                                                              optimizer_name, l2):
    """With l2 > 0, each row's penalty is paid once per step although both
    processes may look it up."""
    assert_matches_replay(results(f"train-{sharding}-{optimizer_name}-{l2}"), optimizer_name, l2)


def test_sharded_dice_training_steps_match_a_single_process_replay(results):
    """Dice in the attention and the MLP: its batch statistics are the global
    batch's (a share of one sample included), so the steps, and the running
    statistics, are the single-process ones, and every rank holds the same."""
    saved = results("train-dice")
    assert_matches_replay(saved, "sgd", 0.0, DICE_SIZES)
    first, *others = saved["buffers"]
    assert any("running_mean" in name for name in first)
    for other in others:
        assert other.keys() == first.keys()
        assert all(torch.equal(other[name], first[name]) for name in first)


def assert_matches_replay(saved, optimizer_name, l2, sizes=SIZES):
    expected = replay(optimizer_name, saved["plan"], l2, sizes)
    assert saved["state"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved["state"][key], value, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, key=key: f"{key}: {m}")
    initial = reference_din(sizes).state_dict()
    for key in ("item_embedding.weight", "category_embedding.weight", "mlp.0.weight"):
        assert not torch.equal(expected[key], initial[key]), key   # the steps did move them


# ---------------------------------------------------------------- the command

@pytest.fixture
def tiny_csv(tmp_path):
    """60 users of the synthetic set as a user,item,category,timestamp table."""
    return write_csv(tmp_path / "tiny.csv", synthetic_interactions(num_users=60, seed=4))


def test_torchrun_trains_and_the_checkpoint_evaluates_in_one_process(tmp_path, tiny_csv):
    metrics_path, checkpoint = tmp_path / "metrics.json", tmp_path / "din.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "din_fast", "train", "--data", str(tiny_csv),
               "--epochs", "1", "--batch-size", "64", "--no-progress",
               "--metrics-out", str(metrics_path), "--checkpoint", str(checkpoint)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1: validation AUC") == 1      # rank 0 reports, once
    metrics = json.loads(metrics_path.read_text())
    assert metrics["world_size"] == WORLD and metrics["backend"] == "torch"
    assert {p["sharding_type"] for p in metrics["sharding"].values()} <= set(SHARDING_TYPES)
    assert metrics["train_samples"] > 0 and 0 <= metrics["test_auc"] <= 1
    assert metrics["best_epoch"] == metrics["epochs_run"] == 1
    # single-process evaluate rebuilds din_fast.DIN from the checkpoint: same numbers
    evaluated_path = tmp_path / "evaluated.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_csv),
                 "--device", "cpu", "--metrics-out", str(evaluated_path)]) == 0
    evaluated = json.loads(evaluated_path.read_text())
    for key in METRICS:
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_torchrun_rejects_a_batch_smaller_than_the_processes(tiny_csv):
    """Every process needs a sample of every training batch."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={WORLD}", "-m", "din_fast", "train", "--data", str(tiny_csv),
               "--batch-size", "1", "--mlp-activation", "prelu", "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0
    assert f"din-fast: error: --batch-size 1 is too small for {WORLD} process(es)" in result.stderr


def test_sharding_without_torchrun_runs_as_one_process(tmp_path, tiny_csv):
    common = ["train", "--data", str(tiny_csv), "--epochs", "1", "--batch-size", "64",
              "--no-progress", "--device", "cpu"]
    paths = {run: tmp_path / f"{run}.json" for run in ("single", "sharded")}
    assert main([*common, "--metrics-out", str(paths["single"])]) == 0
    assert main([*common, "--sharding", "column_wise", "--metrics-out",
                 str(paths["sharded"])]) == 0
    single, sharded = (json.loads(path.read_text()) for path in paths.values())
    assert sharded["world_size"] == 1
    assert sharded["sharding"] == {table: {"sharding_type": "column_wise", "ranks": [0]}
                                   for table in ("item", "category")}
    assert set(single) <= set(sharded)                # the single-process report, and more
    for key in ("train_samples", "test_samples", "model", "backend"):
        assert sharded[key] == single[key], key
    # The same settings, but for the default L2 of each trainer.
    assert (single["config"]["l2"], sharded["config"]["l2"]) == (0.1, 0.01)
    assert dict(sharded["config"], l2=0.1) == single["config"]


def test_ctrl_c_in_one_sharded_process_saves_the_best_epoch(tmp_path, tiny_csv, capsys,
                                                            monkeypatch):
    from din_fast.ctr.sharded.training import ShardedLearner
    finished = []
    train_epoch = ShardedLearner.train_epoch

    def second_epoch_interrupted(self, samples, bar):
        if finished:
            raise KeyboardInterrupt
        finished.append(1)
        return train_epoch(self, samples, bar)
    monkeypatch.setattr(ShardedLearner, "train_epoch", second_epoch_interrupted)
    checkpoint = tmp_path / "din.pt"
    assert main(["train", "--data", str(tiny_csv), "--epochs", "3", "--batch-size", "64",
                 "--no-progress", "--device", "cpu", "--sharding", "row_wise",
                 "--checkpoint", str(checkpoint)]) == 130
    error = capsys.readouterr().err.splitlines()
    assert len(error) == 1 and error[0].startswith("din-fast: interrupted during epoch 2: "
                                                   "saved epoch 1"), error
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_csv),
                 "--device", "cpu"]) == 0


@pytest.mark.parametrize("arguments, message", [
    (["--model", "base"], "runs DIN only"),
    (["--embedding-optimizer", "adam"], "adam needs --device cuda"),
    (["--embedding-lr", "0"], "--embedding-lr must be a positive number; got 0.0"),
    (["--ema", "0.9"], "--ema 0.9 (config.ema): sharded training runs the DIN protocol from "
     "the start, without weight averaging; it needs config.ema None"),
    (["--history-cross", "4"], "--history-cross 4 (config.history_cross): sharded training "
     "runs the DIN protocol from the start, without the history cross term; it needs "
     "config.history_cross 0"),
])
def test_sharded_training_rejects_what_it_cannot_run(tiny_csv, capsys, arguments, message):
    assert main(["train", "--data", str(tiny_csv), "--sharding", "row_wise", "--device", "cpu",
                 "--no-progress", *arguments]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (dict(label_column="label"), "--label-column 'label' (config.label_column): sharded "
     "training runs the DIN protocol from the start, without labeled logs; it needs "
     "config.label_column None"),
    (dict(linear=True), "--linear True (config.linear): sharded training runs the DIN "
     "protocol from the start, without the linear part; it needs config.linear False"),
    (dict(ema=0.9), "--ema 0.9 (config.ema): sharded training runs the DIN protocol from "
     "the start, without weight averaging; it needs config.ema None"),
])
def test_train_sharded_from_python_refuses_what_only_one_process_runs(tmp_path, options,
                                                                      message):
    """The Python entry checks what the command checks, before any work:
    nothing is written."""
    from din_fast.ctr.config import TrainConfig
    from din_fast.ctr.sharded import OptionError, load_trainer

    with pytest.raises(OptionError) as raised:
        load_trainer()(TrainConfig(**options), checkpoint=str(tmp_path / "din.pt"),
                       metrics_out=str(tmp_path / "din.json"))
    assert message in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_load_din_state_dict_refuses_another_shape():
    """A tensor that broadcasts to the model's (a bias of one value, a table
    of one row) is refused, naming the tensor, its shape and the one needed."""
    from din_fast.ctr.sharded.model import TorchRecDIN, load_din_state_dict, shard_model
    from din_fast.ctr.sharded.training import process_group

    data, _ = tiny_data()
    state = reference_din().state_dict()
    bias = next(k for k, v in state.items() if k.endswith("bias") and v.dim() == 1 and len(v) > 1)
    with process_group("cpu") as device:
        sharded = shard_model(TorchRecDIN(data.num_items, data.num_categories, **SIZES), device,
                              "row_wise")
        for key in (bias, "item_embedding.weight"):
            with pytest.raises(ValueError) as raised:
                load_din_state_dict(sharded, dict(state, **{key: state[key][:1]}))
            assert (f"`state[{key!r}]` has shape {list(state[key][:1].shape)}; the sharded "
                    f"model needs {list(state[key].shape)}") in str(raised.value)
        load_din_state_dict(sharded, state)            # the right shapes load


def test_sharding_without_torchrec_says_how_to_install_it(tiny_csv, capsys, monkeypatch):
    for name in list(sys.modules):                           # as if not installed
        if name.partition(".")[0] == "torchrec":
            monkeypatch.setitem(sys.modules, name, None)
        elif name.startswith("din_fast.ctr.sharded."):
            monkeypatch.delitem(sys.modules, name)
    assert main(["train", "--data", str(tiny_csv), "--sharding", "row_wise",
                 "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "needs TorchRec" in error and "--no-deps" in error
