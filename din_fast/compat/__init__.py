"""Drop-in replacements for the DIN attention layers of other libraries.

Each adapter takes its peer's constructor arguments and forward signature and
keeps its peer's state_dict names, so that a checkpoint saved from the peer
loads with ``strict=True``. Where the peer computes what SPEC section 1
computes, the adapter calls din_fast.din_attention (and so the fused kernels);
where the peer differs (its Dice normalizes over the padding too, its softmax
averages the padding of an empty row), the adapter reproduces the peer.

- ``din_fast.compat.deepctr.AttentionSequencePoolingLayer`` (DeepCTR-Torch)
- ``din_fast.compat.fuxictr.DIN_Attention`` (FuxiCTR)
"""
