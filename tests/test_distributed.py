"""DistributedDataParallel and FSDP2 (fully_shard): two CPU processes (gloo),
each on half of the global batch, end a few SGD steps with the parameters of
one process trained on the whole batch; with Dice, once its statistics are
synchronized (din_fast.synchronize_dice_statistics), the running statistics too."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import din_fast

D, WORLD, STEPS, BATCH, T = 4, 2, 3, 8, 6


class CTRModel(torch.nn.Module):
    """DINAttention pooling the history, a linear head on [interest, candidate]."""

    def __init__(self, activation):
        super().__init__()
        self.attention = din_fast.DINAttention(D, (8, 4), activation=activation,
                                               normalization="softmax")
        self.head = torch.nn.Linear(2 * D, 1)

    def forward(self, query, keys, lengths):
        return self.head(torch.cat([self.attention(query, keys, lengths), query], -1))


def _batches():
    generator = torch.Generator().manual_seed(5)
    for _ in range(STEPS):
        yield (torch.randn(BATCH, D, generator=generator, dtype=torch.float64),
               torch.randn(BATCH, T, D, generator=generator, dtype=torch.float64),
               torch.randint(0, T + 1, (BATCH,), generator=generator),
               torch.randint(0, 2, (BATCH, 1), generator=generator).double())


def _train(model, rank=0, world=1):
    """SGD on the mean loss of this rank's share of every global batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    share = BATCH // world
    for query, keys, lengths, labels in _batches():
        part = slice(rank * share, (rank + 1) * share)
        logits = model(query[part], keys[part], lengths[part])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels[part])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _initial_model(activation="prelu"):
    torch.manual_seed(0)
    return CTRModel(activation).double()


def _worker(rank, port, result_dir):
    torch.set_num_threads(1)  # two processes on a 2-core CI machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        # Both average the gradients of the ranks: with equal shares that is
        # the gradient of the mean loss over the global batch.
        ddp = torch.nn.parallel.DistributedDataParallel(_initial_model())
        _train(ddp, rank, WORLD)
        fsdp = fully_shard(_initial_model())   # each rank holds half of every parameter
        _train(fsdp, rank, WORLD)
        gathered = {name: tensor.full_tensor() for name, tensor in fsdp.state_dict().items()}
        dice = torch.nn.parallel.DistributedDataParallel(
            din_fast.synchronize_dice_statistics(_initial_model("dice")), broadcast_buffers=False)
        _train(dice, rank, WORLD)
        if rank == 0:
            torch.save(ddp.module.state_dict(), f"{result_dir}/ddp.pt")
            torch.save(gathered, f"{result_dir}/fsdp.pt")
            torch.save(dice.module.state_dict(), f"{result_dir}/ddp-dice.pt")
        # Both ranks tear down together: a rank that destroyed its group
        # while the other still held the connection was once aborted by
        # gloo ("terminate called without an active exception", SIGABRT).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp_match_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for engine, activation in (("ddp", "prelu"), ("fsdp", "prelu"), ("ddp-dice", "dice")):
        single = _initial_model(activation)
        _train(single)
        distributed = torch.load(tmp_path / f"{engine}.pt", weights_only=True)
        assert distributed.keys() == single.state_dict().keys()
        for name, tensor in single.state_dict().items():
            torch.testing.assert_close(distributed[name], tensor, rtol=1e-12, atol=1e-12,
                                       msg=lambda m, name=name: f"{engine} {name}: {m}")
        assert not torch.equal(distributed["head.weight"], _initial_model().head.weight)
