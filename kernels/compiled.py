"""Ahead-of-time compiles and what ptxas made of them: registers, spills, shared memory.

No GPU is needed: ``triton.compile`` takes a ``GPUTarget`` and the bundled
``cuobjdump`` reads the resource usage out of the cubin. The compile report
(din_fast.kernels.aot) prints these numbers and writes the forward's warp
table from them; nothing here runs when a kernel launches.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


@functools.lru_cache(maxsize=None)
def _usage(kernel, signature: tuple, constexprs: tuple, aligned: tuple, num_warps: int,
           num_stages: int, arch: int) -> dict:
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(kernel, dict(signature), constexprs=dict(constexprs), attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", dump))
    return dict(warps=num_warps, regs=int(fields["REG"]), stack=int(fields["STACK"]),
                local=int(fields["LOCAL"]),
                shared=max(int(compiled.metadata.shared), int(fields["SHARED"])))


def resource_usage(kernel, signature: dict, constexprs: dict, aligned: tuple, num_warps: int,
                   num_stages: int, arch: int) -> dict:
    """Compile for sm_<arch> (arguments named in `aligned` taken as multiples of
    16, as Triton's JIT specializes them) and return warps, regs (per thread),
    stack and local (spill bytes per thread) and shared (bytes per block).
    Cached per process."""
    return _usage(kernel, tuple(signature.items()), tuple(constexprs.items()), tuple(aligned),
                  num_warps, num_stages, arch)


def spills(usage: dict) -> bool:
    return bool(usage["stack"] or usage["local"])
