"""Drop-in replacements for the DIN attention layers of other libraries.

Each adapter takes its peer's constructor arguments and forward signature and
keeps its peer's state_dict names, so that a checkpoint saved from the peer
loads with ``strict=True``, and runs every configuration its peer runs, with
the peer's results. Where the peer computes what din_fast.din_attention
computes, the adapter calls it (and so the fused kernels); elsewhere (other
activations, BatchNorm or dropout in training, Dice's statistics over the
padding) it runs the peer's own layers in PyTorch, and where the peer's
semantics differ from din_fast's (its softmax averages the padding of an
empty row) it keeps the peer's.

- ``din_fast.compat.deepctr.AttentionSequencePoolingLayer`` (DeepCTR-Torch)
- ``din_fast.compat.fuxictr.DIN_Attention`` (FuxiCTR)
"""
