"""torch.export.export of a model using DINAttention, on CPU: the exported
program matches eager, for other lengths and (dynamic shapes) other sizes.

Written against the public behaviour only, so it holds whether DINAttention
reaches the torch backend directly or through a registered custom op."""

import torch

import din_fast

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


def test_din_packages_with_aotinductor_and_scores_as_eager(tmp_path):
    """export_din: torch.export + AOTInductor; the loaded package scores what
    eager scores, for other batch sizes and history lengths, and its graph
    holds aten operations only (no din_fast op: it runs without Python)."""
    from din_fast import export

    torch.manual_seed(0)
    model = din_fast.DIN(30, 5, embed_dim=4, mlp_activation="dice").eval()
    program = torch.export.export(model, export.din_example_inputs(model),
                                  dynamic_shapes=export.din_dynamic_shapes())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not [t for t in targets if "din_fast" in t], targets
    package = export.export_din(model, tmp_path / "din.pt2")
    scorer = export.load(package)
    for batch, history in ((4, 8), (7, 3), (1, 12)):
        inputs = export.din_example_inputs(model, batch, history)
        torch.testing.assert_close(scorer(*inputs), model(*inputs), rtol=1e-5, atol=1e-6)
