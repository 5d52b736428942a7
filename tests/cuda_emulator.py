"""Builds and loads the CUDA kernels under the CPU emulator (``csrc/emulator``).

The emulated build compiles the CUDA kernels (``csrc/kernels/*.cu``, rewritten as C++: see
:func:`translate`), their launchers (``csrc/cuda/*.cpp``, unchanged) and the op schemas
(``csrc/ops.cpp``) with the host compiler, against stand-ins for the CUDA toolkit and c10's CUDA
headers. The launchers register for CPU tensors in the namespace ``mtp_ext_emu``, so
``torch.ops.mtp_ext_emu.<op>`` runs the CUDA code path (launcher checks, kernels, fallbacks) on the
CPU, one fiber per GPU thread, while ``torch.ops.mtp_ext.<op>`` keeps the CPU kernels. It is slow:
use small shapes.

``load()`` builds once into ``build/cuda_emulator`` (or ``$MTP_EXT_EMULATOR_BUILD``; ninja keeps it
between runs) and returns the ``torch.ops.mtp_ext_emu`` namespace. ``CUDA_EMU_SCHEDULE``
(``forward``, ``reverse``, ``random:<seed>``) orders the threads' turns; ``CUDA_EMU_SMS`` sets the
device's multiprocessor count (default 132), ``CUDA_EMU_SMEM_PER_SM`` its shared memory per
multiprocessor (default 233472 bytes), ``CUDA_EMU_L2_BYTES`` its L2 cache (default 52428800 bytes)
and ``CUDA_EMU_CC`` its compute capability (default 9.0).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMULATOR = CSRC / "emulator"
BUILD = Path(os.environ.get("MTP_EXT_EMULATOR_BUILD", ROOT / "build" / "cuda_emulator"))
NAME = "mtp_ext_cuda_emulated"

# `kernel<<<config>>>(` where kernel may carry template arguments: `k<T, 16><<<grid, 256, 0, s>>>(`.
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.DOTALL)
# `extern __shared__ T name[];`
_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;"
)


# A static `__shared__ [__align__(n)] Type name[dims];` declaration inside a kernel.
_STATIC_SHARED = re.compile(
    r"(?<!extern )__shared__\s+(?:__align__\(\d+\)\s+)?"
    r"([A-Za-z_][\w:]*(?:<[^;<>]*>)?)\s+(\w+)((?:\s*\[[^\]]*\])*)\s*;"
)
# A kernel that is not a template: `__global__ void [__launch_bounds__(n)] name(`.
_KERNEL = re.compile(r"(?<!>\n)__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(")


def _note_static_shared(source: str) -> str:
    """After each static ``__shared__`` declaration, a call that tells the emulator its address and
    size (it poisons the memory at each block and checks the block's total against the limit)."""
    return _STATIC_SHARED.sub(
        lambda m: f"{m.group(0)} ::cuda_emu::note_shared(&{m.group(2)}, sizeof({m.group(2)}));",
        source,
    )


# `__launch_bounds__(max_threads[, min_blocks]) name(`
_BOUNDED_KERNEL = re.compile(r"__launch_bounds__\((\w+)(?:,[^)]*)?\)\s+\w+\s*\(")


def _check_launch_bounds(source: str) -> str:
    """At the top of each kernel with ``__launch_bounds__(n)``, a check that the block has at most
    n threads (a GPU refuses such a launch)."""
    out, pos = [], 0
    for m in _BOUNDED_KERNEL.finditer(source):
        body = source.index("{", m.end())
        out.append(source[pos : body + 1])
        out.append(f" ::cuda_emu::check_launch_bounds({m.group(1)});")
        pos = body + 1
    return "".join(out) + source[pos:]


def _declare_static_shared(source: str) -> str:
    """After each non-template kernel with static shared memory, a registration of its size, which
    cudaFuncGetAttributes reports (launchers query it before the first launch)."""
    out, pos = [], 0
    for m in _KERNEL.finditer(source):
        body = source.index("{", m.end())
        depth, end = 0, body
        for end in range(body, len(source)):
            depth += {"{": 1, "}": -1}.get(source[end], 0)
            if depth == 0:
                break
        sizes = [
            f"sizeof({t}{dims})" for t, _, dims in _STATIC_SHARED.findall(source[body : end + 1])
        ]
        if not sizes:
            continue
        out.append(source[pos : end + 1])
        out.append(
            f" static const bool cuda_emu_static_shared_{m.group(1)} ="
            f" ::cuda_emu::declare_static_shared(reinterpret_cast<const void*>(&{m.group(1)}),"
            f" {' + '.join(sizes)});"
        )
        pos = end + 1
    return "".join(out) + source[pos:]


def translate(source: str, path: str = "") -> str:
    """The C++ form of a CUDA source for the emulator: launches and dynamic shared memory rewritten,
    static shared memory reported to the emulator (every change stays on its line).

    Raises ValueError if a launch or an ``extern __shared__`` declaration is left that the rewrite
    did not understand (so a new construct fails the build instead of being skipped).
    """
    out = _check_launch_bounds(_note_static_shared(_declare_static_shared(source)))
    out = _LAUNCH.sub(
        lambda m: f"::cuda_emu::launch({m.group(1)}, ::cuda_emu::LaunchConfig({m.group(2)}))(",
        out,
    )
    out = _DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = ::cuda_emu::dynamic_shared<{m.group(1)}>();", out
    )
    for marker in ("<<<", "extern __shared__"):
        if marker in out:
            line = out[: out.index(marker)].count("\n") + 1
            raise ValueError(f"cuda_emulator: cannot translate `{marker}` at line {line}")
    # Line numbers are kept, so compiler messages point into the original file.
    return '#include "cuda_emulator.h"\n' + (f'#line 1 "{path}"\n' if path else "") + out


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def sources() -> list[str]:
    """The emulated build's sources: generated files in BUILD, plus the emulator's runtime."""
    gen = BUILD / "src"
    gen.mkdir(parents=True, exist_ok=True)
    out = [str(EMULATOR / "cuda_emulator.cpp")]
    for cu in [*sorted((CSRC / "kernels").glob("*.cu")), EMULATOR / "selftest.cu"]:
        target = gen / (cu.stem + "_cu.cpp")
        _write_if_changed(target, translate(cu.read_text(), str(cu)))
        out.append(str(target))
    # Torch-facing files: the registration remap first, then the file itself, unchanged.
    for cpp in [CSRC / "ops.cpp", CSRC / "checks.cpp", *sorted((CSRC / "cuda").glob("*.cpp"))]:
        target = gen / (cpp.parent.name + "_" + cpp.stem + ".cpp")
        _write_if_changed(target, f'#include "registration.h"\n#include "{cpp}"\n')
        out.append(str(target))
    return out


