"""Real texts that install offline from package registries, with fixed splits.

``load_text(name, split, unit=None) -> list[str]`` for

- ``"web"``: World English Bible (Debian ``sword-text-web``, SWORD zText module ``engWEB2015eb``,
  NRSVA versification, with the deuterocanonical books), 4.82 M characters of verse text.
- ``"rv1909"``: Reina-Valera 1909, Spanish (Debian ``sword-text-sparv``, module ``spaRV1909eb``, KJV
  versification), 3.81 M characters.
- ``"en-es"``: aligned New Testament verse pairs, each item ``"English\\tSpanish"``. The WEB (NRSVA)
  and the RV1909 (KJV) number a few verses differently, so each chapter is aligned by a banded
  dynamic programme on verse lengths (Gale-Church style: 1-1, 1-2, 2-1, 1-0 and 0-1 steps); merged
  verses are joined with a space and pairs with an empty side are dropped: 7,948 pairs.
- ``"austen"``: Jane Austen's six novels (Debian ``r-cran-janeaustenr``, read from its R lazy-load
  database without R), 4.00 M characters as paragraphs.
- ``"python"``: the ``.py`` files of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``), without ``site-packages``, ``dist-packages``,
  ``__pycache__`` and test folders (``test``, ``tests``, ``idle_test``, any ``test_*`` folder).
  Read directly each time (nothing to prepare).

Items (``unit``):

- web, rv1909: ``"chapter"`` (default; the chapter's verses joined by spaces) or ``"verse"``.
- en-es: ``"verse"`` (default; one aligned verse group per item) or ``"chapter"`` (the chapter's
  English and Spanish text, ``"English chapter\\tSpanish chapter"``).
- austen: ``"paragraph"`` (default; lines between blank lines, joined by spaces) or ``"chapter"``
  (from one ``CHAPTER ...`` heading line to the next; the text before the first heading is its own
  item).
- python: ``"file"`` (the only unit; one file's source per item, in sorted path order).

Splits (fixed, by book / novel / module, never by random lines):

- Bible (web, rv1909, en-es), by book (OSIS abbreviations):
  test = Ruth, Lam, Jonah, Gal, Eph, 1John, Jude;
  validation = Esth, Joel, Hab, Phil, Col, Jas, 2Pet;
  train = every other book (all the deuterocanonical books of the WEB are train).
  en-es has only New Testament books: test Gal, Eph, 1John, Jude; validation Phil, Col, Jas, 2Pet.
- austen, by novel: train = Sense and Sensibility, Pride and Prejudice, Mansfield Park, Emma;
  validation = Northanger Abbey; test = Persuasion.
- python, by top-level module name (the first path component under the stdlib folder, without
  ``.py`` for a top-level file): ``zlib.crc32(name.encode()) % 20`` is 0 -> test, 1 -> validation,
  otherwise train.

The Debian texts live in ``cache_dir() / "texts"`` (``$MTP_EXT_CACHE``, default
``~/.cache/mtp_ext``), one JSON file per text, written by ``prepare_texts()`` (CLI:
``mtp-ext assets prepare``), which runs ``apt-get download NAME`` and ``dpkg-deb -x FILE DIR`` in a
temporary folder, parses the package once and keeps only the JSON.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
import zlib
from pathlib import Path

from .assets import cache_dir

__all__ = [
    "TEXTS",
    "SPLITS",
    "load_text",
    "prepare_texts",
    "text_path",
    "read_ztext",
    "strip_osis",
    "align_verses",
    "read_rdb",
    "r_unserialize",
]

TEXTS = ("web", "rv1909", "en-es", "austen", "python")
SPLITS = ("train", "validation", "test")
PREPARE_COMMAND = "mtp-ext assets prepare"
_FORMAT = 1  # bump when the cached JSON layout changes

# ---------------------------------------------------------------------------------------------
# Versification: verses per chapter (KJV), as SWORD's verse-key layout uses it.

_KJV_OT = [
    ("Gen", "31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 "
            "35 43 55 32 20 31 29 43 36 30 23 23 57 38 34 34 28 34 31 22 33 26"),
    ("Exod", "22 25 22 31 23 30 25 32 35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18 40 37 21 "
             "43 46 38 18 35 23 35 35 38 29 31 43 38"),
    ("Lev", "17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33 44 23 55 46 34"),
    ("Num", "54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 "
            "40 16 54 42 56 29 34 13"),
    ("Deut", "46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30 25 22 19 19 26 "
             "68 29 20 30 52 29 12"),
    ("Josh", "18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18 28 51 9 45 34 16 33"),
    ("Judg", "36 23 31 24 31 40 25 35 57 18 40 15 25 20 20 31 13 31 30 48 25"),
    ("Ruth", "22 23 18 22"),
    ("1Sam", "28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15 23 29 22 44 25 12 "
             "25 11 31 13"),
    ("2Sam", "27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22 51 39 25"),
    ("1Kgs", "53 46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53"),
    ("2Kgs", "18 25 27 44 27 33 20 29 37 36 21 21 25 29 38 20 41 37 37 21 26 20 37 20 30"),
    ("1Chr", "54 55 24 43 26 81 40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21 "
             "30"),
    ("2Chr", "17 18 17 22 14 42 22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 "
             "36 27 21 33 25 33 27 23"),
    ("Ezra", "11 70 13 24 17 22 28 36 15 44"),
    ("Neh", "11 20 32 23 19 19 73 18 38 39 36 47 31"),
    ("Esth", "22 23 15 17 14 14 10 17 32 3"),
    ("Job", "22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30 17 25 6 14 23 28 "
            "25 31 40 22 33 37 16 33 24 41 30 24 34 17"),
    ("Ps", "6 12 8 8 12 10 17 9 20 18 7 8 6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 "
           "22 22 28 12 40 22 13 17 13 11 5 26 17 11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 "
           "11 10 13 20 7 35 36 5 24 20 28 23 10 12 20 72 13 19 16 8 18 12 13 17 7 18 52 17 16 "
           "15 5 23 11 13 12 9 9 5 8 28 22 35 45 48 43 13 31 7 10 10 9 8 18 19 2 29 176 7 8 9 4 "
           "8 5 6 5 6 8 8 3 18 3 3 21 26 9 8 24 13 10 7 12 15 21 10 20 14 9 6"),
    ("Prov", "33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33 28 24 29 30 31 29 35 34 28 28 27 "
             "28 27 33 31"),
    ("Eccl", "18 26 22 16 20 12 29 17 18 20 10 14"),
    ("Song", "17 17 11 16 16 13 13 14"),
    ("Isa", "31 22 26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 "
            "33 9 20 24 17 10 22 38 22 8 31 29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 "
            "14 21 22 11 12 19 12 25 24"),
    ("Jer", "19 37 25 31 31 30 34 22 26 25 23 17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17 "
            "32 24 40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46 64 34"),
    ("Lam", "22 22 66 22 22"),
    ("Ezek", "28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 "
             "21 26 18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35"),
    ("Dan", "21 49 30 37 31 28 28 27 27 21 45 13"),
    ("Hos", "11 23 5 19 15 11 16 14 17 15 12 14 16 9"),
    ("Joel", "20 32 21"),
    ("Amos", "15 16 15 13 27 14 17 14 15"),
    ("Obad", "21"),
    ("Jonah", "17 10 10 11"),
    ("Mic", "16 13 12 13 15 16 20"),
    ("Nah", "15 13 19"),
    ("Hab", "17 20 19"),
    ("Zeph", "18 15 20"),
    ("Hag", "15 23"),
    ("Zech", "21 13 10 14 11 15 14 23 17 12 17 14 9 21"),
    ("Mal", "14 17 18 6"),
]

# NRSVA appends these deuterocanonical books to the Old Testament.
_NRSVA_APOCRYPHA = [
    ("Tob", "22 14 17 21 22 18 16 21 6 13 18 22 17 15"),
    ("Jdt", "16 28 10 15 24 21 32 36 14 23 23 20 20 19 14 25"),
    ("EsthGr", "22 23 15 17 14 14 10 17 32 13 12 6 18 19 16 24"),
    ("Wis", "16 24 19 20 23 25 30 21 18 21 26 27 19 31 19 29 21 25 22"),
    ("Sir", "30 18 31 31 15 37 36 19 18 31 34 18 26 27 20 30 32 33 30 31 28 27 27 34 26 29 30 26 "
            "28 25 31 24 33 31 26 31 31 34 35 30 22 25 33 23 26 20 25 25 16 29 30"),
    ("Bar", "22 35 37 37 9 73"),
    ("PrAzar", "68"),
    ("Sus", "64"),
    ("Bel", "42"),
    ("1Macc", "64 70 60 61 68 63 50 32 73 89 74 53 53 49 41 24"),
    ("2Macc", "36 32 40 50 27 31 42 36 29 38 38 45 26 46 39"),
    ("1Esd", "58 30 24 63 73 34 15 96 55"),
    ("PrMan", "15"),
    ("AddPs", "7"),
    ("3Macc", "29 33 30 21 51 41 23"),
    ("2Esd", "40 48 36 52 56 59 140 63 47 59 46 51 58 48 63 78"),
    ("4Macc", "35 24 21 26 38 35 23 29 32 21 27 19 27 20 32 25 24 24"),
]

_KJV_NT = [
    ("Matt", "25 23 17 25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 "
             "20"),
    ("Mark", "45 28 35 41 43 56 37 38 50 52 33 44 37 72 47 20"),
    ("Luke", "80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37 43 48 47 38 71 56 53"),
    ("John", "51 25 36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25"),
    ("Acts", "26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28 41 38 40 30 35 27 27 32 44 "
             "31"),
    ("Rom", "32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27"),
    ("1Cor", "31 16 23 21 13 20 40 13 27 33 34 31 13 40 58 24"),
    ("2Cor", "24 17 18 18 21 18 16 24 15 18 33 21 14"),
    ("Gal", "24 21 29 31 26 18"),
    ("Eph", "23 22 21 32 33 24"),
    ("Phil", "30 30 21 23"),
    ("Col", "29 23 25 18"),
    ("1Thess", "10 20 13 18 28"),
    ("2Thess", "12 17 18"),
    ("1Tim", "20 15 16 16 25 21"),
    ("2Tim", "18 26 17 22"),
    ("Titus", "16 15 15"),
    ("Phlm", "25"),
    ("Heb", "14 18 19 16 14 20 28 13 28 39 40 29 25"),
    ("Jas", "27 26 18 17 20"),
    ("1Pet", "25 25 22 19 14"),
    ("2Pet", "21 22 18"),
    ("1John", "10 29 24 21 21"),
    ("2John", "13"),
    ("3John", "14"),
    ("Jude", "25"),
    ("Rev", "20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21"),
]


def _table(rows: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
    return [(book, [int(n) for n in counts.split()]) for book, counts in rows]


def versification(name: str) -> dict[str, list[tuple[str, list[int]]]]:
    """``{"ot": [(book, verses per chapter), ...], "nt": [...]}`` for ``"KJV"`` or ``"NRSVA"``."""
    ot, nt = _table(_KJV_OT), _table(_KJV_NT)
    if name == "KJV":
        return {"ot": ot, "nt": nt}
    if name == "NRSVA":  # differs from the KJV by the deuterocanon, 3 John 15 and Revelation 12:18
        nt = [(b, list(c)) for b, c in nt]
        for book, counts in nt:
            if book == "3John":
                counts[0] = 15
            elif book == "Rev":
                counts[11] = 18
        return {"ot": ot + _table(_NRSVA_APOCRYPHA), "nt": nt}
    raise ValueError(f"unknown versification {name!r}")


BIBLE_SPLITS = {
    "test": ("Ruth", "Lam", "Jonah", "Gal", "Eph", "1John", "Jude"),
    "validation": ("Esth", "Joel", "Hab", "Phil", "Col", "Jas", "2Pet"),
}
AUSTEN_NOVELS = {  # R object name -> (title, split)
    "sensesensibility": ("Sense & Sensibility", "train"),
    "prideprejudice": ("Pride & Prejudice", "train"),
    "mansfieldpark": ("Mansfield Park", "train"),
    "emma": ("Emma", "train"),
    "northangerabbey": ("Northanger Abbey", "validation"),
    "persuasion": ("Persuasion", "test"),
}


def bible_split(book: str) -> str:
    for split, books in BIBLE_SPLITS.items():
        if book in books:
            return split
    return "train"


def python_split(module: str) -> str:
    bucket = zlib.crc32(module.encode("utf-8")) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


# ---------------------------------------------------------------------------------------------
# SWORD zText modules


def read_ztext(folder: str | os.PathLike, testament: str) -> list[str]:
    """Raw entry of every verse-key slot of one testament (``"ot"`` or ``"nt"``) of a zText module.

    ``.bzs``: 12-byte little-endian (offset, size, uncompressed size) of zlib blocks in ``.bzz``;
    ``.bzv``: 10-byte (block u32, start u32, length u16) per slot. Slots without text give ``""``.
    """
    folder = Path(folder)
    bzs = (folder / f"{testament}.bzs").read_bytes()
    bzv = (folder / f"{testament}.bzv").read_bytes()
    bzz = (folder / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - 11, 12)]
    cache: dict[int, bytes] = {}
    out = []
    for i in range(0, len(bzv) - 9, 10):
        block, start, length = struct.unpack_from("<IIH", bzv, i)
        if length == 0 or block >= len(blocks):
            out.append("")
            continue
        if block not in cache:
            offset, size, _ = blocks[block]
            cache[block] = zlib.decompress(bzz[offset : offset + size])
        out.append(cache[block][start : start + length].decode("utf-8", "replace"))
    return out


def slots_to_verses(
    slots: list[str], books: list[tuple[str, list[int]]]
) -> list[tuple[str, list[list[str]]]]:
    """Map one testament's slots to ``[(book, [[verse raw text, ...] per chapter])]``.

    SWORD's layout: 1 module intro + 1 testament intro slot, then per book 1 intro slot, then per
    chapter 1 intro slot followed by its verses.
    """
    expected = 2 + sum(1 + len(c) + sum(c) for _, c in books)
    if len(slots) != expected:
        raise ValueError(f"{len(slots)} verse slots, but the versification expects {expected}")
    pos = 2
    out = []
    for book, counts in books:
        pos += 1  # book intro
        chapters = []
        for n in counts:
            pos += 1  # chapter intro
            chapters.append(slots[pos : pos + n])
            pos += n
        out.append((book, chapters))
    return out


_NOTE = re.compile(r"<note\b[^>]*?(?<!/)>.*?</note\s*>", re.S)
_TITLE = re.compile(r"<title\b([^>]*?)(?<!/)>(.*?)</title\s*>", re.S)
_TAG = re.compile(r"<[^>]*>")
# the end of a chapter or book: what follows in the same slot (the WEB's glossary after Revelation
# 22:21, say) is not verse text
_END = re.compile(r"<chapter\b[^>]*\beID=|<div\b[^>]*\beID=[^>]*\btype=\"book\"")
# RV1909 glues some added words to their neighbours ("enviada</transChange><w ...>por</w>")
_GLUED = re.compile(r"(</transChange>|</w>)(?=<(?:w|transChange)\b)")
_SPACE = re.compile(r"\s+")


def strip_osis(text: str) -> str:
    """Plain text of an OSIS verse: cut at a chapter or book end marker, notes and non-canonical
    titles dropped, other tags removed, entities decoded, whitespace normalized."""
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    text = _NOTE.sub(" ", text)
    text = _GLUED.sub(r"\1 ", text)
    text = _TITLE.sub(lambda m: m.group(2) if 'canonical="true"' in m.group(1) else " ", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _SPACE.sub(" ", text).strip()
    # OSIS puts a space between a word element and its punctuation only where the text had one,
    # but tag removal can leave " ," when a note sat between them.
    return re.sub(r" ([,.;:!?])", r"\1", text)


def parse_bible_module(folder: str | os.PathLike, versification_name: str) -> list[list]:
    """``[[book, [[verse text, ...] per chapter]], ...]`` over both testaments, markup stripped."""
    v11n = versification(versification_name)
    out = []
    for testament in ("ot", "nt"):
        slots = read_ztext(folder, testament)
        for book, chapters in slots_to_verses(slots, v11n[testament]):
            out.append([book, [[strip_osis(v) for v in ch] for ch in chapters]])
    return out


# ---------------------------------------------------------------------------------------------
# Verse alignment

_LOG_PRIOR = {(1, 1): 0.04, (1, 0): 4.6, (0, 1): 4.6, (2, 1): 4.6, (1, 2): 4.6}
_EMPTY_COST = 1.0  # a verse left empty in one version (an omitted or merged verse number)
_CAP = 6.0  # one step's length cost is capped: text-critical additions make outliers


def align_verses(
    src: list[str], tgt: list[str], band: int = 4, ratio: float | None = None
) -> list[tuple[list[int], list[int]]]:
    """Align two verse lists by a banded dynamic programme on their lengths.

    Returns groups ``([i, ...], [j, ...])`` of source and target indices in order, using 1-1, 2-1,
    1-2, 1-0 and 0-1 steps. A step costs ``-log(prior)`` (1-1: 0.04, every other step: 4.6) plus
    ``min(delta**2 / 2, 6)`` with ``delta = (lt - c*ls) / sqrt(6.8 * (c*ls + lt) / 2 + 1)`` on the
    characters of both sides (Gale and Church 1993), ``c`` the target/source length ratio of the
    whole lists. A 1-1, 1-0 or 0-1 step that involves an empty verse costs 1 instead, so verse
    numbers left empty in one version pair with nothing (and such pairs are dropped by the caller).
    Only cells within ``band`` verses (plus the difference in length of the lists) of the diagonal
    are visited.
    """
    n, m = len(src), len(tgt)
    if n == 0 or m == 0:
        return [([i], []) for i in range(n)] + [([], [j]) for j in range(m)]
    ls = [len(s) for s in src]
    lt = [len(t) for t in tgt]
    if ratio is None:
        ratio = (sum(lt) + 1) / (sum(ls) + 1)
    width = band + abs(n - m)
    inf = float("inf")

    def step_cost(di: int, dj: int, a: int, b: int, empty: bool) -> float:
        if empty and di + dj <= 2 and di <= 1 and dj <= 1:
            return _EMPTY_COST
        d = (b - ratio * a) / math.sqrt(6.8 * (a * ratio + b) / 2 + 1)
        return _LOG_PRIOR[(di, dj)] + min(d * d / 2, _CAP)

    cost: dict[tuple[int, int], float] = {(0, 0): 0.0}
    back: dict[tuple[int, int], tuple[int, int]] = {}
    for i in range(n + 1):
        for j in range(m + 1):
            if (i, j) == (0, 0) or abs(i * m - j * n) > width * max(n, m):
                continue
            best, arg = inf, None
            for di, dj in _LOG_PRIOR:
                pi, pj = i - di, j - dj
                if pi < 0 or pj < 0:
                    continue
                prev = cost.get((pi, pj), inf)
                if prev == inf:
                    continue
                a, b = sum(ls[pi:i]), sum(lt[pj:j])
                empty = (di == 1 and ls[pi] == 0) or (dj == 1 and lt[pj] == 0)
                c = prev + step_cost(di, dj, a, b, empty)
                if c < best:
                    best, arg = c, (di, dj)
            if arg is not None:
                cost[(i, j)] = best
                back[(i, j)] = arg
    if (n, m) not in back:
        raise ValueError("alignment band too narrow")
    groups = []
    i, j = n, m
    while (i, j) != (0, 0):
        di, dj = back[(i, j)]
        groups.append((list(range(i - di, i)), list(range(j - dj, j))))
        i, j = i - di, j - dj
    groups.reverse()
    return groups


def build_en_es(web: list[list], rv: list[list]) -> list[list]:
    """``[[book, chapter, english, spanish], ...]`` for the New Testament books present in both."""
    nt_books = [b for b, _ in _KJV_NT]
    web_by_book = dict((b, c) for b, c in web)
    rv_by_book = dict((b, c) for b, c in rv)
    pairs = []
    for book in nt_books:
        wc, rc = web_by_book.get(book), rv_by_book.get(book)
        if wc is None or rc is None:
            continue
        for ch, (en, es) in enumerate(zip(wc, rc), start=1):
            for gi, gj in align_verses(en, es):
                e = " ".join(en[i] for i in gi if en[i]).strip()
                s = " ".join(es[j] for j in gj if es[j]).strip()
                if e and s:
                    pairs.append([book, ch, e, s])
    return pairs


# ---------------------------------------------------------------------------------------------
# R serialization and lazy-load databases


class _RReader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.refs: list = []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def bytes(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        if len(b) != n:
            raise ValueError("truncated R serialization")
        self.pos += n
        return b

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        levels = flags >> 12
        if kind == 254:  # NILVALUE
            return None
        if kind in (242, 241, 253, 252, 251, 250):  # empty/base/global env, unbound, missing, ns
            return None
        if kind == 255:  # REF
            index = flags >> 8
            if index == 0:
                index = self.int()
            return self.refs[index - 1]
        if kind == 1:  # SYM
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 2:  # LIST (pairlist) -> list of (tag, value)
            out = []
            while True:
                attr = self.item() if has_attr else None
                del attr
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                flags = self.int()
                kind = flags & 0xFF
                if kind != 2:
                    self.pos -= 4
                    tail = self.item()
                    if tail is not None:
                        out.append((None, tail))
                    return out
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
        if kind == 9:  # CHAR
            n = self.int()
            if n == -1:
                return None
            raw = self.bytes(n)
            if levels & (1 << 2):  # LATIN1
                return raw.decode("latin-1")
            return raw.decode("utf-8", "replace")
        if kind in (16, 19, 20):  # STR, VEC, EXPR
            value = [self.item() for _ in range(self.length())]
        elif kind in (13, 10):  # INT, LGL
            n = self.length()
            value = list(struct.unpack(f">{n}i", self.bytes(4 * n)))
            value = [None if v == -(2**31) else v for v in value]
        elif kind == 14:  # REAL
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.bytes(8 * n)))
        else:
            raise ValueError(f"unsupported R type {kind} at byte {self.pos - 4}")
        if has_attr:
            attrs = self.item()
            if isinstance(attrs, list) and any(t == "names" for t, _ in attrs):
                names = dict(attrs)["names"]
                if isinstance(names, list) and len(names) == len(value):
                    return RNamed(zip(names, value))
        return value


class RNamed(dict):
    """An R vector with a ``names`` attribute."""


def r_unserialize(data: bytes):
    """Read one R-serialized object (XDR format, versions 2 and 3) from bytes (decompressed)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    reader = _RReader(data)
    reader.pos = 2
    version = reader.int()
    reader.int()  # writer R version
    reader.int()  # minimal reader R version
    if version == 3:
        reader.bytes(reader.int())  # native encoding name
    elif version != 2:
        raise ValueError(f"R serialization version {version} is not supported")
    return reader.item()


