"""A FuxiCTR-style DIN with din_fast's DIN_Attention.

FuxiCTR's DIN builds its target attention from
``fuxictr.pytorch.layers.DIN_Attention``; din_fast's adapter has the same
constructor, forward (``target_item [B, E]``, ``history_sequence [B, T, E]``,
``mask [B, T]``, 0 = padding) and state_dict names, so changing the import is
the whole migration, and FuxiCTR checkpoints load with strict=True. This
script trains a small DIN of that shape on synthetic data and, where
FuxiCTR itself is installed with its dependencies, checks that FuxiCTR's
layer scores the same with the trained weights.

    python examples/fuxictr_din.py
"""

import torch
from torch import nn

from din_fast.compat.fuxictr import DIN_Attention   # was: from fuxictr.pytorch.layers import ...

ITEMS, CATEGORIES, DIM, MAXLEN, SAMPLES = 100, 20, 8, 10, 1024


class TinyDIN(nn.Module):
    """An item is [item embedding | category embedding]; the candidate attends
    over the history; an MLP scores [pooled history, candidate]."""

    def __init__(self, attention=DIN_Attention):
        super().__init__()
        self.items = nn.Embedding(ITEMS, DIM, padding_idx=0)
        self.categories = nn.Embedding(CATEGORIES, DIM, padding_idx=0)
        self.attention = attention(2 * DIM, attention_units=[64, 32], hidden_activations="Dice",
                                   use_softmax=True)
        self.mlp = nn.Sequential(nn.Linear(4 * DIM, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, item, category, history_items, history_categories):
        target = torch.cat([self.items(item), self.categories(category)], -1)
        history = torch.cat([self.items(history_items), self.categories(history_categories)], -1)
        pooled = self.attention(target, history, mask=history_items > 0)
        return self.mlp(torch.cat([pooled, target], -1)).squeeze(-1)


def synthetic_data(generator):
    lengths = torch.randint(1, MAXLEN + 1, (SAMPLES,), generator=generator)
    valid = torch.arange(MAXLEN) < lengths[:, None]
    history_items = torch.randint(1, ITEMS, (SAMPLES, MAXLEN), generator=generator) * valid
    history_categories = torch.randint(1, CATEGORIES, (SAMPLES, MAXLEN),
                                       generator=generator) * valid
    item = torch.randint(1, ITEMS, (SAMPLES,), generator=generator)
    category = torch.randint(1, CATEGORIES, (SAMPLES,), generator=generator)
    label = (history_categories == category[:, None]).any(1).float()
    return (item, category, history_items, history_categories), label


def fuxictr_layer():
    """FuxiCTR's own DIN_Attention, or None where fuxictr (with its
    dependencies: polars, pandas, ...) cannot be imported."""
    try:
        from fuxictr.pytorch.layers import DIN_Attention as FuxiCTRAttention
    except ImportError:
        return None
    return FuxiCTRAttention


def main():
    torch.manual_seed(0)
    inputs, label = synthetic_data(torch.Generator().manual_seed(0))
    model = TinyDIN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(3):
        for batch in torch.randperm(SAMPLES).split(128):
            loss = nn.functional.binary_cross_entropy_with_logits(
                model(*(t[batch] for t in inputs)), label[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: training loss {loss.item():.4f}")
    print("attention state_dict:", ", ".join(model.attention.state_dict())[:120], "...")

    peer = fuxictr_layer()
    if peer is None:
        print("fuxictr is not importable here: the comparison with its layer is skipped")
        return
    reference = TinyDIN(attention=peer)
    reference.load_state_dict(model.state_dict())          # strict: the same names
    model.eval(), reference.eval()
    with torch.no_grad():
        difference = (model(*inputs) - reference(*inputs)).abs().max().item()
    print(f"FuxiCTR's layer with the same weights: max |difference| {difference:.2e}")
    assert difference < 1e-4


if __name__ == "__main__":
    main()
