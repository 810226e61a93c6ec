"""CTR models: DIN (attention pooling of the history) and its sum-pooling BaseModel.

Both embed an item as [item embedding | category embedding] (one table each,
row 0 the padding and kept at zero; the item embedding alone for data without
categories), use the candidate item as the query, pool the history into a
user-interest vector, and score MLP([interest, candidate, side features])
as a logit (the DIN paper's input; ``mlp_input="product"`` appends
interest * candidate); the sigmoid of it is the click probability. Side
features (user profile, item and context columns, as the DIN paper's model
has beside the behaviours) are one embedding table each, a multi-valued one
mean-pooled, and numeric columns as they are. The two models differ only in
the pooling, which is what the DIN paper's DIN vs. BaseModel comparison
measures.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from din_fast.dice_statistics import DiceStatistics, batch_moments, update_running
from din_fast.modules import DINAttention
from din_fast.problem import DEFAULT_DICE_EPS, check_all, plain_values

ID_DTYPES = (torch.int32, torch.int64)

MLP_ACTIVATIONS = ("prelu", "dice")
MLP_INPUTS = ("concat", "product")
EMBEDDING_INIT_STD = 0.05


class Dice(DiceStatistics, nn.Module):
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
        """Dice of ``x``, [N, width] (BatchNorm1d's input), its shape kept."""
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
    values = plain_values(values)   # under vmap: every sample's, as one check
    outside = (values < 0) | (values > high)

    def first_outside():
        index = tuple(outside.nonzero()[0].tolist())
        bound = f" with {high_name} = {high}" if high_name else ""
        return f"; got {name}[{', '.join(map(str, index))}] = {int(values[index])}{bound}"
    check_all(~outside, f"{subject} must lie in {needs}", first_outside)


def scoring_mlp(in_features: int, hidden_units, activation: str) -> nn.Sequential:
    """The scoring MLP: Linear + activation per hidden width, then a Linear
    to one logit; ValueError for an ``activation`` not in MLP_ACTIVATIONS."""
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"`mlp_activation` must be one of {MLP_ACTIVATIONS}; got {activation!r}")
    layers, width = [], in_features
    for units in hidden_units:
        layers += [nn.Linear(width, units),
                   nn.PReLU(units) if activation == "prelu" else Dice(units)]
        width = units
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def mlp_width(item_width: int, mlp_input: str) -> int:
    """The scoring MLP's input width for items ``item_width`` wide (side features aside)."""
    if mlp_input not in MLP_INPUTS:
        raise ValueError(f"`mlp_input` must be one of {MLP_INPUTS}; got {mlp_input!r}")
    return 3 * item_width if mlp_input == "product" else 2 * item_width


