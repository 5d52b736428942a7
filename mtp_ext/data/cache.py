"""The folder where converted models, prepared texts and tuning profiles are kept."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache folder: ``$MTP_EXT_CACHE``, or ``~/.cache/mtp_ext`` when it is not set."""
    root = os.environ.get("MTP_EXT_CACHE") or os.path.join(Path.home(), ".cache", "mtp_ext")
    return Path(root)
