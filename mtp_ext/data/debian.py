"""Debian packages fetched and unpacked without root: ``apt-get download`` and ``dpkg-deb -x``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["fetch_deb"]


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_deb(package: str, workdir: str, state: dict) -> Path:
    """``apt-get download`` (after one ``apt-get update`` if needed) and ``dpkg-deb -x`` into
    ``workdir / package``, which is returned. ``state`` remembers across calls whether
    ``apt-get update`` already ran."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not available: the texts need a Debian-based system")
    res = _run(["apt-get", "download", package], workdir)
    if res.returncode != 0 and not state.get("updated"):
        state["updated"] = True
        upd = _run(["apt-get", "update"], workdir)
        if upd.returncode != 0:
            raise RuntimeError(f"apt-get update failed:\n{upd.stderr.strip()}")
        res = _run(["apt-get", "download", package], workdir)
    if res.returncode != 0:
        raise RuntimeError(f"apt-get download {package} failed:\n{res.stderr.strip()}")
    debs = sorted(Path(workdir).glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} left no .deb in {workdir}")
    target = Path(workdir) / package
    res = _run(["dpkg-deb", "-x", str(debs[-1]), str(target)], workdir)
    if res.returncode != 0:
        raise RuntimeError(f"dpkg-deb -x {debs[-1].name} failed:\n{res.stderr.strip()}")
    return target