def score(mlp: nn.Module, mlp_input: str, interest, candidate, side=None):
    """Logits [...] of MLP([interest, candidate]) (``mlp_input`` "concat") or
    MLP([interest, candidate, interest * candidate]) ("product"), for
    interest and candidate [..., W], with the side features [..., S] appended
    where given."""
    features = [interest, candidate]
    if mlp_input == "product":
        features.append(interest * candidate)
    if side is not None:
        features.append(side)
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
        num_categories: likewise for the category table; 0 for none (the
            item embedding alone is an item; forward takes None for the
            categories).
        embed_dim: the size of each table, so an item (and the attention's
            query and keys in DIN) is 2 * embed_dim wide (embed_dim without
            categories).
        mlp_hidden: the scoring MLP's hidden widths.
        mlp_activation: "dice" (the paper's) or "prelu".
        backend: the attention backend (din_attention's); BaseModel has no
            attention and keeps it only so that both models take the same
            arguments.
        mlp_input: "concat" (MLP over [interest, candidate], the paper's) or
            "product" (interest * candidate appended).
        features: {side feature: its number of ids}: a table each (row 0
            the padding), whose mean over a row's ids enters the MLP beside
            [interest, candidate].
        numeric_features: the number of numeric side features, entering the
            MLP as they are.
        feature_dim: the side features' embedding size (default embed_dim).
        linear: add a linear part to the logit, as DeepFM and Wide & Deep have
            beside their deep part: a learned weight per id of the candidate's
            item, category and side features (a multi-valued one's mean) and
            per numeric feature.
        history_cross: the width of HistoryCross's factors, a term added to
            the logit; 0 for none.

    Raises:
        ValueError: an unknown ``mlp_activation`` or ``mlp_input``.
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 32,
                 mlp_hidden=(200, 80), mlp_activation: str = "dice", backend: str = "auto",
                 mlp_input: str = "concat", features=None, numeric_features: int = 0,
                 feature_dim=None, linear: bool = False, history_cross: int = 0):
        super().__init__()
        self.backend = backend
        self.mlp_input = mlp_input
        self.item_embedding = _embedding(num_items, embed_dim)
        self.category_embedding = _embedding(num_categories, embed_dim) if num_categories \
            else None
        self.item_width = embed_dim * (2 if num_categories else 1)
        features = dict(features or {})
        feature_dim = embed_dim if feature_dim is None else feature_dim
        # In a list, not a ModuleDict: a column name may hold a dot.
        self.feature_names = tuple(features)
        self.feature_embeddings = nn.ModuleList(_embedding(size, feature_dim)
                                                for size in features.values())
        for table in [self.item_embedding, self.category_embedding, *self.feature_embeddings]:
            if table is not None:
                nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
                with torch.no_grad():
                    table.weight[0].zero_()
        self.numeric_features = numeric_features
        side = len(features) * feature_dim + numeric_features
        self.mlp = scoring_mlp(mlp_width(self.item_width, mlp_input) + side, mlp_hidden,
                               mlp_activation)
        # The linear part: a weight per id of the candidate's tables (zero at
        # first, the padding's kept at zero) and per numeric feature.
        self.linear = None
        if linear:
            self.linear = nn.ModuleDict({
                "item": _embedding(num_items, 1), "features": nn.ModuleList(
                    _embedding(size, 1) for size in features.values())})
            if num_categories:
                self.linear["category"] = _embedding(num_categories, 1)
            if numeric_features:
                self.linear["numeric"] = nn.Linear(numeric_features, 1, bias=False)
            for parameter in self.linear.parameters():
                nn.init.zeros_(parameter)
        self.history_cross = (HistoryCross(num_items, num_categories, history_cross)
                              if history_cross else None)

    def embed(self, items, categories):
        """Items as the model sees them: [item embedding | category embedding].

        Args:
            items: int32/int64 dense item ids, any shape [...] (0 the
                padding, whose row is zero).
            categories: their dense category ids, the same shape; ignored
                (pass None) without a category table.

        Returns:
            [..., W] in the tables' dtype, W = 2 * embed_dim (embed_dim
            without a category table).
        """
        if self.category_embedding is None:
            return self.item_embedding(items)
        return torch.cat([self.item_embedding(items), self.category_embedding(categories)], -1)

    def pool(self, candidate, history, lengths, categories=None):
        """The user interest: the sum of each row's first ``lengths[b]``
        history positions; whatever lies past them is never read (a select,
        so its gradient is 0).

        Args:
            candidate: the embedded candidates, [B, W] or [B, C, W] (only
                the shape is read here: the interest is the same for every
                candidate of a row).
            history: the embedded history, [B, T, W].
            lengths: [B] int32/int64, each row's history length, in [0, T].
            categories: (the candidates', the history's) category ids, for
                DIN's "category" search; not read here.

        Returns:
            [B, W] for a 2-D ``candidate``, else [B, C, W] (each row's sum
            broadcast to its candidates).
        """
        interest = _sum_of_valid(history, lengths)
        return interest if candidate.dim() == 2 else interest[:, None].expand_as(candidate)

    def side_features(self, candidate, features, numeric):
        """The side features' part of the scoring MLP's input.

        Args:
            candidate: the embedded candidates, [B, W] or [B, C, W] (only
                the shape is read).
            features: {side feature: int ids [B, V] or [B, C, V]}, 0 padding
                a row's values; each of the model's side features (None or
                {} for a model without any).
            numeric: the numeric side features, floating [B, N] or
                [B, C, N]; None for a model without any.

        Returns:
            [..., S] over the candidates' leading dims ([B] or [B, C]; a
            row's [B, V] broadcast to its C candidates): each categorical
            feature's embedding (the mean over a row's non-padding ids, zero
            for none), then the numeric features, in the item table's dtype;
            None for a model without side features.
        """
        parts = []
        for name, table in zip(self.feature_names, self.feature_embeddings):
            ids = features[name]
            count = (ids != 0).sum(-1, keepdim=True).clamp(min=1)
            parts.append(table(ids).sum(-2) / count.to(table.weight.dtype))
        if self.numeric_features:
            parts.append(numeric.to(self.item_embedding.weight.dtype))
        if not parts:
            return None
        leading = candidate.shape[:-1]
        return torch.cat([p if p.dim() == len(leading) + 1
                          else p[:, None].expand(*leading, p.shape[-1]) for p in parts], -1)

    def attention_backend(self):
        """The backend the attention runs in the current mode, None without attention."""
        return None

    def check_inputs(self, history_items, history_categories, lengths, target_items,
                     target_categories, features=None, numeric=None) -> None:
        """Check forward's inputs, naming each as forward names it.

        The messages of the value checks also serve as the asserts of a
        compiled or exported graph: they hold no sizes, which would be
        symbols there.

        Args:
            history_items: [B, T] int32/int64 dense item ids.
            history_categories: [B, T] int32/int64 dense category ids; None
                without a category table.
            lengths: [B] int32/int64, in [0, T].
            target_items: [B] or [B, C] int32/int64 dense item ids.
            target_categories: the shape of ``target_items``, int32/int64;
                None without a category table.
            features: {side feature: int32/int64 ids [B, V] or [B, C, V]},
                exactly the model's side features.
            numeric: floating [B, N] or [B, C, N], N the model's numeric
                features; None without any.

        Raises:
            TypeError: an id input or a side feature that is not an
                int32/int64 tensor, ``numeric`` not a floating-point tensor.
            ValueError: categories given to a model without a category
                table, shapes that do not fit together, side features that
                are not the model's, ``numeric`` given to a model without
                numeric features; on CPU, an id outside its table ([0, the
                table's ids]) or a length outside [0, T] (on an accelerator,
                or while compiling or exporting, an asynchronous assert with
                the same message instead).
        """
        owner = type(self).__name__
        inputs = {"history_items": history_items, "history_categories": history_categories,
                  "lengths": lengths, "target_items": target_items,
                  "target_categories": target_categories}
        if self.category_embedding is None:
            given = [name for name in ("history_categories", "target_categories")
                     if inputs.pop(name) is not None]
            if given:
                raise ValueError(f"{owner}: `{given[0]}` must be None: the model has no "
                                 "category table (num_categories=0)")
        inputs.update({name: (features or {}).get(name) for name in self.feature_names})
        for name, tensor in inputs.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in ID_DTYPES:
                got = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                what = f"features[{name!r}]" if name in self.feature_names else f"`{name}`"
                raise TypeError(f"{owner}: {what} must be an int32 or int64 tensor; got {got}")
        categories = self.category_embedding is not None
        if history_items.dim() != 2 or categories and history_categories.shape != \
                history_items.shape:
            raise ValueError(f"{owner}: `history_items` and `history_categories` must both be "
                             f"[B, T]; got {tuple(history_items.shape)} and "
                             f"{tuple(history_categories.shape) if categories else None}")
        batch = history_items.shape[0]
        if lengths.shape != (batch,):
            raise ValueError(f"{owner}: `lengths` must be [B] with B = {batch}, the rows of "
                             f"`history_items`; got {tuple(lengths.shape)}")
        if target_items.dim() not in (1, 2) or target_items.shape[0] != batch \
                or categories and target_categories.shape != target_items.shape:
            raise ValueError(f"{owner}: `target_items` and `target_categories` must both be [B] "
                             f"(or [B, C] for C candidates) with B = {batch}, the rows of "
                             f"`history_items`; got {tuple(target_items.shape)} and "
                             f"{tuple(target_categories.shape) if categories else None}")
        self._check_side_shapes(owner, target_items.shape, features, numeric)
        tables = {"item": self.item_embedding.num_embeddings - 1}
        if categories:
            tables["category"] = self.category_embedding.num_embeddings - 1
        tables.update({name: table.num_embeddings - 1
                       for name, table in zip(self.feature_names, self.feature_embeddings)})
        for name, tensor in inputs.items():
            if name == "lengths":
                check_within(f"{owner}: `lengths`", name, tensor, history_items.shape[1],
                             "[0, T], T the width of `history_items`", "T")
            elif name in self.feature_names:
                check_within(f"{owner}: features[{name!r}]", name, tensor, tables[name],
                             f"[0, {tables[name]}], the feature table's ids")
            else:
                table = "item" if name.endswith("items") else "category"
                check_within(f"{owner}: `{name}`", name, tensor, tables[table],
                             f"[0, {tables[table]}], the {table} table's ids")

    def _check_side_shapes(self, owner, targets, features, numeric) -> None:
        """Side features [B, V] or, with C candidates, [B, C, V]; numeric ones
        [B, N] or [B, C, N]; exactly the model's."""
        extra = sorted(set(features or {}) - set(self.feature_names))
        if extra:
            raise ValueError(f"{owner}: features {extra} are not the model's; it takes "
                             f"{list(self.feature_names)}")
        for name in self.feature_names:
            shape = tuple(features[name].shape)
            if not (len(shape) in (2, len(targets) + 1) and shape[:len(shape) - 1] ==
                    tuple(targets)[:len(shape) - 1]):
                raise ValueError(f"{owner}: features[{name!r}] must be [B, V] (or [B, C, V] "
                                 f"for C candidates) with [B] or [B, C] = {tuple(targets)}, "
                                 f"the shape of `target_items`; got {shape}")
        if not self.numeric_features:
            if numeric is not None:
                raise ValueError(f"{owner}: `numeric` must be None: the model has no numeric "
                                 "features")
            return
        if not isinstance(numeric, torch.Tensor) or not numeric.is_floating_point():
            got = numeric.dtype if isinstance(numeric, torch.Tensor) else type(numeric).__name__
            raise TypeError(f"{owner}: `numeric` must be a floating-point tensor; got {got}")
        shape = tuple(numeric.shape)
        if not (len(shape) in (2, len(targets) + 1) and shape[-1] == self.numeric_features
                and shape[:len(shape) - 1] == tuple(targets)[:len(shape) - 1]):
            raise ValueError(f"{owner}: `numeric` must be [B, N] (or [B, C, N]) with N = "
                             f"{self.numeric_features} and [B] or [B, C] = {tuple(targets)}, "
                             f"the shape of `target_items`; got {shape}")

    def embedding_tables(self):
        """(table, which ids index it: "item", "category" or a feature's name),
        the linear part's tables among them."""
        tables = [(self.item_embedding, "item")]
        if self.category_embedding is not None:
            tables.append((self.category_embedding, "category"))
        tables += list(zip(self.feature_embeddings, self.feature_names))
        if self.linear is not None:
            tables += [(self.linear[kind], kind) for kind in ("item", "category")
                       if kind in self.linear]
            tables += list(zip(self.linear["features"], self.feature_names))
        return tables

    def forward(self, history_items, history_categories, lengths, target_items,
                target_categories, features=None, numeric=None):
        """Logits [B] for batches of data.Batch's fields; with C candidates per
        row (``target_items`` and ``target_categories`` [B, C]) logits [B, C],
        each history pooled once for all of its candidates.

        Args:
            history_items: [B, T] int32/int64 dense item ids, oldest first, 0
                (the padding) after ``lengths[b]``.
            history_categories: [B, T] the dense category of each (None
                without a category table).
            lengths: [B] int32/int64, each row's history length, in [0, T].
            target_items: [B] (or [B, C]) the candidates' dense item ids.
            target_categories: [B] (or [B, C]) their dense categories (None
                without a category table).
            features: {side feature: [B, V] ids} (or [B, C, V]; a row's [B, V]
                serves all of its candidates), 0 padding a row's values;
                each of the model's side features, no other.
            numeric: [B, N] (or [B, C, N]) the numeric side features, as
                standardized in training; None without any.

        Returns:
            The logits [B] (or [B, C]); the click probability is their sigmoid.

        Raises:
            TypeError: an input that is not an int32/int64 tensor (numeric: not
                floating point).
            ValueError: shapes that do not fit together, an id outside the
                tables (0, the padding, up to num_items and num_categories),
                ``lengths`` outside [0, T]; on CPU. On an accelerator, and in
                a compiled or exported graph, an asynchronous assert with the
                same message (no host sync).
        """
        self.check_inputs(history_items, history_categories, lengths, target_items,
                          target_categories, features, numeric)
        candidate = self.embed(target_items, target_categories)
        history = self.embed(history_items, history_categories)
        interest = self.pool(candidate, history, lengths,
                             (target_categories, history_categories))
        logits = score(self.mlp, self.mlp_input, interest, candidate,
                       self.side_features(candidate, features, numeric))
        return self.add_shallow_terms(logits, history_items, history_categories, lengths,
                                      target_items, target_categories, features, numeric)

    def add_shallow_terms(self, logits, history_items, history_categories, lengths,
                          target_items, target_categories, features, numeric):
        """``logits`` (the deep part's) plus the terms the model adds beside
        it: the linear part (add_linear) and the history cross term, each
        where the model has it. Every forward of the model (the ONNX
        export's too) ends here, so that none leaves one out.

        Args:
            logits: the deep part's logits, [B] or [B, C].
            history_items: [B, T] dense item ids, as forward takes them.
            history_categories: [B, T] their categories (None without a
                category table).
            lengths: [B], each row's history length.
            target_items: the candidates' dense item ids, the shape of
                ``logits``.
            target_categories: their categories, the same shape (None
                without a category table).
            features: {side feature: ids}, as forward takes them.
            numeric: the numeric side features, as forward takes them.

        Returns:
            [B] or [B, C], the shape of ``logits``.
        """
        logits = self.add_linear(logits, target_items, target_categories, features, numeric)
        if self.history_cross is None:
            return logits
        return logits + self.history_cross(history_items, history_categories, lengths,
                                           target_items, target_categories)

    def add_linear(self, logits, target_items, target_categories, features, numeric):
        """``logits`` plus the linear part, where the model has one (else
        ``logits`` unchanged).

        The linear part is the weights of the candidate's item and category,
        the mean weight of each side feature's non-padding ids and the
        numeric features' weighted sum.

        Args:
            logits: the deep part's logits, [B] or [B, C].
            target_items: the candidates' dense item ids, the shape of
                ``logits``.
            target_categories: their dense categories, the same shape (None
                without a category table).
            features: {side feature: ids [B, V] or [B, C, V]}, as forward
                takes them (a row's [B, V] serves all of its candidates).
            numeric: floating [B, N] or [B, C, N]; None without numeric
                features.

        Returns:
            [B] or [B, C], the shape of ``logits``.
        """
        if self.linear is None:
            return logits
        terms = [self.linear["item"](target_items)[..., 0]]
        if "category" in self.linear:
            terms.append(self.linear["category"](target_categories)[..., 0])
        for name, table in zip(self.feature_names, self.linear["features"]):
            ids = features[name]
            count = (ids != 0).sum(-1).clamp(min=1).to(table.weight.dtype)
            terms.append(table(ids)[..., 0].sum(-1) / count)
        if self.numeric_features:
            terms.append(self.linear["numeric"](numeric.to(logits.dtype))[..., 0])
        # A row's [B] side features serve its [B, C] candidates.
        return logits + sum(t if t.dim() == logits.dim() else t[:, None] for t in terms)


class HistoryCross(nn.Module):
    """A factorized interaction of the candidate with its history, added to
    the logit: the dot product of the candidate item's factors with the mean
    of the history items' factors, plus the same over their categories
    (tables of their own, apart from the embeddings). It is the pairwise
    term a factorization machine has between the candidate and the
    behaviours, or FISM's item-to-item similarity: "like what this user
    liked", one product a row, where the deep part has to learn the same
    from concatenated embeddings. Trained at a rate of its own
    (din-fast train --history-cross-lr): at the deep part's slow rate it
    learns nothing, at the linear part's fast one it overfits in an epoch.

    Args:
        num_items: the item table's ids beyond the padding (row 0, kept at
            zero).
        num_categories: likewise for categories; 0 for none (items alone).
        dim: the factors' width.
    """

    def __init__(self, num_items: int, num_categories: int, dim: int):
        super().__init__()
        self.item = _embedding(num_items, dim)
        self.category = _embedding(num_categories, dim) if num_categories else None
        for table in (self.item, self.category):
            if table is not None:
                nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
                with torch.no_grad():
                    table.weight[0].zero_()

    def forward(self, history_items, history_categories, lengths, target_items,
                target_categories):
        """The term for BaseModel.forward's inputs: each row's mean over its
        first ``lengths[b]`` positions (0 for an empty history; what lies
        past them is never read).

        Args:
            history_items: [B, T] int32/int64 dense item ids.
            history_categories: [B, T] their dense categories (None without
                a category table).
            lengths: [B] int32/int64, each row's history length, in [0, T].
            target_items: [B] (or [B, C]) the candidates' dense item ids.
            target_categories: [B] (or [B, C]) their dense categories (None
                without a category table).

        Returns:
            [B] (or [B, C]) in the tables' dtype.
        """
        count = lengths.clamp(min=1)[:, None]
        pairs = [(self.item, history_items, target_items)]
        if self.category is not None:
            pairs.append((self.category, history_categories, target_categories))
        term = 0
        for table, history, target in pairs:
            mean = _sum_of_valid(table(history), lengths)
            mean = mean / count.to(mean.dtype)
            candidate = table(target)                          # [B, F] or [B, C, F]
            term = term + (candidate * (mean if candidate.dim() == 2 else mean[:, None])).sum(-1)
        return term


def _sum_of_valid(history, lengths):
    """[B, W]: the sum of each row's first ``lengths[b]`` positions of
    ``history`` [B, T, W]; whatever lies past them is never read (a select,
    so its gradient is 0)."""
    valid = torch.arange(history.shape[1], device=history.device) < lengths[:, None]
    return torch.where(valid[..., None], history, history.new_zeros(())).sum(1)


def _embedding(num_ids: int, dim: int) -> nn.Embedding:
    """A table of ``num_ids`` ids and the padding row 0 (kept at zero)."""
    return nn.Embedding(num_ids + 1, dim, padding_idx=0)


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
        search: the two-stage search, "din", "dot" or "category" (which
            needs categories).
        features: the side features' tables, as BaseModel's.
        numeric_features: the number of numeric side features, as
            BaseModel's.
        feature_dim: the side features' embedding size, as BaseModel's.
        linear: add the linear part, as BaseModel's.
        history_cross: HistoryCross's width, as BaseModel's (0: none).

    Raises:
        ValueError: as BaseModel, for the attention options (DINAttention's
            checks), and for the "category" search without categories.
    """

    def __init__(self, num_items: int, num_categories: int, embed_dim: int = 32,
                 mlp_hidden=(200, 80), mlp_activation: str = "dice", backend: str = "auto",
                 mlp_input: str = "concat", attention_hidden=(80, 40),
                 attention_activation: str = "dice", attention_normalization="softmax",
                 top_k=None, search: str = "din", features=None, numeric_features: int = 0,
                 feature_dim=None, linear: bool = False, history_cross: int = 0):
        super().__init__(num_items, num_categories, embed_dim, mlp_hidden, mlp_activation,
                         backend, mlp_input, features, numeric_features, feature_dim, linear,
                         history_cross)
        if search == "category" and not num_categories:
            raise ValueError("DIN: `search` 'category' ranks the history by category; the "
                             "model has none (num_categories 0)")
        self.attention = DINAttention(self.item_width, attention_hidden, attention_activation,
                                      normalization=attention_normalization, backend=backend,
                                      top_k=top_k, search=search)

    def pool(self, candidate, history, lengths, categories=None):
        """The user interest: the history pooled by DINAttention with the
        candidates as the query (two-stage with ``top_k``).

        Args:
            candidate: the embedded candidates, the query, [B, W] or
                [B, C, W].
            history: the embedded history, the keys, [B, T, W].
            lengths: [B] int32/int64, valid positions t < lengths[b].
            categories: (the candidates' category ids, [B] or [B, C]; the
                history's, [B, T]): read by the "category" search only.

        Returns:
            [B, W] or [B, C, W], as ``candidate``.

        Raises:
            TypeError: as din_fast.DINAttention's forward, for inputs of the
                wrong type or dtype.
            ValueError: as din_fast.DINAttention's forward, for inputs whose
                shapes or devices do not fit.
        """
        if self.attention.search != "category":
            return self.attention(candidate, history, lengths)
        return self.attention(candidate, history, lengths, query_categories=categories[0],
                              key_categories=categories[1])

    def auxiliary_loss(self, history_items, history_categories, lengths, target_items,
                       target_categories, labels):
        """With the "dot" search: SIM's auxiliary CTR loss, the binary cross
        entropy of the search's own logits (DINAttention.search_logits: the
        softmax of the projections' scores over the whole history pooling
        those scores) against the labels. It trains the projections alone.

        Args:
            history_items: [B, T] int32/int64 dense item ids, as forward.
            history_categories: [B, T] their categories (None without a
                category table).
            lengths: [B] int32/int64, each row's history length.
            target_items: [B] (or [B, C]) the candidates' dense item ids.
            target_categories: their categories, the same shape (None
                without a category table).
            labels: 0/1 labels of the candidates, the shape of
                ``target_items`` (any real dtype).

        Returns:
            The mean loss, a 0-d float tensor; None for a search other than
            "dot" (and for exact DIN).
        """
        if self.attention.search != "dot":
            return None
        logits = self.attention.search_logits(self.embed(target_items, target_categories),
                                              self.embed(history_items, history_categories),
                                              lengths)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    def attention_backend(self):
        """The backend the attention runs in the current mode (float32
        inputs): "triton", "torch" or "reference"
        (DINAttention.resolved_backend).

        Raises:
            ValueError: DIN_FAST_BACKEND in the environment names no backend.
        """
        return self.attention.resolved_backend()


MODELS = {"din": DIN, "base": BaseModel}
