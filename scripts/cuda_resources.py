"""What each CUDA kernel uses per thread and per block, as ptxas reports it, with checks.

Compiles every ``csrc/kernels/*.cu`` for each architecture with ``nvcc -Xptxas -v`` (no GPU needed)
and reads, for every kernel instantiation: registers per thread, static shared memory, stack frame
and spills; with the block size of its launches, how many blocks fit on one SM. Fails (exit status 1) when a kernel uses more than 48 KB of static shared memory (its
launches would fail); lists the kernels that use local memory (spills, stack frames), which costs
speed only. ``--markdown FILE`` writes the table.

    python scripts/cuda_resources.py [--arch 80 --arch 90] [--markdown bench/results/cuda_resources.md]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
STATIC_SMEM_LIMIT = 48 * 1024

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# ptxas puts "N bytes cumulative stack size" between the barriers and the shared memory of a
# kernel with a stack frame.
_USED = re.compile(
    r"Used (\d+) registers(?:, used \d+ barriers)?(?:, \d+ bytes cumulative stack size)?"
    r"(?:, (\d+) bytes smem)?"
)


def find_nvcc() -> str:
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found is None:
        sys.exit("cuda_resources.py: nvcc not found (set CUDA_HOME)")
    return found


def ptxas_report(nvcc: str, source: Path, arch: str) -> str:
    cmd = [
        nvcc,
        "-std=c++17",
        "--expt-relaxed-constexpr",
        f"-arch=sm_{arch}",
        "-Xptxas",
        "-v",
        "-cubin",
        "-o",
        os.devnull,
        "-I",
        str(KERNELS),
        str(source),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cuda_resources.py: nvcc failed on {source.name} for sm_{arch}:\n{done.stderr}")
    return done.stdout + done.stderr


def parse(report: str, source: str) -> list[dict]:
    """One row per kernel: source, mangled name, arch, registers, smem, stack, spill bytes."""
    rows: list[dict] = []
    for line in report.splitlines():
        if m := _ENTRY.search(line):
            rows.append(
                {
                    "source": source,
                    "mangled": m.group(1),
                    "arch": m.group(2),
                    "registers": 0,
                    "smem": 0,
                    "stack": 0,
                    "spill_stores": 0,
                    "spill_loads": 0,
                }
            )
        elif rows and (m := _STACK.search(line)):
            rows[-1].update(
                stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3))
            )
        elif rows and (m := _USED.search(line)):
            rows[-1].update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    return rows


def _without_parameters(name: str) -> str:
    """`f<T>(int, float)` -> `f<T>`: drops the last balanced parenthesized group."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def readable(mangled: list[str]) -> list[str]:
    """Demangled names without namespaces, parameter lists or the anonymous namespace's tag."""
    filt = shutil.which("c++filt")
    if filt is None:
        return mangled
    out = subprocess.run(
        [filt], check=False, input="\n".join(mangled), capture_output=True, text=True
    ).stdout.splitlines()
    names = []
    for name in out:
        name = _without_parameters(name)
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"mtp_ext::kernels::cuda::(\(anonymous namespace\)::)?", "", name)
        name = name.replace("mtp_ext::kernels::", "")
        names.append(name)
    return names


# Per SM: registers, shared memory usable by blocks, threads, blocks (CUDA occupancy limits).
SM_LIMITS = {
    "sm_80": {"regs": 65536, "smem": 167936, "threads": 2048, "blocks": 32},
    "sm_90": {"regs": 65536, "smem": 233472, "threads": 2048, "blocks": 32},
}
_BOUNDS = re.compile(r"__launch_bounds__\((\w+)(?:,[^)]*)?\)\s+(\w+)\s*\(")
_LAUNCH_SITE = re.compile(r"(\w+)(?:<[^<>;()]*>)?\s*<<<(.*?)>>>", re.DOTALL)
_CONSTANT = re.compile(r"constexpr int (\w+) = (\d+);")


