"""A small problem for every launch configuration of the Triton kernels, for compute-sanitizer.

gpu_check.sh runs this under compute-sanitizer (memcheck, racecheck): the
backward stages data through global scratch across barriers, and a bad
index or a missing barrier shows there before it shows in a result. Each
case runs backend="triton" forward and backward once, on small shapes with
awkward sizes (T not a multiple of the tile, rows of length 0 and T), and
checks the output and the gradients against float64 (a wrong result fails
the run too).

The forward cases cover padded rows, many candidates with softmax and
scores, a long row split over T, and jagged histories; the two-stage cases
(din_attention_top_k) run the search kernel with each scorer: blocks of
candidates, a long row split over T, and K wider than a tile. The backward cases
are chosen so that together they run every launch configuration the fused
backward has: one launch computing everything; split into the inputs', the
first layer's and the deeper layers' launches; the first layer's sums in
blocks of key columns; split with one hidden layer (no deeper launch). The
script prints each case's launches and fails when the cases no longer cover
every configuration (say, after the launch rules change): that check is the
one place the benchmarks read din_fast internals (fused_backward_launches).

    python -m benchmarks.sanitizer_workload [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import dataclass, field

import torch

import din_fast

from .harness import worst_gradient_error
from .peers import as_float64, float64_output, leaves, make_inputs, with_grad

# What the backward cases must run between them (see fused_backward_launches).
REQUIRED_LAUNCHES = {"one launch", "inputs", "first layer whole", "first layer in column blocks",
                     "deeper layers", "split without deeper layers"}


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    candidates: int
    length: int
    dim: int
    hidden: tuple
    dtype: torch.dtype
    options: dict = field(default_factory=dict)   # more din_attention keywords
    backward: bool = True
    jagged: bool = False
    search: tuple = ()      # (scorer, K): din_attention_top_k's two stages, forward only


CASES = [
    Case("padded rows, forward", 5, 1, 37, 32, (80, 40), torch.float16, backward=False),
    Case("many candidates, softmax, scores", 3, 5, 23, 32, (80, 40), torch.bfloat16,
         dict(normalization="softmax", scale=0.25, return_scores=True), backward=False),
    Case("one long row (split over T)", 1, 1, 3000, 64, (80, 40), torch.bfloat16, backward=False),
    Case("jagged histories", 4, 1, 29, 32, (80, 40), torch.bfloat16, backward=False, jagged=True),
    Case("backward, one launch", 5, 3, 37, 32, (32,), torch.float32,
         dict(normalization="softmax", scale=0.5)),
    Case("backward, split with deeper layers", 5, 1, 37, 64, (80, 40), torch.bfloat16),
    Case("backward, first layer in column blocks", 3, 1, 21, 128, (80, 40), torch.bfloat16,
         dict(normalization="softmax", scale=0.1, return_scores=True)),
    Case("backward, split without deeper layers", 4, 2, 19, 128, (64,), torch.float16),
    Case("two-stage: din search, candidate blocks", 3, 20, 37, 32, (80, 40), torch.float32,
         dict(normalization="softmax"), backward=False, search=("din", 8)),
    Case("two-stage: dot search, split over T", 1, 2, 3000, 32, (80, 40), torch.float32,
         backward=False, search=("dot", 100)),
    Case("two-stage: category search, K past a tile", 4, 3, 300, 32, (80, 40),
         torch.bfloat16, dict(normalization="softmax"), backward=False,
         search=("category", 200)),
]


def case_inputs(case: Case, device) -> dict:
    inputs = make_inputs(case.batch, case.candidates, case.length, case.dim, case.hidden,
                         case.dtype, device, seed=len(case.name))
    lengths = inputs["lengths"]
    lengths[0] = case.length          # a full row
    if case.batch > 2:
        lengths[1] = 0                # and an empty one
    return inputs


def fused_backward_launches(inputs: dict, options: dict) -> list:
    """The kinds of launch the fused backward runs for these inputs, as the op
    plans them. Reads din_fast internals: din_fast.problem.validate and
    din_fast.kernels.din_backward.backward_spec / backward_unsupported_shape."""
    from din_fast.kernels.din_backward import backward_spec, backward_unsupported_shape
    from din_fast.problem import validate

    public = inspect.signature(din_fast.din_attention).parameters
    arguments = {name: p.default for name, p in public.items() if p.default is not p.empty}
    arguments.update(inputs, **options)
    # din_attention's arguments less the two that choose what runs, not what is computed
    problem = validate(**{name: value for name, value in arguments.items()
                          if name not in ("return_scores", "backend")})
    reason = backward_unsupported_shape(problem.keys.shape[2], problem.hidden_units,
                                        problem.keys.dtype)
    if reason is not None:
        raise SystemExit(f"sanitizer_workload: the fused backward does not run this case: {reason}")
    launches = backward_spec(problem, has_grad_scores=bool(options.get("return_scores"))).launches()
    if len(launches) == 1:
        return ["one launch"]
    kinds = {"inputs"} & {spec.part for spec in launches}
    firsts = [spec for spec in launches if spec.part == "first"]
    kinds.add("first layer whole" if len(firsts) == 1 else "first layer in column blocks")
    kinds.add("deeper layers" if any(spec.part == "deeper" for spec in launches)
              else "split without deeper layers")
    return sorted(kinds)


def run_case(case: Case, device) -> float:
    """Forward (and backward) on the triton backend: the largest error of the
    output (and of every gradient) against float64, relative to its largest element."""
    inputs = case_inputs(case, device)
    if case.search:
        return run_two_stage(case, inputs, device)
    if case.jagged:
        exact = float64_output(inputs)
        lengths = inputs.pop("lengths")
        valid = torch.arange(case.length, device=device)[None, :] < lengths[:, None]
        offsets = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        keys = inputs.pop("keys")[valid]
        pooled = din_fast.din_attention_jagged(inputs.pop("query"), keys, offsets, case.length,
                                               backend="triton", **inputs, **case.options)
        return relative_error(pooled, exact)
    triton_out, triton_leaves = differentiable_call(inputs, case.options, "triton")
    exact_out, exact_leaves = differentiable_call(as_float64(inputs), case.options, "reference")
    error = max(relative_error(t, e) for t, e in zip(triton_out, exact_out))
    if case.backward:
        probes = [torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
                  for out in exact_out]
        grads, exact_grads = (
            torch.autograd.grad(sum((o.double() * p).sum() for o, p in zip(out, probes)), tensors)
            for out, tensors in ((triton_out, triton_leaves), (exact_out, exact_leaves)))
        error = max(error, worst_gradient_error(grads, exact_grads))
    return error


def run_two_stage(case: Case, inputs: dict, device) -> float:
    """din_attention_top_k on triton (the search kernel, then the forward on
    the gathered rows) against its float64 oracle: the output's error."""
    scorer, top_k = case.search
    gen = torch.Generator().manual_seed(5)
    batch, length, dim = inputs["keys"].shape
    search = dict(top_k=top_k, search=scorer)
    if scorer == "dot":
        search["search_params"] = tuple(torch.randn(16, dim, generator=gen).to(device)
                                        for _ in range(2))
    if scorer == "category":
        search["query_categories"] = torch.randint(0, 4, inputs["query"].shape[:-1],
                                                   generator=gen).to(device)
        search["key_categories"] = torch.randint(0, 4, (batch, length), generator=gen).to(device)
    pooled = din_fast.din_attention_top_k(backend="triton", **inputs, **case.options, **search)
    exact = din_fast.din_attention_top_k(backend="reference", **as_float64(inputs),
                                         **case.options, **as_float64(search))
    return relative_error(pooled, exact)