def _rdb_record(rdb: bytes, offset: int, length: int) -> bytes:
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
    index = r_unserialize(raw)
    variables = index["variables"]
    rdb = rdx_path.with_suffix(".rdb").read_bytes()
    return {name: r_unserialize(_rdb_record(rdb, int(pos[0]), int(pos[1])))
            for name, pos in variables.items()}


def austen_items(lines: list[str], unit: str) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Cache, preparation and loading

_DEBIAN = {  # text -> (Debian package, how to parse the unpacked package)
    "web": ("sword-text-web", "usr/share/sword/modules/texts/ztext/engWEB2015eb", "NRSVA"),
    "rv1909": ("sword-text-sparv", "usr/share/sword/modules/texts/ztext/spaRV1909eb", "KJV"),
    "austen": ("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx", None),
}


def text_path(name: str) -> Path:
    """The cached JSON file of a prepared text."""
    return cache_dir() / "texts" / f"{name}.json"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
    os.replace(tmp, path)


def _read_json(name: str):
    path = text_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"text {name!r} is not prepared ({path} is missing); prepare it with: {PREPARE_COMMAND}"
        )
    with open(path, encoding="utf-8") as f:
        obj = json.load(f)
    if obj.get("format") != _FORMAT:
        raise FileNotFoundError(
            f"text {name!r} in {path} has an old format; prepare it again with: {PREPARE_COMMAND}"
        )
    return obj


