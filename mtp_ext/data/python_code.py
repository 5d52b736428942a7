"""The running interpreter's standard library as a code text: its ``.py`` files and the split by
top-level module."""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

__all__ = ["python_files", "python_split"]

_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def python_split(module: str) -> str:
    """``zlib.crc32(module) % 20``: 0 -> test, 1 -> validation, otherwise train."""
    bucket = zlib.crc32(module.encode("utf-8")) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def python_files(stdlib: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """``[(top-level module name, path)]`` of the standard library's ``.py`` files, sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _TEST_DIRS and not d.startswith("test_")
        )
        rel = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            module = rel.parts[0] if rel.parts else fn[: -len(".py")]
            out.append((module, Path(dirpath) / fn))
    out.sort(key=lambda x: str(x[1]))
    return out