def differentiable_call(inputs: dict, options: dict, backend: str):
    """din_attention's outputs (pooled, and the scores when asked) and the
    leaves that require grad."""
    inputs = with_grad(inputs)
    out = din_fast.din_attention(backend=backend, **inputs, **options)
    return (out if isinstance(out, tuple) else (out,)), leaves(inputs)


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sanitizer_workload",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda, or cpu for the kernels in the Triton interpreter "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    covered = set()
    failed = []
    for case in CASES:
        launches = ""
        if case.backward:
            kinds = fused_backward_launches(case_inputs(case, device), case.options)
            covered.update(kinds)
            launches = f"  backward: {', '.join(kinds)}"
        error = run_case(case, device)
        tolerance = 5e-3 if case.dtype == torch.float32 else 3e-2
        ok = error <= tolerance
        if not ok:
            failed.append(case.name)
        print(f"{case.name:<42} relative error {error:.1e} {'ok' if ok else 'WRONG'}{launches}",
              flush=True)
    missing = REQUIRED_LAUNCHES - covered
    if missing:
        print(f"sanitizer_workload: no case runs the backward launches {sorted(missing)}: "
              f"CASES needs a case for each (see fused_backward_launches)", file=sys.stderr)
        return 1
    if failed:
        print(f"sanitizer_workload: wrong results in {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
