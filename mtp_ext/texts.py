"""Compatibility names: the texts live in :mod:`mtp_ext.data.texts` and its reader modules."""

from .data.alignment import align_verses
from .data.austen import r_unserialize, read_rdb
from .data.bible import strip_osis
from .data.texts import SPLITS, TEXTS, load_text, prepare_texts, text_path

__all__ = [
    "TEXTS",
    "SPLITS",
    "load_text",
    "prepare_texts",
    "text_path",
    "strip_osis",
    "align_verses",
    "read_rdb",
    "r_unserialize",
]
