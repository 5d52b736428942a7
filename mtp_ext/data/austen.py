"""Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``: its R lazy-load
database read without R, the items (paragraphs or chapters) and the split by novel.

A lazy-load database is an index ``X.rdx`` (an R-serialized list: ``variables`` maps each object's
name to its offset and length in ``X.rdb``) and the records of ``X.rdb`` (a 4-byte big-endian
length, then the compressed R serialization). ``rdata`` reads the R serializations; the records
are cut out and decompressed here, as ``rdata`` reads R files but not this container.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

__all__ = ["AUSTEN_NOVELS", "austen_items", "r_unserialize", "read_rdb"]

AUSTEN_NOVELS = {  # R object name -> (title, split)
    "sensesensibility": ("Sense & Sensibility", "train"),
    "prideprejudice": ("Pride & Prejudice", "train"),
    "mansfieldpark": ("Mansfield Park", "train"),
    "emma": ("Emma", "train"),
    "northangerabbey": ("Northanger Abbey", "validation"),
    "persuasion": ("Persuasion", "test"),
}


def _plain(value):
    """``rdata``'s conversion as plain Python: arrays become lists (NA: None), dict keys str."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):  # a masked array's tolist() gives None for NA
        return value.tolist()
    return value


def r_unserialize(data: bytes):
    """One R-serialized object (XDR format, versions 2 and 3, gzip-compressed or not), read with
    ``rdata``: a vector becomes a list (NA: None), a named list a dict."""
    import rdata

    return _plain(rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds")))


def _rdb_record(rdb: bytes, offset: int, length: int) -> bytes:
    """The R serialization in one record of ``X.rdb``, decompressed (zlib, bzip2, xz or none)."""
    rec = rdb[offset : offset + length]
    (size,) = struct.unpack(">I", rec[:4])
    method = rec[4:5]
    if method == b"2":
        import bz2

        return bz2.decompress(rec[5:])[:size]
    if method == b"X":
        import lzma

        return lzma.decompress(rec[5:])[:size]
    if method == b"0":
        return rec[5 : 5 + size]
    return zlib.decompress(rec[4:])


def read_rdb(rdx_path: str | os.PathLike) -> dict:
    """Every variable of an R lazy-load database (``X.rdx`` index beside ``X.rdb``), read."""
    rdx_path = Path(rdx_path)
    raw = rdx_path.read_bytes()
    if raw[:2] != b"\x1f\x8b" and raw[:2] != b"X\n":
        raw = zlib.decompress(raw[4:]) if raw[4:6] in (b"x\x9c", b"x\x01", b"x\xda") else raw
    variables = r_unserialize(raw)["variables"]
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    return {name: r_unserialize(_rdb_record(rdb, int(pos[0]), int(pos[1])))
            for name, pos in variables.items()}


def austen_items(lines: list[str], unit: str) -> list[str]:
    """A novel's lines as items: ``"paragraph"`` (lines between blank lines, joined by spaces) or
    ``"chapter"`` (from one ``CHAPTER ...`` heading line to the next; the text before the first
    heading is its own item)."""
    lines = ["" if x is None else x for x in lines]
    if unit == "paragraph":
        out, cur = [], []
        for line in lines + [""]:
            if line.strip():
                cur.append(line.strip())
            elif cur:
                out.append(" ".join(cur))
                cur = []
        return out
    heading = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlc]+)\b", re.I)
    chapters, cur = [], []
    for line in lines:
        if heading.match(line) and cur:
            chapters.append(cur)
            cur = []
        cur.append(line)
    if cur:
        chapters.append(cur)
    out = []
    for ch in chapters:
        text = "\n".join(ch).strip()
        text = re.sub(r"\n{3,}", "\n\n", text)
        if text:
            out.append(text)
    return out