def _top_level_split(text: str) -> list[str]:
    """Splits a launch configuration at the commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _value(expr: str, constants: dict[str, int]) -> int | None:
    """An integer literal or a named constant of the file; None otherwise."""
    expr = expr.strip()
    return int(expr) if expr.isdigit() else constants.get(expr)


def block_sizes() -> dict[str, int]:
    """Threads per block of each kernel: its __launch_bounds__, else the block size of its launch
    sites (when a literal or a named constant), by kernel name without template arguments."""
    sizes: dict[str, int] = {}
    # Named constants of the kernels' sources and headers (a header's constant may size a block).
    constants = {
        k: int(v)
        for path in sorted(KERNELS.iterdir())
        if path.suffix in (".cu", ".cuh", ".h")
        for k, v in _CONSTANT.findall(path.read_text())
    }
    for source in KERNELS.glob("*.cu"):
        text = source.read_text()
        for bound, name in _BOUNDS.findall(text):
            if (n := _value(bound, constants)) is not None:
                sizes[name] = n
        for name, config in _LAUNCH_SITE.findall(text):
            args = _top_level_split(config)
            if (
                name not in sizes
                and len(args) > 1
                and (n := _value(args[1], constants)) is not None
            ):
                sizes[name] = n
    return sizes


def blocks_per_sm(row: dict, threads: int) -> int:
    """Resident blocks per SM from registers (8-register, 256-per-warp granules), static shared
    memory (plus the 1 KB each block reserves), threads and the block limit."""
    lim = SM_LIMITS.get(row["arch"])
    if lim is None or threads <= 0:
        return 0
    warps = -(-threads // 32)
    regs_per_warp = -(-(-(-row["registers"] // 8) * 8 * 32) // 256) * 256
    by_regs = lim["regs"] // max(warps * regs_per_warp, 1)
    by_smem = lim["smem"] // (row["smem"] + 1024)
    return min(by_regs, by_smem, lim["threads"] // threads, lim["blocks"])


def problems(row: dict) -> list[str]:
    """What would make a launch fail: more static shared memory than a launch gets by default."""
    if row["smem"] > STATIC_SMEM_LIMIT:
        return [f"{row['smem']} B static shared memory > 48 KB"]
    return []


def local_memory(row: dict) -> list[str]:
    """What costs speed only: register spills and stack frames (local memory)."""
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if row["stack"]:
        found.append(f"{row['stack']} B stack frame")
    return found


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# CUDA kernels: registers, shared memory and occupancy (ptxas)",
        "",
        f"Produced by `{command}` (nvcc -Xptxas -v; no GPU involved). Registers are per thread;",
        "shared memory is the static part (the top-k merge adds its candidates as dynamic shared",
        "memory at launch). Stack and spills are bytes of local memory per thread: a stack frame holds",
        "a per-thread array indexed at run time (the sampling kernels' kept candidates).",
        "Threads per block come from each kernel's `__launch_bounds__` or its launch sites; resident",
        "blocks (and warps) per SM are what registers, static shared memory and the SM's thread and",
        "block limits allow, out of 64 warps (dynamic shared memory not counted: the tensor-core",
        "unembedding, `unembed_topk_partial_mma_kernel<T, R>`, takes 85760, 110080 or 158720 B of it",
        "for R = 16, 32 or 64 rows, so 2, 2 and 1 blocks per SM on sm_90, 1, 1 and 1 on sm_80).",
        "",
        (
            "| kernel | file | arch | threads / block | registers | static smem (B) "
            "| blocks (warps) / SM | stack (B) | spill stores / loads (B) |"
        ),
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["source"], r["name"], r["arch"])):
        threads = r.get("threads") or 0
        blocks = blocks_per_sm(r, threads)
        resident = f"{blocks} ({blocks * -(-threads // 32)})" if threads else "?"
        lines.append(
            f"| `{r['name']}` | {r['source']} | {r['arch']} | {threads or '?'} | {r['registers']} "
            f"| {r['smem']} | {resident} | {r['stack']} | {r['spill_stores']} / {r['spill_loads']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", action="append", help="compute capability without the dot (default 80 and 90)"
    )
    parser.add_argument("--markdown", type=Path, help="write the table to this file")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    arches = args.arch or ["80", "90"]
    nvcc = find_nvcc()
    sources = sorted(KERNELS.glob("*.cu"))
    jobs = [(s, a) for s in sources for a in arches]
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = list(pool.map(lambda job: ptxas_report(nvcc, *job), jobs))
    rows = [row for (src, _), rep in zip(jobs, reports) for row in parse(rep, src.name)]
    if not rows:
        sys.exit("cuda_resources.py: ptxas reported no kernels")
    sizes = block_sizes()
    for row, name in zip(rows, readable([r["mangled"] for r in rows])):
        row["name"] = name
        row["threads"] = sizes.get(name.split("<")[0])
    bad = [(r, p) for r in rows for p in problems(r)]
    kernels = len({(r["source"], r["name"]) for r in rows})
    print(
        f"cuda_resources.py: {len(rows)} kernel builds ({kernels} kernels x {len(arches)} archs); "
        f"registers {min(r['registers'] for r in rows)}-{max(r['registers'] for r in rows)}, "
        f"static shared memory up to {max(r['smem'] for r in rows)} B"
    )
    for r in rows:
        if notes := local_memory(r):
            print(f"  local memory: {r['name']} ({r['arch']}): {', '.join(notes)}")
    for r, p in bad:
        print(f"  FAILS: {r['name']} ({r['arch']}): {p}")
    if args.markdown:
        command = "python scripts/cuda_resources.py" + "".join(f" --arch {a}" for a in arches)
        args.markdown.write_text(markdown(rows, command + f" --markdown {args.markdown}"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
