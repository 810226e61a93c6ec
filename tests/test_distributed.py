"""DistributedDataParallel: two CPU processes (gloo), each on half of the
global batch, end a few SGD steps with the parameters of one process trained
on the whole batch."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import din_fast

D, WORLD, STEPS, BATCH, T = 4, 2, 3, 8, 6


class CTRModel(torch.nn.Module):
    """DINAttention pooling the history, a linear head on [interest, candidate]."""

    def __init__(self):
        super().__init__()
        self.attention = din_fast.DINAttention(D, (8, 4), activation="prelu",
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


def _initial_model():
    torch.manual_seed(0)
    return CTRModel().double()


def _worker(rank, port, result_path):
    torch.set_num_threads(1)  # two processes on a 2-core CI machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        # DDP averages the gradients of the ranks: with equal shares that is
        # the gradient of the mean loss over the global batch.
        model = torch.nn.parallel.DistributedDataParallel(_initial_model())
        _train(model, rank, WORLD)
        if rank == 0:
            torch.save(model.module.state_dict(), result_path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_single_process(tmp_path):
    result_path = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(_free_port(), str(result_path)), nprocs=WORLD, join=True)
    distributed = torch.load(result_path, weights_only=True)

    single = _initial_model()
    _train(single)
    for name, tensor in single.state_dict().items():
        torch.testing.assert_close(distributed[name], tensor, rtol=1e-12, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(distributed["head.weight"], _initial_model().head.weight)
