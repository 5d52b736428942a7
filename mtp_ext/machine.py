"""What this machine is, as the measurements that depend on it need it (``mtp_ext.machine``).

Kernel choices and step costs are measured once per machine and cached; their cache keys and every
benchmark table name the machine with :func:`cpu_facts`: the CPU model, the ISA extensions that
change which kernel wins (AVX2, AVX-512 and its VNNI / BF16 / FP16 parts, AMX), the cache sizes,
the torch version and the thread count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from pathlib import Path

import torch

__all__ = ["ISA_FLAGS", "cpu_facts", "cpu_key", "describe_cpu"]

# /proc/cpuinfo flags that decide which CPU kernel is fastest, in the order tables show them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

_SYS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")


def _cpuinfo() -> tuple[str, set[str]]:
    """``(model name, flags)`` from ``/proc/cpuinfo`` (Linux; elsewhere the platform's name and
    no flags)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def _caches() -> dict[str, str]:
    """Cache sizes seen by CPU 0, e.g. ``{"L1d": "48K", "L2": "2048K", "L3": "32768K"}`` (sysfs;
    empty where it is not readable). L1 and L2 are per core on current x86 servers, L3 shared."""
    out: dict[str, str] = {}
    try:
        for index in sorted(_SYS_CACHE.glob("index*")):
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            label = f"L{level}" + ("d" if kind == "Data" else "")
            out[label] = (index / "size").read_text().strip()
    except OSError:
        pass
    return out


@functools.lru_cache(maxsize=1)
def _static_facts() -> dict:
    name, flags = _cpuinfo()
    return {
        "cpu": name,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "caches": _caches(),
        "logical_cpus": os.cpu_count() or 1,
        "machine": platform.machine(),
    }


def cpu_facts() -> dict:
    """The CPU model, its ISA extensions among :data:`ISA_FLAGS`, cache sizes, logical CPUs, the
    torch version and ``torch.get_num_threads()`` (read now: it may change between calls)."""
    facts = dict(_static_facts())
    facts["torch"] = torch.__version__
    facts["threads"] = torch.get_num_threads()
    return facts


def cpu_key() -> str:
    """A short hash of what a CPU measurement depends on: the CPU model, its ISA extensions, the
    torch version and the thread count."""
    f = cpu_facts()
    text = json.dumps([f["cpu"], f["isa"], f["torch"], f["threads"]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_cpu() -> str:
    """One line for a table's caption: ``"AMD EPYC (avx2, ..., avx512_bf16; L1d 48K, L2 1024K,
    L3 32768K), torch 2.x, 2 threads"``."""
    f = cpu_facts()
    caches = ", ".join(f"{k} {v}" for k, v in f["caches"].items())
    isa = ", ".join(f["isa"]) or "no AVX2 / AVX-512 / AMX"
    inside = f"{isa}; {caches}" if caches else isa
    return f"{f['cpu']} ({inside}), torch {f['torch']}, {f['threads']} threads"
