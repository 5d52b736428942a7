"""``mtp-ext info``: what this installation of mtp_ext was built with and which backends each op
has."""

from __future__ import annotations

import argparse

import torch

from .. import __version__, ops

__all__ = ["add_parser", "backends", "cuda_device_text", "info_text", "run"]

OP_NAMES = [name for name in ops.__all__]


def backends(op_name: str) -> list[str]:
    """Dispatch keys with a kernel for ``torch.ops.mtp_ext.<op_name>`` among CPU, CUDA and Meta."""
    qualified = f"mtp_ext::{op_name}"
    found = []
    for key in ("CPU", "CUDA", "Meta"):
        if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            found.append(key)
    return found


def cuda_device_text() -> str:
    """The current CUDA device, and which cores multiply 16-bit weights in the ops that have a
    tensor-core path (compute capability 8.0 and newer)."""
    if not torch.cuda.is_available():
        return "CUDA device available: False"
    major, minor = torch.cuda.get_device_capability()
    cores = "tensor cores" if (major, minor) >= (8, 0) else "CUDA cores (tensor cores need 8.0)"
    return (
        f"CUDA device: {torch.cuda.get_device_name()}, compute capability {major}.{minor}: "
        f"float16 / bfloat16 weights in fused_mtp_heads, verify_tree_from_hidden and "
        f"small_batch_linear run on {cores}"
    )


def info_text() -> str:
    """A human-readable report: versions, build, devices and per-op backends."""
    lines = [
        f"mtp_ext {__version__}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        cuda_device_text(),
        "ops (backends with a kernel; Meta = fake for torch.compile):",
    ]
    width = max(len(n) for n in OP_NAMES)
    for name in OP_NAMES:
        lines.append(f"  {name:<{width}}  {', '.join(backends(name)) or 'none'}")
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Adds the ``info`` command to the subcommands ``sub``."""
    p = sub.add_parser("info", help="versions, build and the backends of every op")
    p.set_defaults(func=run)


def run(_: argparse.Namespace) -> int:
    """Runs ``mtp-ext info``; returns the exit status."""
    print(info_text())
    return 0
