"""torch.export.export of a model using DINAttention, on CPU: the exported
program matches eager, for other lengths and (dynamic shapes) other sizes.

Written against the public behaviour only, so it holds whether DINAttention
reaches the torch backend directly or through a registered custom op."""

import re

import pytest
import torch

import din_fast
from din_fast.ctr import export

D = 4


class Scorer(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.attention = din_fast.DINAttention(D, (8, 4), **options)
        self.head = torch.nn.Linear(2 * D, 1)

    def forward(self, query, keys, lengths):
        interest = self.attention(query, keys, lengths)
        return self.head(torch.cat([interest, query], dim=-1))


def test_export_matches_eager():
    torch.manual_seed(0)
    model = Scorer(activation="dice", normalization="softmax").eval()
    query, keys = torch.randn(3, D), torch.randn(3, 5, D)
    lengths = torch.tensor([5, 2, 0])
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    program = torch.export.export(model, (query, keys, lengths),
                                  dynamic_shapes=({0: batch}, {0: batch, 1: length}, {0: batch}))
    exported = program.module()
    torch.testing.assert_close(exported(query, keys, lengths), model(query, keys, lengths))
    other = (torch.randn(6, D), torch.randn(6, 9, D), torch.tensor([9, 0, 3, 4, 1, 2]))
    torch.testing.assert_close(exported(*other), model(*other))


class Pool(torch.nn.Module):
    """The layer alone, C candidates per row, its weights returned too."""

    def __init__(self, **options):
        super().__init__()
        self.attention = din_fast.DINAttention(D, (6, 3), return_scores=True, **options)

    def forward(self, query, keys, mask, values):
        return self.attention(query, keys, mask=mask, values=values)


@pytest.mark.parametrize("activation,normalization", [("sigmoid", None), ("relu", "softmax"),
                                                      ("prelu", None), ("dice", "softmax")])
def test_exported_layer_matches_eager(activation, normalization):
    """The exported graph (the folded unit over the whole padded problem)
    against the eager blocked op: several candidates, a mask with holes and
    an empty row, separate values, NaN in the padding, other sizes."""
    torch.manual_seed(0)
    model = Pool(activation=activation, normalization=normalization, scale=0.7).eval()

    def inputs(batch, candidates, length, seed):
        gen = torch.Generator().manual_seed(seed)
        mask = torch.rand(batch, length, generator=gen) < 0.6
        mask[0] = False
        keys = torch.randn(batch, length, D, generator=gen).masked_fill(~mask[..., None], NaN)
        values = torch.randn(batch, length, 3, generator=gen).masked_fill(~mask[..., None], NaN)
        return torch.randn(batch, candidates, D, generator=gen), keys, mask, values
    example = inputs(3, 2, 5, 1)
    batch, candidates, length = (torch.export.Dim(n) for n in ("batch", "candidates", "length"))
    program = torch.export.export(model, example, dynamic_shapes=(
        {0: batch, 1: candidates}, {0: batch, 1: length}, {0: batch, 1: length},
        {0: batch, 1: length}))
    for case in (example, inputs(5, 7, 11, 2), inputs(2, 1, 64, 3)):
        pooled, weights = program.module()(*case)
        expected_pooled, expected_weights = model(*case)
        torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
        assert not pooled.isnan().any()


NaN = float("nan")


def test_exported_range_check_names_sizes_not_symbols():
    """The lengths check traced into a graph with a dynamic history length
    says what T is, never the graph's symbol for it ("T=s35")."""
    model = Scorer().eval()
    length = torch.export.Dim("length")
    program = torch.export.export(model, (torch.randn(3, D), torch.randn(3, 5, D),
                                          torch.tensor([5, 2, 0])),
                                  dynamic_shapes=(None, {1: length}, None))
    with pytest.raises(RuntimeError) as error:
        program.module()(torch.randn(3, D), torch.randn(3, 4, D), torch.tensor([5, 2, 0]))
    message = str(error.value).splitlines()[0]
    assert "`lengths` must lie in [0, T], T the length of `keys` (dim 1)" in message
    assert not re.search(r"\bs\d+\b", message), message


FEATURES = {"genres": 6, "hour": 4}      # side features and their numbers of ids
NUMERIC = 2
POISONED = 30                           # the item whose embedding is NaN


def din_with_features():
    """A DIN with categories, two categorical side features, numeric ones
    and the linear part, its parameters moved off their initial values (the
    padding rows kept at zero, as training keeps them) and item POISONED's
    embedding NaN: the inputs hold it only past each history's length,
    where nothing may read it."""
    torch.manual_seed(0)
    model = din_fast.DIN(30, 5, embed_dim=4, mlp_activation="dice", features=FEATURES,
                         numeric_features=NUMERIC, linear=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        for table in model.modules():
            if isinstance(table, torch.nn.Embedding):
                table.weight[0] = 0
        model.item_embedding.weight[POISONED] = float("nan")
    return model.eval()


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """(model, its package loaded): one export for the module (it takes half a minute)."""
    model = din_with_features()
    package = export.export_din(model, tmp_path_factory.mktemp("package") / "din.pt2")
    return model, export.load(package)


INPUT_NAMES = ("history_items", "history_categories", "lengths", "target_items",
               "target_categories", "features_genres", "features_hour", "numeric")


def request_inputs(model, batch, history, candidates, width=2, seed=0):
    """The package's inputs (INPUT_NAMES, in order) for B rows of C
    candidates: row lengths 0..T, item POISONED (NaN) at every position
    past a row's length and nowhere else, ``width`` values V of each side
    feature per candidate, 0 (the padding) among them."""
    gen = torch.Generator().manual_seed(seed)
    items, categories, _, targets, target_categories = \
        export.din_example_inputs(model, batch, history, candidates)[:5]
    lengths = torch.arange(batch) % (history + 1)
    past = torch.arange(history)[None, :] >= lengths[:, None]
    items = torch.where(past, POISONED, torch.where(items == POISONED, 1, items))
    targets = torch.where(targets == POISONED, 1, targets)
    features = [torch.randint(0, size + 1, (batch, candidates, width), generator=gen)
                for size in FEATURES.values()]
    numeric = torch.randn(batch, candidates, NUMERIC, generator=gen)
    return [items, categories, lengths, targets, target_categories, *features, numeric]


def eager_logits(model, inputs):
    with torch.no_grad():
        return model(*inputs[:5], features=dict(zip(FEATURES, inputs[5:7])), numeric=inputs[7])


def test_din_graph_holds_aten_operations_only():
    """The exported graph holds no din_fast op: the package runs without Python."""
    torch.manual_seed(0)
    model = din_fast.DIN(30, 5, embed_dim=4, mlp_activation="dice").eval()
    program = torch.export.export(model, export.din_example_inputs(model),
                                  dynamic_shapes=export.din_dynamic_shapes())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "din_fast" in t], targets


@pytest.mark.parametrize("batch,history,candidates,width", [
    (4, 8, 3, 2), (7, 3, 1, 1), (1, 12, 9, 3), (3, 0, 2, 2), (5, 6, 4, 0)])
def test_din_package_scores_as_eager(packaged, batch, history, candidates, width):
    """C candidates per row, their side features [B, C, V] and numeric ones
    [B, C, N], against the eager model: other batch sizes, history lengths
    and candidate counts (one per row included), rows of length 0, NaN
    embeddings past each length, 0 among a feature's values, V = 0 and a
    history of width T = 0 (both padded to one position of padding), int32
    ids and lengths (converted exactly)."""
    model, scorer = packaged
    inputs = request_inputs(model, batch, history, candidates, width, seed=batch)
    expected = eager_logits(model, inputs)
    assert expected.shape == (batch, candidates) and not expected.isnan().any()
    torch.testing.assert_close(scorer(*inputs), expected, rtol=1e-5, atol=1e-6)
    int32 = [t if t.is_floating_point() else t.int() for t in inputs]
    torch.testing.assert_close(scorer(*int32), expected, rtol=1e-5, atol=1e-6)


def test_din_package_takes_strided_inputs_by_name(packaged):
    """Strided and expanded inputs (a feature of the user, one value for all
    of a row's candidates, expanded along C) by name."""
    model, scorer = packaged
    inputs = request_inputs(model, 5, 6, 4)
    inputs[0] = inputs[0].t().contiguous().t()
    inputs[1] = inputs[1][:, None].expand(-1, 2, -1)[:, 1]
    inputs[6] = inputs[6][:, :1].expand(-1, 4, -1)
    inputs[7] = inputs[7].transpose(1, 2).contiguous().transpose(1, 2)
    expected = eager_logits(model, inputs)
    torch.testing.assert_close(scorer(**dict(zip(INPUT_NAMES, inputs))), expected,
                               rtol=1e-5, atol=1e-6)


def test_recorded_layout_is_what_the_package_takes(packaged):
    """input_layout (the id maps' ``inputs``) names, in call order, the
    inputs the package's record checks, with their dtypes and named shapes."""
    model, scorer = packaged
    layout = [(entry["name"], entry["dtype"], entry["shape"])
              for entry in export.input_layout(model)]
    recorded = [(spec.name, str(spec.dtype).removeprefix("torch."), list(spec.shape))
                for spec in scorer.contract.inputs]
    assert layout == recorded
    assert recorded[5] == ("features_genres", "int64", ["B", "C", "V_genres"])
    assert recorded[7] == ("numeric", "float32", ["B", "C", NUMERIC])


def _replaced(inputs, **changes):
    return [changes.get(name, tensor) for name, tensor in zip(INPUT_NAMES, inputs)]


BAD_CALLS = [  # (description, the call's inputs from good ones, error, message)
    ("lengths above T", lambda i: _replaced(i, lengths=torch.tensor([0, 1, 57, 3])),
     ValueError, r"lengths\[2\] = 57 is outside \[0, T\] with T = 8, history_items\.shape\[1\]"),
    ("int32 lengths above T", lambda i: _replaced(i, lengths=torch.tensor([0, -1, 2, 3],
                                                                          dtype=torch.int32)),
     ValueError, r"lengths\[1\] = -1 is outside \[0, T\]"),
    ("item id beyond the table", lambda i: _replaced(i, history_items=i[0] + 30),
     ValueError, r"history_items\[0, 0\] = \d+ is outside \[0, 30\]"),
    ("negative category", lambda i: _replaced(i, target_categories=-i[4]),
     ValueError, r"target_categories\[0, 0\] = -\d+ is outside \[0, 5\]"),
    ("float ids", lambda i: _replaced(i, target_items=i[3].float()),
     TypeError, r"`target_items` must be torch\.int64 .*; got torch\.float32"),
    ("bool lengths", lambda i: _replaced(i, lengths=i[2].bool()),
     TypeError, r"`lengths` must be torch\.int64 .*; got torch\.bool"),
    ("lengths [B, 1]", lambda i: _replaced(i, lengths=i[2][:, None]),
     ValueError, r"`lengths` must be 1-D \[B\]; got shape \(4, 1\)"),
    ("batch mismatch", lambda i: _replaced(i, target_items=i[3][:3]),
     ValueError, r"`target_items` must have shape \[B, C\] with B = 4, "
                 r"history_items\.shape\[0\]; got \(3, 3\)"),
    ("targets [B]", lambda i: _replaced(i, target_items=i[3][:, 0],
                                        target_categories=i[4][:, 0]),
     ValueError, r"`target_items` must be 2-D \[B, C\]; got shape \(4,\)"),
    ("candidates mismatch", lambda i: _replaced(i, target_categories=i[4][:, :2]),
     ValueError, r"`target_categories` must have shape \[B, C\] with C = 3, "
                 r"target_items\.shape\[1\]"),
    ("a side feature [B, V]", lambda i: _replaced(i, features_genres=i[5][:, 0]),
     ValueError, r"`features_genres` must be 3-D \[B, C, V_genres\]; got shape \(4, 2\)"),
    ("a side feature of other candidates", lambda i: _replaced(i, features_hour=i[6][:, :2]),
     ValueError, r"`features_hour` must have shape \[B, C, V_hour\] with C = 3, "
                 r"target_items\.shape\[1\]; got \(4, 2, 2\)"),
    ("a feature id beyond its table", lambda i: _replaced(i, features_hour=i[6] * 0 + 5),
     ValueError, r"features_hour\[0, 0, 0\] = 5 is outside \[0, 4\]"),
    ("numeric [B, N]", lambda i: _replaced(i, numeric=i[7][:, 0]),
     ValueError, r"`numeric` must be 3-D \[B, C, 2\]; got shape \(4, 2\)"),
    ("float64 numeric", lambda i: _replaced(i, numeric=i[7].double()),
     TypeError, r"`numeric` must be torch\.float32 .*; got torch\.float64"),
    ("history width mismatch", lambda i: _replaced(i, history_categories=i[1][:, :5]),
     ValueError, r"`history_categories` must have shape \[B, T\] with T = 8"),
    ("empty batch", lambda i: [t[:0] for t in i],
     ValueError, r"B = 0, history_items\.shape\[0\], is outside \[1, 1048576\]"),
    ("another device", lambda i: _replaced(i, lengths=i[2].to("meta")),
     ValueError, r"`lengths` is on meta; the package runs on cpu"),
    ("not a tensor", lambda i: _replaced(i, lengths=[0, 1, 2, 3]),
     TypeError, r"`lengths` must be a torch\.Tensor"),
    ("missing input", lambda i: i[:4], TypeError, r"missing `target_categories`"),
]


@pytest.mark.parametrize("description,bad,error,message", BAD_CALLS,
                         ids=[case[0] for case in BAD_CALLS])
def test_din_package_refuses_bad_inputs_by_name(packaged, description, bad, error, message):
    model, scorer = packaged
    inputs = request_inputs(model, 4, 8, 3)
    with pytest.raises(error, match=rf"^din\.pt2: {message}"):
        scorer(*bad(inputs))


def test_graph_asserts_name_the_inputs(packaged):
    """The compiled graph's own checks (what a C++ caller meets) use the
    model's argument names, never the graph's symbolic sizes."""
    model, scorer = packaged
    inputs = request_inputs(model, 4, 8, 3)
    for bad, message in ((_replaced(inputs, lengths=torch.tensor([0, 9, 1, 1])),
                          "DIN: `lengths` must lie in [0, T], T the width of `history_items`"),
                         (_replaced(inputs, history_items=inputs[0] + 30),
                          "DIN: `history_items` must lie in [0, 30], the item table's ids")):
        with pytest.raises(RuntimeError) as error:
            scorer.compiled(*bad)
        assert message in str(error.value)
        assert not re.search(r"\bs\d+\b", str(error.value).splitlines()[0])