def _run(cmd: list[str], cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _fetch_deb(package: str, workdir: str, state: dict) -> Path:
    """``apt-get download`` (after one ``apt-get update`` if needed) and ``dpkg-deb -x``."""
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


def _prepare_debian(name: str, workdir: str, state: dict) -> dict:
    package, inner, v11n = _DEBIAN[name]
    root = _fetch_deb(package, workdir, state)
    if name == "austen":
        data = read_rdb(root / inner)
        novels = {}
        for key in AUSTEN_NOVELS:
            if key not in data:
                raise RuntimeError(f"{package}: novel {key!r} not found (have {sorted(data)})")
            novels[key] = data[key]
        return {"format": _FORMAT, "source": package, "novels": novels}
    return {"format": _FORMAT, "source": package, "books": parse_bible_module(root / inner, v11n)}


def prepare_texts(
    names: list[str] | None = None, force: bool = False, log=print
) -> dict[str, Path]:
    """Fetch and parse every Debian text that is not cached yet; build the en-es pairs.

    Returns ``{name: cached file}``. ``python`` needs nothing and is skipped.
    """
    names = list(names or ["web", "rv1909", "austen", "en-es"])
    state: dict = {}
    done = {}
    with tempfile.TemporaryDirectory(prefix="mtp_ext_texts_") as workdir:
        os.chmod(workdir, 0o755)  # lets apt's sandbox user read the folder
        todo = list(names)
        if "en-es" in todo:  # needs both Bibles first
            todo = [n for n in ("web", "rv1909") if n not in todo] + todo
            todo.remove("en-es")
            todo.append("en-es")
        for name in todo:
            path = text_path(name)
            if path.is_file() and not force:
                try:
                    with open(path, encoding="utf-8") as f:
                        ok = json.load(f).get("format") == _FORMAT
                except (OSError, ValueError):
                    ok = False
                if ok:
                    log(f"mtp_ext: text {name!r} already prepared ({path})")
                    done[name] = path
                    continue
            t0 = time.perf_counter()
            if name == "en-es":
                log("mtp_ext: aligning New Testament verses of the WEB and the RV1909 (en-es)")
                web, rv = _read_json("web")["books"], _read_json("rv1909")["books"]
                obj = {"format": _FORMAT, "source": "web+rv1909", "pairs": build_en_es(web, rv)}
            elif name in _DEBIAN:
                package = _DEBIAN[name][0]
                log(f"mtp_ext: fetching {package} (apt-get download, dpkg-deb -x) for {name!r}")
                obj = _prepare_debian(name, workdir, state)
            else:
                known = sorted(_DEBIAN) + ["en-es"]
                raise ValueError(f"nothing to prepare for {name!r}; known: {known}")
            _write_json(path, obj)
            log(f"mtp_ext: text {name!r} ready in {time.perf_counter() - t0:.1f} s -> {path}")
            done[name] = path
    return done


_TEST_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


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


def _units(name: str) -> tuple[str, ...]:
    return {
        "web": ("chapter", "verse"),
        "rv1909": ("chapter", "verse"),
        "en-es": ("verse", "chapter"),
        "austen": ("paragraph", "chapter"),
        "python": ("file",),
    }[name]


def load_text(name: str, split: str, unit: str | None = None) -> list[str]:
    """Items of one split of a text (see the module docstring for texts, units and splits)."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; known: {list(TEXTS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    units = _units(name)
    unit = unit or units[0]
    if unit not in units:
        raise ValueError(f"unit {unit!r} is not available for {name!r}; choose from {list(units)}")
    if name == "python":
        out = []
        for module, path in python_files():
            if python_split(module) == split:
                try:
                    out.append(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, OSError):
                    continue
        return out
    if name == "austen":
        novels = _read_json(name)["novels"]
        out = []
        for key, (_, novel_split) in AUSTEN_NOVELS.items():
            if novel_split == split:
                out.extend(austen_items(novels[key], unit))
        return out
    if name == "en-es":
        pairs = [p for p in _read_json(name)["pairs"] if bible_split(p[0]) == split]
        if unit == "verse":
            return [f"{en}\t{es}" for _, _, en, es in pairs]
        chapters: dict[tuple[str, int], tuple[list[str], list[str]]] = {}
        for book, ch, en, es in pairs:
            e, s = chapters.setdefault((book, ch), ([], []))
            e.append(en)
            s.append(es)
        return [" ".join(e) + "\t" + " ".join(s) for e, s in chapters.values()]
    out = []
    for book, chapters in _read_json(name)["books"]:
        if bible_split(book) != split:
            continue
        for verses in chapters:
            if unit == "verse":
                out.extend(v for v in verses if v)
            else:
                text = " ".join(v for v in verses if v)
                if text:
                    out.append(text)
    return out


if __name__ == "__main__":  # pragma: no cover
    prepare_texts()
    sys.exit(0)
