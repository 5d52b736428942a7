"""Progress output of the evaluation harness: one-line messages and tqdm bars (both on stderr,
both silent when ``progress`` is False)."""

from __future__ import annotations

import sys

__all__ = ["log", "bar"]


def log(progress: bool, msg: str) -> None:
    """Prints ``eval: msg`` to stderr when ``progress``."""
    if progress:
        print(f"eval: {msg}", file=sys.stderr, flush=True)


def bar(progress: bool, total: int, desc: str, unit: str = "sample"):
    """A tqdm bar of ``total`` steps, or None (no progress, or tqdm not installed)."""
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit)
