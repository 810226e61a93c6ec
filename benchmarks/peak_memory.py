"""Peak memory of a CPU computation, counted tensor by tensor.

CPU PyTorch has no allocator statistics, and the process's resident size
mostly measures the C allocator's caching. Instead a dispatch mode sees every
op (backward ops included) and counts each new tensor storage from its
creation until Python's finalizer reports it freed. A custom op written in
Python (din_fast's torch backend runs as such ops) reaches the mode as one
op, so its function runs inside the mode: its temporaries count too.
"""

from __future__ import annotations

import weakref

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak_bytes``: the most bytes of
    tensors created inside the block that were alive at one time."""

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.current_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        opdef = _maybe_get_opdef(func)
        if opdef is None:
            out = func(*args, **(kwargs or {}))
        else:
            with self:
                out = opdef._init_fn(*args, **(kwargs or {}))
        # Views and in-place ops return storage that already exists.
        if any(r.alias_info is not None for r in func._schema.returns):
            return out
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._seen or storage.nbytes() == 0:
                continue
            self._seen.add(key)
            self.current_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
            weakref.finalize(storage, self._free, key, storage.nbytes())
        return out
