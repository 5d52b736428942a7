#!/usr/bin/env python
"""Summarize a pytest-benchmark JSON of the mtp_ext suites as markdown.

    python -m pytest bench --benchmark-json=bench.json
    python bench/summarize.py bench.json [--fail-on-miss]

Prints one table with a row per group (op and shape): the median time of the kernel, the
reference, the compiled reference and the plain-torch baseline, and the ratios reference/kernel,
compiled/kernel and baseline/kernel (> 1: the kernel is faster). Then the project's speed targets,
each checked on the medians of the same run, marked met or missed (n/a when a row is missing,
e.g. skipped or run with --benchmark-disable, which records no timings).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

IMPLS = ("kernel", "reference", "compiled", "baseline")


@dataclass(frozen=True)
class Target:
    op: str
    versus: str  # the impl the kernel is compared with
    min_ratio: float  # versus / kernel must be at least this
    applies: callable = lambda info: True
    note: str = ""


TARGETS = [
    Target("softmax_topk", "reference", 2.0),
    Target("topk_marginalize", "reference", 3.0),
    Target("topk_marginalize", "compiled", 1.5),
    Target("fused_mtp_heads", "reference", 1.5, lambda info: int(info.get("N", 0)) <= 8, "N <= 8"),
    Target("verify_tree", "reference", 10.0, note="Python-walk reference"),
]


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def ratio(slow: float | None, fast: float | None) -> float | None:
    return None if slow is None or fast is None or fast <= 0 else slow / fast


def load_groups(path: str) -> tuple[dict, dict]:
    """``{group: {"info": extra_info, "medians": {impl: seconds}}}`` in file order, and machine info."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        impl = info.get("impl")
        stats = bench.get("stats") or {}
        if impl not in IMPLS or "median" not in stats:
            continue
        group = bench.get("group") or bench.get("name")
        entry = groups.setdefault(group, {"info": info, "medians": {}})
        entry["medians"][impl] = stats["median"]
    return groups, data.get("machine_info", {})


def table(groups: dict) -> list[str]:
    lines = [
        "| group | kernel | reference | compiled | baseline | reference/kernel | compiled/kernel | baseline/kernel |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, entry in groups.items():
        m = entry["medians"]
        k = m.get("kernel")
        cells = [fmt_time(m.get(i)) for i in IMPLS]
        ratios = [fmt_ratio(ratio(m.get(i), k)) for i in ("reference", "compiled", "baseline")]
        lines.append(f"| {group} | " + " | ".join(cells + ratios) + " |")
    return lines


def check_targets(groups: dict) -> tuple[list[str], int, int, int]:
    lines = [
        "| target | group | measured | status |",
        "|---|---|---:|---|",
    ]
    met = missed = unknown = 0
    for t in TARGETS:
        label = f"{t.op}: {t.versus}/kernel >= {t.min_ratio:g}x" + (f" ({t.note})" if t.note else "")
        rows = [(g, e) for g, e in groups.items() if e["info"].get("op") == t.op and t.applies(e["info"])]
        if not rows:
            lines.append(f"| {label} | (no group in this run) | - | n/a |")
            unknown += 1
            continue
        for group, entry in rows:
            r = ratio(entry["medians"].get(t.versus), entry["medians"].get("kernel"))
            if r is None:
                status, unknown = "n/a", unknown + 1
            elif r >= t.min_ratio:
                status, met = "met", met + 1
            else:
                status, missed = "**missed**", missed + 1
            lines.append(f"| {label} | {group} | {fmt_ratio(r)} | {status} |")
    return lines, met, missed, unknown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="file written by pytest --benchmark-json=FILE")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    groups, machine = load_groups(args.json)
    if not groups:
        print(f"no timed mtp_ext benchmarks in {args.json} (was it run with --benchmark-disable?)")
        return 1
    ours = machine.get("mtp_ext_bench", {})
    cpu = machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or "unknown CPU"
    mode = "small (CI shapes)" if ours.get("small_mode") else "full (model shapes)"
    print(f"Machine: {cpu}; torch {ours.get('torch', '?')}, {ours.get('threads', '?')} threads; "
          f"mode: {mode}. Times are medians; ratios > 1 mean the kernel is faster.\n")
    print("\n".join(table(groups)))
    lines, met, missed, unknown = check_targets(groups)
    print("\n### Targets\n")
    print("\n".join(lines))
    print(f"\n{met} met, {missed} missed, {unknown} n/a.")
    return 1 if args.fail_on_miss and missed else 0


if __name__ == "__main__":
    sys.exit(main())
