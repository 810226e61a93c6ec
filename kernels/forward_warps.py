"""The forward launcher's warp table: for each architecture family, the
specializations (ForwardSpec.key() -> the compile report's label) whose
preferred warp count makes ptxas spill while the other compiles clean, so
that the launcher takes the other.

Written by ``python -m din_fast.kernels.aot --write-warps`` over the whole
compile grid. Choosing from this table keeps compilation and subprocesses
off the launch path.
"""

# Written by the compile report: do not edit by hand.
FALLBACK = {
    80: {
    },
    90: {
    },
}


def table_family(arch: int) -> int:
    """The family whose entries hold for sm_<arch>: 80 for sm_80 to sm_89, 90 from sm_90."""
    return 90 if arch >= 90 else 80
