"""din_fast.kernels: the Triton kernels of the fused DIN attention and their launchers."""
