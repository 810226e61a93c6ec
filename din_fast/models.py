"""CTR models: DIN (attention pooling of the history) and its sum-pooling BaseModel.

Both embed an item as [item embedding | category embedding] (one table each,
row 0 the padding and kept at zero), use the candidate item as the query, pool
the history into a user-interest vector, and score MLP([interest, candidate])
as a logit (the DIN paper's input; ``mlp_input="product"`` appends
interest * candidate); the sigmoid of it is the click probability. The two
differ only in the pooling, which is what the DIN paper's DIN vs. BaseModel
comparison measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dice_statistics import batch_moments, update_running
from .modules import DINAttention
from .problem import DEFAULT_DICE_EPS, check_all

ID_DTYPES = (torch.int32, torch.int64)

MLP_ACTIVATIONS = ("prelu", "dice")
MLP_INPUTS = ("concat", "product")
EMBEDDING_INIT_STD = 0.05


class Dice(nn.Module):
    """The DIN paper's Dice activation for the scoring MLP: p = sigmoid of the
    batch-normalized input (running statistics at eval), f = p x + (1-p) a x.

    The statistics are BatchNorm1d's (``norm``), over the batch's rows; with
    ``statistics_group`` set (din_fast.synchronize_dice_statistics) over every
    process's rows, updating ``norm``'s running estimates the same way."""

    def __init__(self, width: int, eps: float = DEFAULT_DICE_EPS):
        super().__init__()
        self.norm = nn.BatchNorm1d(width, eps=eps, affine=False)
        self.alpha = nn.Parameter(torch.zeros(width))
        self.statistics_group = None

    def forward(self, x):
        p = torch.sigmoid(self._normalized(x))
        return x * (self.alpha + p * (1 - self.alpha))

    def _normalized(self, x):
        if not self.training or self.statistics_group is None:
            return self.norm(x)
        mean, var, count = batch_moments(x, None, self.statistics_group)
        update_running(self.norm.running_mean, self.norm.running_var, mean, var, count,
                       self.norm.momentum)
        self.norm.num_batches_tracked.add_(1)
        return (x - mean) * torch.rsqrt(var + self.norm.eps)


def check_within(subject: str, name: str, values: torch.Tensor, high, needs: str,
                 high_name: str = "") -> None:
    """0 <= values <= high, else "<subject> must lie in <needs>" (see
    problem.check_all), naming on CPU the first element outside (and the
    bound's value, called ``high_name`` in ``needs``)."""
    outside = (values < 0) | (values > high)

    def first_outside():
        index = tuple(outside.nonzero()[0].tolist())
        bound = f" with {high_name} = {high}" if high_name else ""
        return f"; got {name}[{', '.join(map(str, index))}] = {int(values[index])}{bound}"
    check_all(~outside, f"{subject} must lie in {needs}", first_outside)


def scoring_mlp(in_features: int, hidden_units, activation: str) -> nn.Sequential:
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"`mlp_activation` must be one of {MLP_ACTIVATIONS}; got {activation!r}")
    layers, width = [], in_features
    for units in hidden_units:
        layers += [nn.Linear(width, units),
                   nn.PReLU(units) if activation == "prelu" else Dice(units)]
        width = units
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mlp_width(embed_dim: int, mlp_input: str) -> int:
    """The scoring MLP's input width for items of 2 * embed_dim."""
    if mlp_input not in MLP_INPUTS:
        raise ValueError(f"`mlp_input` must be one of {MLP_INPUTS}; got {mlp_input!r}")
    return 6 * embed_dim if mlp_input == "product" else 4 * embed_dim


def score(mlp: nn.Module, mlp_input: str, interest, candidate):
    """Logits [...] of MLP([interest, candidate]) (``mlp_input`` "concat") or
    MLP([interest, candidate, interest * candidate]) ("product"), for
    interest and candidate [..., 2E]."""
    features = [interest, candidate]
    if mlp_input == "product":
        features.append(interest * candidate)
    features = torch.cat(features, -1)
    # The MLP sees rows of features: its Dice normalizes per unit (BatchNorm1d).
    return mlp(features.flatten(0, -2)).view(features.shape[:-1])


