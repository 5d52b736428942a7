"""Build script of the mtp_ext extension.

The CPU kernels are always built. The CUDA kernels (csrc/kernels/*.cu and their launchers in csrc/cuda)
are built when the installed torch is a CUDA build and CUDA_HOME (or nvcc) is found; a GPU is not
needed to build them. Environment:

* ``MTP_EXT_CPU_FLAGS``: extra compiler flags for the CPU kernels. By default the AVX2/FMA/F16C
  instruction sets are enabled when the building machine has them (``-mavx2 -mfma -mf16c``, plus
  ``-mavx512f -mavx512vl -mavx512bw -mavx512dq`` where AVX-512 is present, and ``-mavx512bf16``
  for the bfloat16 dot products where that is present too); set it
  to an empty string for a portable build.
* ``MTP_EXT_FORCE_CPU=1``: skip the CUDA kernels even on a CUDA build of torch.
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for (for example ``"8.0;9.0"``).
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import find_packages, setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def host_cpu_flags() -> list[str]:
    """SIMD flags for the machine that builds, unless MTP_EXT_CPU_FLAGS overrides them."""
    if "MTP_EXT_CPU_FLAGS" in os.environ:
        return os.environ["MTP_EXT_CPU_FLAGS"].split()
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return []
    if "avx2" not in flags:
        return []
    wanted = {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c"}
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        wanted.update(avx512f="-mavx512f", avx512vl="-mavx512vl", avx512bw="-mavx512bw", avx512dq="-mavx512dq")
        wanted.update(avx512_bf16="-mavx512bf16")
    return [flag for name, flag in wanted.items() if name in flags]


def build_cuda() -> bool:
    if os.environ.get("MTP_EXT_FORCE_CPU") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cxx = ["-O3", "-fopenmp", "-Wno-psabi", *host_cpu_flags()]
    link = ["-fopenmp"]
    # CUDA: the torch-free kernels (csrc/kernels/*.cu, nvcc) and their launchers (csrc/cuda/*.cpp,
    # the host compiler with torch's headers).
    cuda_sources = rel(
        glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )
    if build_cuda() and cuda_sources:
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DMTP_EXT_WITH_CUDA"]
        return [
            CUDAExtension(
                "mtp_ext._C",
                sources + cuda_sources,
                extra_compile_args={"cxx": cxx + ["-DMTP_EXT_WITH_CUDA"], "nvcc": nvcc},
                extra_link_args=link,
                py_limited_api=True,
            )
        ]
    return [
        CppExtension(
            "mtp_ext._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    ]


setup(
    packages=find_packages(include=["mtp_ext", "mtp_ext.*"]),
    package_data={"mtp_ext": ["shipped_heads/*/*.json", "shipped_heads/*/*.safetensors"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
