"""DIN attention on TorchRec's jagged histories: no padding built.

TorchRec hands each sample's history over as a KeyedJaggedTensor (ids back to
back, with lengths); an EmbeddingCollection turns it into a JaggedTensor of
embeddings, ``values() [L, D]`` and ``offsets() [B + 1]``. DINAttention's
``forward_jagged`` (or din_fast.din_attention_jagged) pools those rows in
place: on a GPU the fused kernel reads the jagged values directly, and
nothing of size [B, max_len, D] is ever built. This script builds such a
pipeline, checks it against the same histories padded, and trains it a few
steps (single process; for sharded tables see din_fast.ctr.sharded).

    pip install -e ".[torchrec]"        # in the checkout
    pip install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0   # with torch 2.13
    python examples/torchrec_jagged.py
"""

import torch
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor

import din_fast

ITEMS, DIM, MAX_LEN, BATCH = 1000, 16, 50, 64


class JaggedDIN(nn.Module):
    def __init__(self):
        super().__init__()
        self.tables = EmbeddingCollection(tables=[EmbeddingConfig(
            name="item", embedding_dim=DIM, num_embeddings=ITEMS,
            feature_names=["history", "candidate"])])
        self.attention = din_fast.DINAttention(DIM, hidden_units=(80, 40), activation="dice",
                                               normalization="softmax")
        self.mlp = nn.Sequential(nn.Linear(2 * DIM, 64), nn.PReLU(64), nn.Linear(64, 1))

    def forward(self, features: KeyedJaggedTensor):
        embedded = self.tables(features)                       # {feature: JaggedTensor}
        history, candidate = embedded["history"], embedded["candidate"].values()   # [B, D]
        pooled = self.attention.forward_jagged(candidate, history.values(), history.offsets(),
                                               MAX_LEN)
        return self.mlp(torch.cat([pooled, candidate], -1)).squeeze(-1)


def synthetic_batch(generator):
    """A KeyedJaggedTensor of BATCH histories (0 to MAX_LEN items, empty ones
    included) and one candidate each, and a label: whether the candidate is
    in its history's id bucket."""
    lengths = torch.randint(0, MAX_LEN + 1, (BATCH,), generator=generator)
    history = torch.randint(0, ITEMS, (int(lengths.sum()),), generator=generator)
    candidate = torch.randint(0, ITEMS, (BATCH,), generator=generator)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["history", "candidate"], values=torch.cat([history, candidate]),
        lengths=torch.cat([lengths, torch.ones(BATCH, dtype=torch.long)]))
    rows = torch.repeat_interleave(torch.arange(BATCH), lengths)
    seen = torch.zeros(BATCH, 10, dtype=torch.bool)
    seen[rows, history % 10] = True
    return features, seen[torch.arange(BATCH), candidate % 10].float()


def main():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = JaggedDIN()
    features, _ = synthetic_batch(generator)

    # The jagged forward equals the padded one on the same histories.
    model.eval()
    with torch.no_grad():
        embedded = model.tables(features)
        history, candidate = embedded["history"], embedded["candidate"].values()
        jagged = model.attention.forward_jagged(candidate, history.values(), history.offsets(),
                                                MAX_LEN)
        padded = model.attention(candidate, history.to_padded_dense(MAX_LEN), history.lengths())
    print(f"jagged vs padded: max |difference| {(jagged - padded).abs().max():.2e}")
    assert torch.allclose(jagged, padded, atol=1e-6)

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        features, label = synthetic_batch(generator)
        loss = nn.functional.binary_cross_entropy_with_logits(model(features), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            print(f"step {step + 1}: training loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
