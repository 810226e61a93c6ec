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
