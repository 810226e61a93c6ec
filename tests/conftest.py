"""Test session setup.

Without a GPU, the Triton kernels run in the interpreter on CPU tensors. The
variable must be set before any kernel is decorated (triton reads it then),
so before din_fast.kernels is imported by a test module.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
