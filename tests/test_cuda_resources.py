"""scripts/cuda_resources.py reads ptxas's report: registers, shared memory, stack and spills."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from cuda_resources import parse

REPORT = """\
ptxas info    : Compiling entry function '_Z1fv' for 'sm_90'
ptxas info    : Function properties for _Z1fv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 56 registers, used 1 barriers, 2016 bytes smem, 448 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 8 bytes cumulative stack size, 7744 bytes smem
ptxas info    : Compiling entry function '_Z1hv' for 'sm_80'
ptxas info    : Function properties for _Z1hv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers
"""


def test_parse_reads_every_kernel_including_those_with_a_stack_frame():
    rows = {r["mangled"]: r for r in parse(REPORT, "k.cu")}
    assert (rows["_Z1fv"]["registers"], rows["_Z1fv"]["smem"], rows["_Z1fv"]["stack"]) == (
        56,
        2016,
        0,
    )
    g = rows["_Z1gv"]
    assert (g["registers"], g["smem"], g["stack"], g["spill_stores"], g["spill_loads"]) == (
        80,
        7744,
        8,
        8,
        12,
    )
    assert (rows["_Z1hv"]["registers"], rows["_Z1hv"]["smem"], rows["_Z1hv"]["arch"]) == (
        24,
        0,
        "sm_80",
    )