def counter(name: str):
    """One of the built emulator's counters (call ``load()`` first): ``"launches"`` gives
    ``f()``, the launches so far; ``"launch_blocks"`` and ``"launch_barriers"`` give ``f(n)``, the
    blocks of launch number ``n`` (1 for the first) and the block barriers they released."""
    fn = getattr(ctypes.CDLL(str(BUILD / f"{NAME}.so")), f"cuda_emu_{name}")
    if name != "launches":
        fn.argtypes = [ctypes.c_uint64]
    fn.restype = ctypes.c_uint64
    return fn


def launch_log(call):
    """Runs ``call()`` on the emulator (call ``load()`` first); returns its result and, for each
    launch it made, ``(blocks, block barriers released)``."""
    launches = counter("launches")
    blocks, barriers = counter("launch_blocks"), counter("launch_barriers")
    before = launches()
    result = call()
    return result, [(blocks(n), barriers(n)) for n in range(before + 1, launches() + 1)]


def topk_marginalize_second_pass_barriers(ops, x, w, m: int, renormalize: bool = True):
    """``ops.topk_marginalize`` (the emulator's namespace) and the block barriers its second pass
    (the last two of its five launches: the one-read path's) released: 0 when every batch row was
    answered from the one read."""
    out, log = launch_log(lambda: ops.topk_marginalize(x, w, m, renormalize))
    if len(log) != 5:  # one-read partial, plan, answer, second pass, merge
        raise RuntimeError(f"topk_marginalize made {len(log)} launches, not the one-read path's 5")
    return out, log[3][1] + log[4][1]


def load(verbose: bool = False):
    """Builds (if needed) and loads the emulated kernels; returns ``torch.ops.mtp_ext_emu``."""
    import torch
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the environment's ninja, when Python runs from a venv
        os.environ["PATH"] = (
            os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        )
    if not hasattr(torch.ops, "mtp_ext_emu") or not hasattr(torch.ops.mtp_ext_emu, "softmax_topk"):
        cpp_extension.load(
            name=NAME,
            sources=sources(),
            extra_include_paths=[
                str(EMULATOR / "include"),
                str(EMULATOR),
                str(CSRC / "kernels"),
                str(CSRC),
            ],
            extra_cflags=[
                "-O2",
                "-g0",
                "-Wno-unknown-pragmas",
                # __popc as one instruction (x86-64 only; elsewhere the builtin's default)
                *(["-mpopcnt"] if platform.machine() in ("x86_64", "AMD64") else []),
            ],
            build_directory=str(BUILD),
            is_python_module=False,
            verbose=verbose,
        )
    return torch.ops.mtp_ext_emu


def route_cpu_ops_to_emulator():
    """Makes ``torch.ops.mtp_ext.<op>`` on CPU tensors run the emulated CUDA kernels.

    Returns the ``torch.library.Library`` holding the overrides: they last while it is alive, and
    its ``_destroy()`` gives the CPU kernels back. For running whole CPU test files on the CUDA code
    path (``pytest --cuda-emulator``).
    """
    import torch

    from mtp_ext import ops  # every op has a CUDA launcher (csrc/cuda)

    emu = load()
    lib = torch.library.Library("mtp_ext", "IMPL")
    for name in ops.__all__:
        op = getattr(emu, name)

        def run(*args, _op=op, **kwargs):
            return _op(*args, **kwargs)

        lib.impl(name, run, "CPU")
    return lib


if __name__ == "__main__":
    load(verbose=True)
    print("built and loaded", NAME)
