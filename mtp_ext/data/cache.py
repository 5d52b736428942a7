"""The folder where converted models, prepared texts and tuning profiles are kept, and how its
entries are written, so that processes sharing it never see half-written entries and never fail
on one another's:

- an entry is written under a unique temporary name beside it (:func:`temp_dir`,
  :func:`temp_file`) and published in one rename (:func:`publish`, or :func:`write_file` for a
  file); a folder that another process published meanwhile counts as success;
- an entry is removed by renaming it aside first (:func:`discard`), so that no reader sees it half
  deleted;
- temporary entries left by crashed runs are removed once nothing in them changed for a while
  (:func:`remove_stale_temps`);
- a cache that cannot be written is never an error: the caller keeps what it made for the
  process and says so once (:func:`warn_once`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from pathlib import Path

__all__ = [
    "cache_dir", "discard", "publish", "remove_stale_temps", "temp_dir", "temp_file", "warn_once",
    "write_file",
]

TEMP_SUFFIX = ".tmp"
# A temporary entry in which nothing changed for this long belongs to a run that ended.
STALE_SECONDS = 3600.0

_WARNED: set[str] = set()


def cache_dir() -> Path:
    """The cache folder: ``$MTP_EXT_CACHE``, or ``~/.cache/mtp_ext`` when it is not set."""
    root = os.environ.get("MTP_EXT_CACHE") or os.path.join(Path.home(), ".cache", "mtp_ext")
    return Path(root)


def _temp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _create_unique(dest: Path, create) -> Path:
    """Calls ``create(path)`` on unique temporary names beside ``dest`` (its parents created)
    until one does not exist yet; returns that path."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = _temp_name(dest)
        try:
            create(path)
            return path
        except FileExistsError:
            continue


def temp_dir(dest: Path) -> Path:
    """A new empty folder with a unique name beside ``dest`` (created with its parents), to be
    filled and then published with :func:`publish`. Raises OSError where nothing can be written."""
    # Path.mkdir, unlike tempfile's, gives the permissions the umask gives, as dest's.
    return _create_unique(dest, Path.mkdir)


def temp_file(dest: Path) -> Path:
    """A new empty file with a unique name beside ``dest``, as :func:`temp_dir`."""
    return _create_unique(dest, lambda path: open(path, "xb").close())


def write_file(dest: Path, write) -> None:
    """Writes the file ``dest`` as one step: ``write(path)`` fills a unique temporary file beside
    it (:func:`temp_file`), which then replaces ``dest`` in one rename; the temporary never
    outlives the call. Raises OSError where nothing can be written."""
    tmp = temp_file(dest)
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: Path, dest: Path) -> bool:
    """Renames ``tmp`` to ``dest`` in one step. Returns False, having removed ``tmp``, where a
    folder ``dest`` appeared meanwhile (another process published the same entry first); a file
    ``dest`` is replaced."""
    try:
        os.replace(tmp, dest)
        return True
    except OSError:
        if not tmp.is_dir() or not dest.is_dir():
            raise
        discard(tmp)
        return False


def discard(path: Path) -> None:
    """Removes a file or folder: renamed aside to a temporary name first, so that readers never
    see it half deleted and a stale-temp sweep finishes the job if this process dies meanwhile."""
    aside = _temp_name(path)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # removed by another process
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def _newest_change(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
                except OSError:
                    pass
    return newest


def remove_stale_temps(folder: Path, max_age: float = STALE_SECONDS) -> None:
    """Removes the temporary entries (names ending in ``.tmp``) of ``folder`` in which nothing
    changed for ``max_age`` seconds; never raises."""
    try:
        entries = [p for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    except OSError:
        return
    now = time.time()
    for path in entries:
        try:
            if now - _newest_change(path) > max_age:
                discard(path)
        except OSError:
            pass


def warn_once(key: str, message: str) -> None:
    """Prints ``message`` on stderr the first time this process warns about ``key``."""
    if key not in _WARNED:
        _WARNED.add(key)
        print(message, file=sys.stderr, flush=True)
