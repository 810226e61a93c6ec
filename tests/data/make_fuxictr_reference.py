"""Writes fuxictr_din_attention.pt: FuxiCTR's DIN_Attention, run once on
every case of tests/fuxictr_cases.py.

CI does not install FuxiCTR (its install pulls in polars, ray and more), so
the compat test compares against these saved results; where fuxictr 2.3.10
is installed it also compares live. To regenerate:

    pip install --no-deps fuxictr==2.3.10
    python tests/data/make_fuxictr_reference.py

or, from an unpacked wheel (pip download --no-deps fuxictr==2.3.10, unzip
into SRC): python tests/data/make_fuxictr_reference.py SRC

Per case: the initial state_dict (random, float64) and the results of
fuxictr_cases.run_case (output, gradients, state_dict after the forward),
packed into one float64 tensor (see pack; the test unpacks them).
"""

import pathlib
import sys

import torch

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from fuxictr_cases import CASES, make_inputs, run_case  # noqa: E402
from peers import fuxictr_din_attention, import_fuxictr_din_attention  # noqa: E402


def main(peer_cls, out: pathlib.Path) -> None:
    inputs = make_inputs()
    cases = {}
    for name in CASES:
        state, results = run_case(peer_cls, name, inputs)
        tensors = {f"state_dict/{k}": v for k, v in state.items()}
        tensors.update(results)
        cases[name] = pack(tensors)
    torch.save(dict(fuxictr_version="2.3.10", cases=cases), out)


def pack(tensors: dict) -> dict:
    """One float64 tensor for many small ones: torch.save's per-tensor
    overhead would be most of the file otherwise."""
    return dict(names=list(tensors), shapes=[tuple(t.shape) for t in tensors.values()],
                dtypes=[str(t.dtype) for t in tensors.values()],
                flat=torch.cat([t.detach().double().flatten() for t in tensors.values()]))


if __name__ == "__main__":
    peer = import_fuxictr_din_attention(pathlib.Path(sys.argv[1])) if len(sys.argv) > 1 \
        else fuxictr_din_attention()
    main(peer, pathlib.Path(__file__).with_name("fuxictr_din_attention.pt"))
