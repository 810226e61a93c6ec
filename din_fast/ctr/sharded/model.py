"""DIN on TorchRec: the item and category tables as an EmbeddingCollection that
DistributedModelParallel shards across processes.

The model is din_fast.DIN with its two nn.Embedding tables replaced by one
TorchRec EmbeddingCollection: the same tables (row 0 the padding row, kept at
zero), the same attention and scoring MLP, and the same numbers for the same
weights. Inputs are a KeyedJaggedTensor of four features, the histories and the
targets (one id per sample) of items and categories; the histories come out of
the collection jagged (``values [L, 2E]``, ``offsets [B + 1]``) and
din_attention_jagged pools them in place, so on a GPU the fused kernel reads the
sharded lookups without any padding.

``shard_model`` plans and applies the sharding; ``din_state_dict`` gathers the
weights into din_fast.DIN's state_dict (the single-process checkpoint format)
and ``load_din_state_dict`` scatters one into the shards.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from din_fast.dice_statistics import synchronize_dice_statistics
from din_fast.modules import DINAttention
from ..data import Batch
from ..models import EMBEDDING_INIT_STD, mlp_width, score, scoring_mlp
from .options import (DEFAULT_EMBEDDING_LR, DEFAULT_EMBEDDING_OPTIMIZER, EMBEDDING_OPTIMIZERS,
                      SHARDING_TYPES, check_options)

FEATURES = ("history_items", "history_categories", "target_items", "target_categories")
# table name -> (its features, its weight's name in din_fast.DIN's state_dict)
TABLES = {"item": (("history_items", "target_items"), "item_embedding.weight"),
          "category": (("history_categories", "target_categories"), "category_embedding.weight")}
TABLES_MODULE = "tables"  # the EmbeddingCollection's attribute in TorchRecDIN and the plan
OPTIMIZER_CLASSES = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
                     "sgd": torch.optim.SGD, "adam": torch.optim.Adam}
assert tuple(OPTIMIZER_CLASSES) == EMBEDDING_OPTIMIZERS
# The share of each process's memory the planner keeps for everything but the
# tables (TorchRec's suggested fixed reservation; its default heuristic is deprecated).
STORAGE_RESERVATION = 0.15


class TorchRecDIN(nn.Module):
    """din_fast.DIN with TorchRec tables (exact DIN: no two-stage attention,
    side features or linear part; a category table is required).

    The tables are built on the meta device: DistributedModelParallel
    allocates each process's shards (drawn from N(0, 0.05), as DIN's) and
    never the whole tables. shard_model makes Dice's batch statistics (in the
    attention unit and the scoring MLP) those of the global batch
    (din_fast.synchronize_dice_statistics).

    Args:
        num_items: the items of the id maps; the item table has one more row,
            row 0 the padding.
        num_categories: likewise for the category table.
        embed_dim: each table's width E, so an item is 2E wide.
        mlp_hidden: the scoring MLP's hidden widths.
        mlp_activation: the scoring MLP's, "dice" or "prelu".
        backend: the attention backend (din_attention_jagged's).
        mlp_input: "concat" or "product", as DIN's.
        attention_hidden: the attention unit's hidden widths.
        attention_activation: "dice", "sigmoid", "relu" or "prelu".
        attention_normalization: "softmax" or None (raw scores).
        device: where the attention unit and the MLP go (None: the default
            device); the tables stay on the meta device until sharded.

    Raises:
        ValueError: an option DINAttention or the scoring MLP refuses.
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 32,
                 mlp_hidden=(200, 80), mlp_activation: str = "dice", backend: str = "auto",
                 mlp_input: str = "concat", attention_hidden=(80, 40),
                 attention_activation: str = "dice", attention_normalization="softmax",
                 device=None):
        super().__init__()
        init = functools.partial(nn.init.normal_, std=EMBEDDING_INIT_STD)
        sizes = {"item": num_items + 1, "category": num_categories + 1}
        self.tables = EmbeddingCollection(
            tables=[EmbeddingConfig(name=name, embedding_dim=embed_dim,
                                    num_embeddings=sizes[name], feature_names=list(features),
                                    init_fn=init)
                    for name, (features, _) in TABLES.items()],
            device=torch.device("meta"))
        self.attention = DINAttention(2 * embed_dim, attention_hidden, attention_activation,
                                      normalization=attention_normalization,
                                      backend=backend).to(device)
        self.mlp_input = mlp_input
        self.mlp = scoring_mlp(mlp_width(2 * embed_dim, mlp_input), mlp_hidden,
                               mlp_activation).to(device)

    def forward(self, features: KeyedJaggedTensor, max_len: int, penalized=None):
        """Score the samples of ``features``.

        Args:
            features: the KeyedJaggedTensor of :func:`batch_features` (the
                keys of FEATURES; one target per sample), on the model's device.
            max_len: an int bounding every history length (the padded batch's
                width T).
            penalized: {"item", "category": (int64 ids [N], float weights [N])},
                ids among the features' ids; None: no penalty.

        Returns:
            The logits [B]; with ``penalized`` (logits, penalty): the penalty
            sum_j weight_j * ||row_j||^2 over those rows, a 0-d tensor taken
            from the lookups so that its gradient reaches the rows through the
            tables' fused backward.
        """
        embedded = self.tables(features)

        def items(prefix):  # an item is [item embedding | category embedding]
            return torch.cat([embedded[f"{prefix}_items"].values(),
                              embedded[f"{prefix}_categories"].values()], -1)

        candidate = items("target")                       # [B, 2E]: one target per sample
        interest = self.attention.forward_jagged(candidate, items("history"),
                                                 embedded["history_items"].offsets(), max_len)
        logits = score(self.mlp, self.mlp_input, interest, candidate)
        if penalized is None:
            return logits
        penalty = logits.new_zeros(())
        for table, (table_features, _) in TABLES.items():
            ids, weights = penalized[table]
            looked_up = torch.cat([features[f].values() for f in table_features])
            rows = torch.cat([embedded[f].values() for f in table_features])
            penalty = penalty + (rows[first_positions(looked_up, ids)].square().sum(1)
                                 * weights).sum()
        return logits, penalty


