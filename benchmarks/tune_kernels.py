"""Tuning sweep of the fused kernels' launch choices, at the headline shape.

The launchers choose tile sizes and warp counts from the specialization alone
(the tile budget, the forward's warp table) and the backward's launch plan
(one launch for every gradient, or split launches that each recompute) from
the size of its accumulators; none of those choices has been timed on a GPU.
This script times the alternatives side by side, round-robin (harness), at
B=4096, T=200, D=64, hidden (80, 40), sigmoid, bfloat16 and float32:

- forward (no grad): BLOCK_T x warps x pipelining stages;
- forward + backward: the backward's plan (one launch / split) x its warps.

Each alternative is applied by overriding the launcher's choice for the
duration of a call (``override``); every row also records the error against
float64, so a choice that breaks the numbers shows. The best choice per pass
and dtype is printed; a later change turns what wins into the per-GPU-family
defaults. ``--dry-run`` runs the same code on CPU (the Triton interpreter,
tiny shapes, fewer alternatives): it checks the script, not the speed.

    python -m benchmarks.tune_kernels [--dry-run] [--out DIR] [--label LABEL]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os

import torch

from din_fast.kernels import din_forward
from din_fast.kernels.din_backward import BackwardSpec
from din_fast.kernels.din_forward import ForwardSpec

from . import harness, peers

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@contextlib.contextmanager
def override(block_t=None, warps=None, stages=None, split=None, backward_warps=None):
    """Launch the kernels with these choices instead of the launchers' own
    (None keeps a choice): forward BLOCK_T, warps and pipelining stages; the
    backward's plan (split launches or one) and warps."""
    saved = [(ForwardSpec, "blocks", ForwardSpec.blocks),
             (ForwardSpec, "num_warps", ForwardSpec.num_warps),
             (din_forward, "NUM_STAGES", din_forward.NUM_STAGES),
             (BackwardSpec, "split_parts", BackwardSpec.split_parts),
             (BackwardSpec, "blocks", BackwardSpec.blocks)]
    blocks, backward_blocks = ForwardSpec.blocks, BackwardSpec.blocks
    if block_t is not None:
        ForwardSpec.blocks = lambda spec: (lambda c, t, d, k: (c, block_t, d, k))(*blocks(spec))
    if warps is not None:
        ForwardSpec.num_warps = lambda spec, arch=None: warps
    if stages is not None:
        din_forward.NUM_STAGES = stages
    if split is not None:
        BackwardSpec.split_parts = lambda spec: split
    if backward_warps is not None:
        BackwardSpec.blocks = lambda spec: (backward_blocks(spec)[0], backward_warps)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def alternatives(train: bool, dry_run: bool) -> list:
    """(name, override keywords): the launchers' own choice first."""
    if train:
        grid = itertools.product((False, True), (4, 8))
        choices = [dict(split=split, backward_warps=warps) for split, warps in grid]
    else:
        block_ts = (16, 32) if dry_run else (16, 32, 64, 128)
        grid = itertools.product(block_ts, (4, 8), (1, 2))
        choices = [dict(block_t=t, warps=w, stages=s) for t, w, s in grid]
    if dry_run:
        choices = choices[:2]
    named = [("default", {})]
    named += [(" ".join(f"{k}={v}" for k, v in choice.items()), choice) for choice in choices]
    return named


def measure(train: bool, dtype: torch.dtype, args, device) -> list:
    """One row per alternative at the headline shape in ``dtype``."""
    batch, length, dim, hidden = ((4, 20, 8, (8, 4)) if args.dry_run
                                  else (4096, 200, 64, (80, 40)))
    inputs = peers.make_inputs(batch, 1, length, dim, hidden, dtype, device)
    probe, exact, exact_grads = peers.float64_oracle(inputs, train)
    if train:
        inputs = peers.with_grad(inputs)
    triton = peers.din_fast_implementation("triton")
    fns, rows = {}, []
    for name, choice in alternatives(train, args.dry_run):
        def call(choice=choice):
            with override(**choice), torch.set_grad_enabled(train):
                return triton.train_step(inputs, probe) if train else triton.forward(inputs)
        row = dict(pass_="train" if train else "forward", dtype=str(dtype).split(".")[-1],
                   choice=name, batch=batch, length=length, note="")
        try:
            with override(**choice), torch.set_grad_enabled(train):
                row["max_abs_error"] = harness.max_abs_error(triton.forward(inputs), exact)
            row["grad_error"] = (harness.worst_gradient_error(call(), exact_grads)
                                 if train else math.nan)
            fns[name] = call
        except Exception as exc:  # a choice that does not compile or launch is a result too
            row["note"] = f"{type(exc).__name__}: {str(exc).strip()[:160]}"
        rows.append(row)
    times = harness.time_round_robin(fns, args.rounds, args.warmup, device) if fns else {}
    for row in rows:
        spread = harness.Spread.of(times.get(row["choice"], []))
        speedup = harness.Spread.of(harness.paired_ratios(times.get("default", []),
                                                          times.get(row["choice"], [])))
        row.update(spread.fields("ms"), **speedup.fields("speedup_over_default"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="on CPU in the Triton interpreter, tiny shapes")
    parser.add_argument("--out", default=RESULTS, help="folder for the CSV")
    parser.add_argument("--label", help="results label (default: the device's)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; --dry-run runs on CPU")
    args.rounds = args.rounds or (2 if args.dry_run else 10)
    args.warmup = args.warmup or (1 if args.dry_run else 3)
    label = args.label or harness.results_label(device, args.dry_run)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tune_kernels_{label}.csv")
    rows = []
    for train, dtype in itertools.product((False, True), (torch.bfloat16, torch.float32)):
        found = measure(train, dtype, args, device)
        rows += found
        harness.write_csv(rows, path)      # after every setting: a time limit keeps the rest
        ok = [r for r in found if not r["note"]]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        for row in found:
            mark = "  <- best" if row is best else ""
            print(f"{row['pass_']:<8}{row['dtype']:<9}{row['choice']:<34}"
                  f"{row['ms']:>9.3f} ms  x{row['speedup_over_default']:<6.2f}"
                  f" err {row['max_abs_error']:.1e}/{row['grad_error']:.1e} {row['note']}{mark}",
                  flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