class BaseModel(nn.Module):
    """Embedding + sum pooling of the history + MLP (the DIN paper's BaseModel).

    The sum runs over each row's first ``lengths[b]`` positions, as DIN's
    attention does: ids past a row's length never reach the score.

    Args:
        num_items: the items of the id maps; the item table has one more row,
            row 0 the padding (kept at zero).
        num_categories: likewise for the category table.
        embed_dim: the size of each table, so an item (and the attention's
            query and keys in DIN) is 2 * embed_dim wide.
        mlp_hidden: the scoring MLP's hidden widths.
        mlp_activation: "dice" (the paper's) or "prelu".
        backend: the attention backend (din_attention's); BaseModel has no
            attention and keeps it only so that both models take the same
            arguments.
        mlp_input: "concat" (MLP over [interest, candidate], the paper's) or
            "product" (interest * candidate appended).

    Raises:
        ValueError: an unknown ``mlp_activation`` or ``mlp_input``.
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 32,
                 mlp_hidden=(200, 80), mlp_activation: str = "dice", backend: str = "auto",
                 mlp_input: str = "concat"):
        super().__init__()
        width = mlp_width(embed_dim, mlp_input)
        self.backend = backend
        self.mlp_input = mlp_input
        self.item_embedding = nn.Embedding(num_items + 1, embed_dim, padding_idx=0)
        self.category_embedding = nn.Embedding(num_categories + 1, embed_dim, padding_idx=0)
        for table in (self.item_embedding, self.category_embedding):
            nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()
        self.mlp = scoring_mlp(width, mlp_hidden, mlp_activation)

    def embed(self, items, categories):
        return torch.cat([self.item_embedding(items), self.category_embedding(categories)], -1)

    def pool(self, candidate, history, lengths, categories=None):
        """User interest, [B, 2E] (or [B, C, 2E] for C candidates [B, C, 2E]
        per row): the sum of each row's first lengths[b] positions; whatever
        lies past them is never read (a select, so its gradient is 0).
        ``categories`` is (the candidates', the history's) category ids, for a
        search that reads them."""
        valid = torch.arange(history.shape[1], device=history.device) < lengths[:, None]
        interest = torch.where(valid[..., None], history, history.new_zeros(())).sum(1)
        return interest if candidate.dim() == 2 else interest[:, None].expand_as(candidate)

    def attention_backend(self):
        """The backend the attention runs in the current mode, None without attention."""
        return None

    def check_inputs(self, history_items, history_categories, lengths, target_items,
                     target_categories) -> None:
        """forward's inputs checked, named as forward names them (the messages
        also serve as the asserts of an exported graph: no sizes in them,
        which would be symbols there)."""
        owner = type(self).__name__
        inputs = {"history_items": history_items, "history_categories": history_categories,
                  "lengths": lengths, "target_items": target_items,
                  "target_categories": target_categories}
        for name, tensor in inputs.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in ID_DTYPES:
                got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise TypeError(f"{owner}: `{name}` must be an int32 or int64 tensor; got {got}")
        if history_items.dim() != 2 or history_categories.shape != history_items.shape:
            raise ValueError(f"{owner}: `history_items` and `history_categories` must both be "
                             f"[B, T]; got {tuple(history_items.shape)} and "
                             f"{tuple(history_categories.shape)}")
        batch = history_items.shape[0]
        if lengths.shape != (batch,):
            raise ValueError(f"{owner}: `lengths` must be [B] with B = {batch}, the rows of "
                             f"`history_items`; got {tuple(lengths.shape)}")
        if target_items.dim() not in (1, 2) or target_items.shape[0] != batch \
                or target_categories.shape != target_items.shape:
            raise ValueError(f"{owner}: `target_items` and `target_categories` must both be [B] "
                             f"(or [B, C] for C candidates) with B = {batch}, the rows of "
                             f"`history_items`; got {tuple(target_items.shape)} and "
                             f"{tuple(target_categories.shape)}")
        tables = {"item": self.item_embedding.num_embeddings - 1,
                  "category": self.category_embedding.num_embeddings - 1}
        for name, tensor in inputs.items():
            if name == "lengths":
                check_within(f"{owner}: `lengths`", name, tensor, history_items.shape[1],
                             "[0, T], T the width of `history_items`", "T")
            else:
                table = "item" if name.endswith("items") else "category"
                check_within(f"{owner}: `{name}`", name, tensor, tables[table],
                             f"[0, {tables[table]}], the {table} table's ids")

    def embedding_tables(self):
        """(table, which ids index it: "item" or "category")."""
        return [(self.item_embedding, "item"), (self.category_embedding, "category")]

    def forward(self, history_items, history_categories, lengths, target_items,
                target_categories):
        """Logits [B] for batches of data.Batch's fields; with C candidates per
        row (``target_items`` and ``target_categories`` [B, C]) logits [B, C],
        each history pooled once for all of its candidates.

        Args:
            history_items: [B, T] int32/int64 dense item ids, oldest first, 0
                (the padding) after ``lengths[b]``.
            history_categories: [B, T] the dense category of each.
            lengths: [B] int32/int64, each row's history length, in [0, T].
            target_items: [B] (or [B, C]) the candidates' dense item ids.
            target_categories: [B] (or [B, C]) their dense categories.

        Returns:
            The logits [B] (or [B, C]); the click probability is their sigmoid.

        Raises:
            TypeError: an input that is not an int32/int64 tensor.
            ValueError: shapes that do not fit together, an id outside the
                tables (0, the padding, up to num_items and num_categories),
                ``lengths`` outside [0, T]; on CPU. On an accelerator, and in
                a compiled or exported graph, an asynchronous assert with the
                same message (no host sync).
        """
        self.check_inputs(history_items, history_categories, lengths, target_items,
                          target_categories)
        candidate = self.embed(target_items, target_categories)
        history = self.embed(history_items, history_categories)
        interest = self.pool(candidate, history, lengths, (target_categories, history_categories))
        return score(self.mlp, self.mlp_input, interest, candidate)


class DIN(BaseModel):
    """Deep Interest Network: the history pooled by DINAttention with the
    candidate as the query (the paper's local activation unit, 80-40, Dice by
    default as in the paper).

    The weights are a softmax over the history by default, as in the original
    released DIN code; ``attention_normalization=None`` gives the paper's raw
    scores (on the Amazon sets softmax won; see the training guide's recipe
    section).

    ``top_k`` K makes the attention two-stage (din_fast.din_attention_top_k):
    ``search`` keeps each candidate's K best history items, "din" by the
    attention's own score, "dot" by learned projections (trained by
    :meth:`auxiliary_loss`, SIM's auxiliary CTR loss over the whole history),
    "category" by the candidate's category; the attention pools those alone.

    Args:
        num_items: the items of the id maps, as BaseModel's.
        num_categories: the categories, as BaseModel's.
        embed_dim: each table's size, as BaseModel's.
        mlp_hidden: the scoring MLP's hidden widths.
        mlp_activation: the scoring MLP's activation, as BaseModel's.
        backend: the attention backend (din_attention's).
        mlp_input: the scoring MLP's input, as BaseModel's.
        attention_hidden: the attention unit's hidden widths.
        attention_activation: "dice", "sigmoid", "relu" or "prelu".
        attention_normalization: "softmax" or None (raw scores).
        top_k: None (exact DIN) or K, two-stage attention.
        search: the two-stage search, "din", "dot" or "category".

    Raises:
        ValueError: as BaseModel, and for the attention options
            (DINAttention's checks).
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 32,
                 mlp_hidden=(200, 80), mlp_activation: str = "dice", backend: str = "auto",
                 mlp_input: str = "concat", attention_hidden=(80, 40),
                 attention_activation: str = "dice", attention_normalization="softmax",
                 top_k=None, search: str = "din"):
        super().__init__(num_items, num_categories, embed_dim, mlp_hidden, mlp_activation,
                         backend, mlp_input)
        self.attention = DINAttention(2 * embed_dim, attention_hidden, attention_activation,
                                      normalization=attention_normalization, backend=backend,
                                      top_k=top_k, search=search)

    def pool(self, candidate, history, lengths, categories=None):
        if self.attention.search != "category":
            return self.attention(candidate, history, lengths)
        return self.attention(candidate, history, lengths, query_categories=categories[0],
                              key_categories=categories[1])

    def auxiliary_loss(self, history_items, history_categories, lengths, target_items,
                       target_categories, labels):
        """With the "dot" search: SIM's auxiliary CTR loss, the binary cross
        entropy of the search's own logits (DINAttention.search_logits: the
        softmax of the projections' scores over the whole history pooling
        those scores) against the labels. It trains the projections alone;
        None for the other searches."""
        if self.attention.search != "dot":
            return None
        logits = self.attention.search_logits(self.embed(target_items, target_categories),
                                              self.embed(history_items, history_categories),
                                              lengths)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def attention_backend(self):
        return self.attention.resolved_backend()


MODELS = {"din": DIN, "base": BaseModel}
