"""Compile report: every kernel specialization, compiled ahead of time, no GPU needed.

    python -m din_fast.kernels.aot --arch 80 90 [--quick] [--jobs N]

Each specialization is compiled with ``triton.compile`` for a ``GPUTarget``
(din_fast.kernels.compiled); the report gives the warp count, registers per
thread, spill bytes (LOCAL and STACK, from the bundled ``cuobjdump
--dump-resource-usage``) and shared memory per block, and the command exits
non-zero on any spill or on shared memory over the architecture's limit. A
specialization with two warp choices (the forward, the search) is reported
with the one its launcher takes on that architecture (the warp table,
din_fast.kernels.forward_warps), and its status notes what the preferred
choice spilled. ``--write-warps`` rewrites that table's entries of the
kernels compiled (all, or those ``--match`` selects) from the run: the
specializations whose preferred count spills and whose other one is clean.

Kernels join the report through :func:`register`: a provider is a function
``provider(quick: bool) -> iterable of Specialization``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product

import torch

from .compiled import resource_usage, spills
from .din_backward import BackwardSpec, backward_unsupported_shape
from .din_forward import NUM_STAGES, ForwardSpec, din_forward_kernel
from .din_search import MAX_TOP_K, SearchSpec, din_search_kernel
from .forward_warps import FALLBACK, table_family

# Largest dynamic shared memory per block (opt-in), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
GRID_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRID_ACTIVATIONS = ("sigmoid", "relu", "prelu", "dice")
GRID_EMBED_DIMS = (16, 64, 128, 256)
GRID_HIDDEN = ((80, 40), (200, 80), (64,), (200, 80, 40))
# The forward with scores, in both layouts at D = 64, H = (80, 40):
# (dtype, activation, softmax, candidates, split).
SCORES_GRID = tuple((dtype, act, softmax, cands, cands > 1)
                    for dtype, act in product((torch.bfloat16, torch.float32),
                                              ("sigmoid", "dice"))
                    for softmax, cands in ((False, 1), (True, 100)))


@dataclass(frozen=True)
class Specialization:
    """One compiled kernel: what triton.compile needs, and a label for the table."""

    label: str
    kernel: object
    signature: dict
    constexprs: dict
    warp_choices: tuple     # in order of preference
    num_stages: int
    aligned: tuple = ()     # arguments known to be multiples of 16 (tt.divisibility)
    key: str = ""           # the warp table's key (ForwardSpec.key), for two warp choices


_PROVIDERS = []


def register(provider):
    """Add a provider of specializations to the report (usable as a decorator)."""
    _PROVIDERS.append(provider)
    return provider


def specializations(quick: bool):
    for provider in _PROVIDERS:
        yield from provider(quick)


def _label(kind: str, spec, flags: dict) -> str:
    """A report row's name: the specialization's shape, then its set flags."""
    dtype = str(spec.dtype).replace("torch.", "")
    return (f"{kind} {dtype} {spec.activation} {'softmax' if spec.softmax else 'none'} "
            f"D={spec.embed_dim} H={spec.hidden} C={spec.candidates}"
            + "".join(f" {name}" for name, on in flags.items() if on))


def forward_specialization(spec: ForwardSpec) -> Specialization:
    label = _label("forward", spec, dict(split=spec.split, scores=spec.need_scores,
                                         jagged=spec.jagged))
    return Specialization(label, din_forward_kernel, spec.signature(), spec.constexprs(),
                          spec.warp_choices(), NUM_STAGES, spec.aligned(), spec.key())


@register
def forward_specializations(quick: bool):
    """The forward over its grid, with lengths (the common layout).

    The full grid is dtypes x activations x normalizations x D x hidden at
    C = 1, plus C = 100 (several candidates per program) for sigmoid, plus
    SCORES_GRID. The quick subset keeps the heaviest corners: the widest
    layers at the largest D, many candidates, three layers, the split path
    and scores.
    """
    if quick:
        grid = [
            (torch.bfloat16, "dice", True, 256, (200, 80), 1, False, False),
            (torch.float32, "dice", True, 256, (200, 80, 40), 100, False, True),
            (torch.float16, "prelu", True, 128, (200, 80, 40), 100, True, True),
        ]
    else:
        grid = [(dtype, act, softmax, dim, hidden, cands, False, False)
                for dtype, act, softmax, dim, hidden in product(
                    GRID_DTYPES, GRID_ACTIVATIONS, (False, True), GRID_EMBED_DIMS, GRID_HIDDEN)
                for cands in ((1, 100) if act == "sigmoid" else (1,))]
        grid += [(dtype, act, softmax, 64, (80, 40), cands, split, True)
                 for dtype, act, softmax, cands, split in SCORES_GRID]
    for dtype, act, softmax, dim, hidden, cands, split, scores in grid:
        yield forward_specialization(ForwardSpec(
            dtype=dtype, activation=act, softmax=softmax, has_lengths=True, has_mask=False,
            need_scores=scores, hidden=hidden, embed_dim=dim, value_dim=dim,
            candidates=cands, split=split))


@register
def jagged_forward_specializations(quick: bool):
    """The forward on jagged input (rows from offsets, scores [L, C]) at D = 64,
    H = (80, 40): bfloat16 / float32 x sigmoid / dice x None / softmax at C = 1,
    plus SCORES_GRID. The quick subset: two rows of SCORES_GRID at C = 100.
    """
    if quick:
        grid = [(torch.bfloat16, "dice", True, 100, True, True),
                (torch.float32, "sigmoid", True, 100, True, True)]
    else:
        grid = [(dtype, act, softmax, 1, False, False)
                for dtype, act, softmax in product((torch.bfloat16, torch.float32),
                                                   ("sigmoid", "dice"), (False, True))]
        grid += [row + (True,) for row in SCORES_GRID]
    for dtype, act, softmax, cands, split, scores in grid:
        yield forward_specialization(ForwardSpec(
            dtype=dtype, activation=act, softmax=softmax, has_lengths=True, has_mask=False,
            need_scores=scores, hidden=(80, 40), embed_dim=64, value_dim=64,
            candidates=cands, split=split, jagged=True))


def backward_specialization(spec: BackwardSpec) -> Specialization:
    label = _label(f"backward[{spec.part}]", spec, dict(scores=spec.has_grad_scores,
                                                        values=not spec.values_are_keys))
    return Specialization(label, spec.kernel, spec.signature(), spec.constexprs(),
                          (spec.blocks()[-1],), NUM_STAGES, spec.aligned())


@register
def backward_specializations(quick: bool):
    """The backward over the forward's grid, where the fused backward runs
    (din_backward.backward_unsupported_shape; elsewhere the torch backward
    serves); C = 100 (float32 in-place sums, separate values, scores) for sigmoid.

    The quick subset: both normalizations, sigmoid and dice, the three
    dtypes and many candidates, at the widest shapes the fused backward
    takes (split launches for half precision, the first layer's in column
    blocks at D = 128; one launch for float32).
    """
    if quick:
        grid = [
            (torch.bfloat16, "dice", True, 64, (80, 40), 1, False),
            (torch.float32, "dice", False, 64, (64,), 1, False),
            (torch.float32, "sigmoid", True, 64, (64,), 1, False),
            (torch.float16, "sigmoid", True, 128, (80, 40), 100, True),
        ]
    else:
        grid = [
            (dtype, act, softmax, dim, hidden, cands, cands > 1)
            for dtype, act, softmax, dim, hidden in product(
                GRID_DTYPES, GRID_ACTIVATIONS, (False, True), GRID_EMBED_DIMS, GRID_HIDDEN)
            if backward_unsupported_shape(dim, hidden, dtype) is None
            for cands in ((1, 100) if act == "sigmoid" else (1,))]
    for dtype, act, softmax, dim, hidden, cands, scores in grid:
        spec = BackwardSpec(
            dtype=dtype, activation=act, softmax=softmax, has_lengths=True, has_mask=False,
            has_grad_scores=scores, values_are_keys=not scores, hidden=hidden,
            embed_dim=dim, value_dim=dim, candidates=cands)
        yield from map(backward_specialization, spec.launches())


def search_specialization(spec: SearchSpec) -> Specialization:
    shape = (f"D={spec.embed_dim} H={spec.hidden} {spec.activation}" if spec.scorer == "din"
             else f"P={spec.projection}" if spec.scorer == "dot" else "")
    dtype = str(spec.dtype).replace("torch.", "")
    label = f"search[{spec.scorer}] {dtype} K={spec.top_k} C={spec.candidates} {shape}".rstrip()
    return Specialization(label, din_search_kernel, spec.signature(), spec.constexprs(),
                          spec.warp_choices(), NUM_STAGES, spec.aligned(), spec.key())


@register
def search_specializations(quick: bool):
    """The two-stage search kernel (din_search.py): each scorer at K in {1,
    50, 200, MAX_TOP_K} (the running top-M from 16 to its largest) and C in
    {1, 100} (one candidate per program, and blocks of them), bfloat16 and
    float32 keys; "din" at D = 64 with H = (80, 40) sigmoid and (200, 80)
    dice, "dot" at P = 64. The quick subset: "din" at K = 200 over blocks of
    candidates (each search kernel takes seconds to compile: its sorting
    network is unrolled)."""
    grid = [(scorer, dtype, k, cands)
            for scorer in ("din", "dot", "category")
            for dtype in (torch.bfloat16, torch.float32)
            for k in (1, 50, 200, MAX_TOP_K) for cands in (1, 100)]
    units = {"din": [((80, 40), "sigmoid"), ((200, 80), "dice")]}
    if quick:
        grid, units = [("din", torch.bfloat16, 200, 100)], {"din": [((80, 40), "sigmoid")]}
    for scorer, dtype, k, cands in grid:
        for hidden, activation in units.get(scorer, [((80, 40), "sigmoid")]):
            yield search_specialization(SearchSpec(
                scorer=scorer, dtype=dtype, top_k=k, candidates=cands, has_lengths=True,
                has_mask=False, embed_dim=64, hidden=hidden, activation=activation,
                projection=64))


def compile_one(spec: Specialization, arch: int) -> dict:
    """Compile for sm_<arch> with the warp count the launcher takes there and
    read its resource usage; with two warp choices, also whether the
    preferred one spills and whether the other is clean (the warp table's
    evidence)."""
    args = (spec.kernel, spec.signature, spec.constexprs, spec.aligned)
    listed = spec.key in FALLBACK.get(table_family(arch), ())
    usages = {warps: resource_usage(*args, warps, spec.num_stages, arch)
              for warps in spec.warp_choices[:1 + listed]}
    preferred = usages[spec.warp_choices[0]]
    if spills(preferred) and len(spec.warp_choices) > 1 and not listed:
        other = spec.warp_choices[1]
        usages[other] = resource_usage(*args, other, spec.num_stages, arch)
    launched = usages[spec.warp_choices[int(listed)]]
    other_clean = len(usages) > 1 and not spills(usages[spec.warp_choices[1]])
    return dict(launched, label=spec.label, key=spec.key, arch=arch, listed=listed,
                preferred_spills=(preferred["local"], preferred["stack"]),
                other_clean=other_clean)


def _compile_job(job):
    # Kernels do not pickle: a worker rebuilds the list and compiles by index.
    quick, index, arch = job
    return compile_one(list(specializations(quick))[index], arch)


def problems(row: dict) -> list:
    """What is wrong with one compiled kernel (empty when nothing)."""
    found = []
    if row["local"] or row["stack"]:
        found.append(f"spills (LOCAL {row['local']}, STACK {row['stack']})")
        if row["other_clean"] and not row["listed"]:
            found.append("the other warp count is clean: the warp table is out of date "
                         "(--write-warps)")
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        found.append(f"shared memory {row['shared']} > {limit}")
    return found


def report(archs, quick: bool, jobs: int, match: str = "", out=sys.stdout,
           fallbacks_found=None) -> int:
    """Compile every specialization whose label matches `match` (a regular
    expression) and print one line per kernel as it finishes; returns the
    number of kernels with problems. ``fallbacks_found``, a dict, receives
    {arch: {key: label}} of the kernels whose other warp count is the clean one."""
    labels = [spec.label for spec in specializations(quick)]
    work = [(quick, index, arch) for arch in archs
            for index, label in enumerate(labels) if re.search(match, label)]
    width = max(map(len, labels))
    print(f"{'kernel':<{width}}  arch  warps  regs  local  stack  shared  status",
          file=out, flush=True)
    pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
    rows = pool.map(_compile_job, work) if pool else map(_compile_job, work)
    bad = 0
    fallbacks = 0
    for row in rows:
        if fallbacks_found is not None and any(row["preferred_spills"]) and row["other_clean"]:
            fallbacks_found.setdefault(table_family(row["arch"]), {})[row["key"]] = row["label"]
        found = problems(row)
        bad += bool(found)
        status = "; ".join(found) or "ok"
        if any(row["preferred_spills"]) and not found:
            fallbacks += 1
            status += " (preferred warps spill: LOCAL {}, STACK {})".format(*row["preferred_spills"])
        print(f"{row['label']:<{width}}  sm_{row['arch']}  {row['warps']:>5}  {row['regs']:>4}  "
              f"{row['local']:>5}  {row['stack']:>5}  {row['shared']:>6}  {status}",
              file=out, flush=True)
    if pool:
        pool.shutdown()
    print(f"{len(work)} kernels, {bad} with problems, {fallbacks} on their fallback warp count",
          file=out)
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities, e.g. 80 90")
    parser.add_argument("--quick", action="store_true",
                        help="only the heaviest corners of the grid (a test runs this)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="parallel compiles")
    parser.add_argument("--match", default="",
                        help="only kernels whose label matches this regular expression")
    parser.add_argument("--write-warps", action="store_true",
                        help="rewrite the warp table's entries of the kernels compiled "
                        "(kernels/forward_warps.py) from this run; meant for the whole grid "
                        "(or a --match of it) on --arch 80 90")
    args = parser.parse_args(argv)
    found = {}
    bad = report(args.arch, args.quick, args.jobs, args.match, fallbacks_found=found)
    if args.write_warps:
        write_warp_table(found, {table_family(arch) for arch in args.arch}, args.match)
    return 1 if bad else 0


def write_warp_table(found: dict, families: set, match: str = "") -> None:
    """Rewrite FALLBACK in forward_warps.py: in the families compiled, the
    entries of the kernels compiled (labels matching ``match``) are
    ``found``'s; every other entry stays."""
    path = os.path.join(os.path.dirname(__file__), "forward_warps.py")
    with open(path) as handle:
        source = handle.read()
    table = {family: dict(entries) for family, entries in FALLBACK.items()}
    for family in families:
        kept = {key: label for key, label in table.get(family, {}).items()
                if not re.search(match, label)}
        table[family] = {**kept, **found.get(family, {})}
    lines = ["FALLBACK = {"]
    for family in sorted(table):
        lines.append(f"    {family}: {{")
        lines += [f"        {key!r}: {label!r},"
                  for key, label in sorted(table[family].items(), key=lambda kv: kv[1])]
        lines.append("    },")
    lines.append("}")
    start = source.index("FALLBACK = {")
    end = source.index("\n}\n", start) + 3
    with open(path, "w") as handle:
        handle.write(source[:start] + "\n".join(lines) + "\n" + source[end:])


if __name__ == "__main__":
    sys.exit(main())