def smallest_key_per_value(values: torch.Tensor, keys: torch.Tensor):
    """For each distinct value, the smallest key at its occurrences (with
    the positions as keys: where each value occurs first).

    Args:
        values: a 1-D integer tensor.
        keys: a 1-D integer tensor of the same length.

    Returns:
        (the distinct ``values``, sorted; [U] in keys' dtype the smallest
        key of each).
    """
    unique, inverse = torch.unique(values, return_inverse=True)
    smallest = torch.full_like(unique, torch.iinfo(keys.dtype).max, dtype=keys.dtype)
    return unique, smallest.scatter_reduce(0, inverse, keys, "amin")


def first_positions(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Where each of ``ids`` first occurs in ``values``.

    Args:
        values: a 1-D integer tensor.
        ids: a 1-D integer tensor, each present in ``values`` (an absent
            one gives a wrong position, unchecked).

    Returns:
        [len(ids)] int64 positions in ``values``.
    """
    unique, first = smallest_key_per_value(
        values, torch.arange(values.numel(), device=values.device))
    return first[torch.searchsorted(unique, ids)]


def batch_features(batch: Batch) -> KeyedJaggedTensor:
    """The KeyedJaggedTensor of a padded batch: the valid history positions
    of each sample back to back, and its target.

    Args:
        batch: a din_fast.ctr.data.Batch with categories (history [B, T],
            lengths [B], targets [B]).

    Returns:
        A KeyedJaggedTensor with the keys of FEATURES: history_items and
        history_categories of lengths ``batch.lengths``, target_items and
        target_categories one id per sample; on the batch's device.
    """
    positions = torch.arange(batch.history_items.shape[1], device=batch.lengths.device)
    valid = positions < batch.lengths[:, None]
    ones = torch.ones_like(batch.lengths)
    return KeyedJaggedTensor(
        keys=list(FEATURES),
        values=torch.cat([batch.history_items[valid], batch.history_categories[valid],
                          batch.target_items, batch.target_categories]),
        lengths=torch.cat([batch.lengths, batch.lengths, ones, ones]))


def column_shard_width(embed_dim: int, world_size: int) -> int:
    """The narrowest column-wise shard TorchRec accepts (a multiple of 4 that
    divides embed_dim) that still gives at most one shard per process.

    Args:
        embed_dim: the table's width.
        world_size: the processes.

    Returns:
        The width, at least ceil(embed_dim / world_size); ``embed_dim`` when
        no narrower one fits.
    """
    for width in range(-(-embed_dim // world_size), embed_dim):
        if width % 4 == 0 and embed_dim % width == 0:
            return width
    return embed_dim


def shard_model(model: TorchRecDIN, device: torch.device, sharding: Optional[str] = None, *,
                embedding_optimizer: str = DEFAULT_EMBEDDING_OPTIMIZER,
                embedding_lr: float = DEFAULT_EMBEDDING_LR,
                batch_size: Optional[int] = None) -> DistributedModelParallel:
    """Shard ``model``'s tables over the default process group (a collective).

    Both tables use ``sharding`` (one of SHARDING_TYPES), or the planner's
    choice among those when None, with the FUSED compute kernel: the tables'
    optimizer runs inside the backward and their gradients never materialize.
    DistributedModelParallel wraps the dense layers in DistributedDataParallel.
    Dice's training statistics are taken over every process's share of a
    batch (din_fast.synchronize_dice_statistics), so a training forward is a
    collective. ``batch_size`` (samples per process) informs the planner's cost estimates.

    Args:
        model: the TorchRecDIN, its tables on the meta device.
        device: this process's torch.device (its GPU under torchrun on
            CUDA).
        sharding: one of SHARDING_TYPES, or None (the planner chooses).
        embedding_optimizer: one of EMBEDDING_OPTIMIZERS.
        embedding_lr: the tables' learning rate.
        batch_size: samples per process in a batch, or None.

    Returns:
        The DistributedModelParallel; each process holds its shards (the
        padding row zeroed).

    Raises:
        ValueError: an unknown ``sharding``.
        OptionError: options :func:`din_fast.ctr.sharded.check_options`
            refuses (an InputError, so also a ValueError).
    """
    if sharding is not None and sharding not in SHARDING_TYPES:
        raise ValueError(f"`sharding` must be one of {SHARDING_TYPES} or None; got {sharding!r}")
    check_options("din", embedding_optimizer, embedding_lr, device.type)
    synchronize_dice_statistics(model)
    apply_optimizer_in_backward(OPTIMIZER_CLASSES[embedding_optimizer],
                                model.tables.parameters(), {"lr": embedding_lr})
    world_size = dist.get_world_size()
    # data_parallel is left out: it replicates the tables (what DDP does), and
    # TorchRec's CPU kernels fail on it for an EmbeddingCollection.
    constraints = {
        name: ParameterConstraints(
            sharding_types=[sharding] if sharding else list(SHARDING_TYPES),
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            min_partition=column_shard_width(config.embedding_dim, world_size))
        for name, config in zip(TABLES, model.tables.embedding_configs())}
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size,
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size))),
        kernel_config=KernelConfig(compute_device=device.type))
    sharders = [EmbeddingCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(STORAGE_RESERVATION))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    # Each process draws its shards from a stream of its own: with the shared
    # seed, the shards of different processes would start as copies.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed((torch.initial_seed() + dist.get_rank()) % 2**63)
        sharded = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    with torch.no_grad():
        for _, offsets, shard in _local_table_shards(sharded):
            if offsets[0] == 0:
                shard[0].zero_()  # the padding row, as in DIN
    return sharded


def plan_summary(sharded: DistributedModelParallel) -> dict:
    """The plan TorchRec chose, for the metrics and the log.

    Args:
        sharded: a TorchRecDIN from :func:`shard_model`.

    Returns:
        {"item", "category": {"sharding_type": str, "ranks": [int]}}.
    """
    plan = sharded.plan.get_plan_for_module(TABLES_MODULE)
    return {name: {"sharding_type": plan[name].sharding_type, "ranks": plan[name].ranks}
            for name in TABLES}


def _local_table_shards(sharded: DistributedModelParallel):
    """(table, [row, column] offsets, tensor) of this process's table shards;
    the tensors share storage with the weights the fused kernel trains."""
    for key, value in sharded.state_dict().items():
        if isinstance(value, ShardedTensor):
            table = _table_of(key)
            for shard in value.local_shards():
                yield table, shard.metadata.shard_offsets, shard.tensor


def _table_of(state_key: str) -> str:
    prefix, _, table = state_key.rpartition(".weight")[0].rpartition(".")
    if table not in TABLES or not prefix.startswith(TABLES_MODULE + "."):
        raise ValueError(f"state_dict key {state_key!r} is not a weight of the tables "
                         f"{tuple(TABLES)}")
    return table


def din_state_dict(sharded: DistributedModelParallel) -> Optional[dict]:
    """din_fast.DIN's state_dict of a sharded TorchRecDIN, gathered. A
    collective: every rank must call it. Rank 0 holds each whole table for a
    moment, so this serves tables that fit in one process's memory.

    Args:
        sharded: a TorchRecDIN from :func:`shard_model`.

    Returns:
        On rank 0 the state_dict, CPU tensors under din_fast.DIN's keys (the
        tables as ``item_embedding.weight`` and
        ``category_embedding.weight``); None on the other ranks.
    """
    rank = dist.get_rank()
    state = {}
    for key, value in sharded.state_dict().items():
        if isinstance(value, ShardedTensor):
            whole = torch.empty(value.size(), dtype=value.dtype,
                                device=_gather_device()) if rank == 0 else None
            value.gather(dst=0, out=whole)
            if rank == 0:
                state[TABLES[_table_of(key)][1]] = whole.cpu()
        else:
            state[key] = value.detach().cpu()
    return state if rank == 0 else None


def _gather_device() -> torch.device:
    if dist.get_backend() == "nccl":  # NCCL gathers into CUDA memory
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def load_din_state_dict(sharded: DistributedModelParallel, state: dict) -> None:
    """Copy a din_fast.DIN state_dict (the whole tables, on every rank) into a
    sharded TorchRecDIN: each process takes its own slices of the tables.

    Args:
        sharded: a TorchRecDIN from :func:`shard_model`.
        state: din_fast.DIN's state_dict of the same sizes (what
            :func:`din_state_dict` returns), on every rank.

    Raises:
        ValueError: ``state`` lacks a key of din_fast.DIN's state_dict or
            has another, or a tensor of another shape than the model's
            (checked before anything is copied: ``copy_`` would broadcast
            one of shape [1] or [1, D] silently).
    """
    own = sharded.state_dict()
    # din_fast.DIN's name and whole shape of each tensor (a table's global one).
    expected = {TABLES[_table_of(k)][1] if isinstance(v, ShardedTensor) else k: tuple(v.size())
                for k, v in own.items()}
    if set(expected) != set(state):
        raise ValueError(f"load_din_state_dict: `state` must have the keys of din_fast.DIN's "
                         f"state_dict; missing {sorted(set(expected) - set(state))}, unexpected "
                         f"{sorted(set(state) - set(expected))}")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"load_din_state_dict: `state[{key!r}]` has shape "
                             f"{list(state[key].shape)}; the sharded model needs {list(shape)} "
                             "(a din_fast.DIN state_dict of the same sizes)")
    for key, value in own.items():
        if not isinstance(value, ShardedTensor):
            value.copy_(state[key])
    for table, (row, column), shard in _local_table_shards(sharded):
        whole = state[TABLES[table][1]]
        shard.copy_(whole[row:row + shard.shape[0], column:column + shard.shape[1]])
