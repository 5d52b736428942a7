"""``mtp-ext info``: what this installation of mtp_ext was built with, which backends each op has,
the machine, and which CPU linear kernel this machine uses per weight shape, dtype and row count
(from the cached measurement; ``--measure-linear`` measures SmolLM2-135M's shapes first)."""

from __future__ import annotations

import argparse

import torch

from .. import __version__, linear_choice, ops
from ..machine import describe_cpu

__all__ = ["add_parser", "backends", "cuda_device_text", "info_text", "linear_choice_text", "run"]

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


def linear_choice_text(measure: bool = False) -> str:
    """The CPU linear kernel choice of this machine (:func:`mtp_ext.linear_choice.describe`) as
    cached; with ``measure``, SmolLM2-135M's weight shapes in float32 and bfloat16 are measured
    first (no model is loaded) and the cache updated."""
    if measure:
        wanted = [(n, k, dt) for n, k in linear_choice.SMOLLM2_135M_SHAPES
                  for dt in ("float32", "bfloat16")]
        linear_choice.choice_for_shapes(wanted, refresh=True, progress=True, mode="auto")
    choice = linear_choice.cached_choice()
    if choice is None:
        return ("linear kernel per row count: not measured on this machine yet (measured when "
                "fast_cpu first runs a model; or: mtp-ext info --measure-linear)")
    return linear_choice.describe(choice)


def info_text(measure_linear: bool = False) -> str:
    """A human-readable report: versions, build, devices, per-op backends, the machine and its
    CPU linear kernel choice (``measure_linear``: measured first, see
    :func:`linear_choice_text`)."""
    lines = [
        f"mtp_ext {__version__}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        cuda_device_text(),
        f"CPU: {describe_cpu()}",
        "ops (backends with a kernel; Meta = fake for torch.compile):",
    ]
    width = max(len(n) for n in OP_NAMES)
    for name in OP_NAMES:
        lines.append(f"  {name:<{width}}  {', '.join(backends(name)) or 'none'}")
    lines.append(linear_choice_text(measure_linear))
    return "\n".join(lines)


def add_parser(sub) -> None:
    """Adds the ``info`` command to the subcommands ``sub``."""
    p = sub.add_parser("info", help="versions, build, the backends of every op, the machine and "
                       "its CPU linear kernel choice")
    p.add_argument("--measure-linear", action="store_true",
                   help="time F.linear and small_batch_linear for SmolLM2-135M's weight shapes "
                        "(float32, bfloat16; about 7 s, no model loaded) and cache the choice")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext info``; returns the exit status."""
    print(info_text(getattr(args, "measure_linear", False)))
    return 0
