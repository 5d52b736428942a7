"""The two Bibles of the Debian SWORD packages: verse text by book and chapter, and the split by
book.

``sword-text-web`` (module ``engWEB2015eb``, NRSVA versification, with the deuterocanonical books)
and ``sword-text-sparv`` (``spaRV1909eb``, KJV versification) hold zText modules, read with
``pysword``: the module's configuration names its versification, which maps the verse-key slots to
books, chapters and verses. Verse text carries OSIS markup, which :func:`strip_osis` removes.
"""

from __future__ import annotations

import functools
import html
import os
import re
from pathlib import Path

__all__ = [
    "BIBLE_SPLITS",
    "bible_split",
    "versification",
    "read_module",
    "strip_osis",
    "parse_bible_module",
]

BIBLE_SPLITS = {
    "test": ("Ruth", "Lam", "Jonah", "Gal", "Eph", "1John", "Jude"),
    "validation": ("Esth", "Joel", "Hab", "Phil", "Col", "Jas", "2Pet"),
}


def bible_split(book: str) -> str:
    """The split of a book (OSIS abbreviation): test, validation, or train for every other."""
    for split, books in BIBLE_SPLITS.items():
        if book in books:
            return split
    return "train"


def versification(name: str) -> dict[str, list[tuple[str, list[int]]]]:
    """``{"ot": [(book, verses per chapter), ...], "nt": [...]}`` of a SWORD versification
    (``"KJV"``, ``"NRSVA"``, ...), books by OSIS abbreviation."""
    from pysword.canons import canons

    canon = canons.get(name.lower())
    if canon is None:
        raise ValueError(f"unknown versification {name!r}")
    return {
        testament: [(osis, list(counts)) for _, osis, _, counts in canon[testament]]
        for testament in ("ot", "nt")
    }


def read_module(sword_root: str | os.PathLike, module: str) -> list[list]:
    """``[[book, [[raw verse entry, ...] per chapter]], ...]`` over both testaments of a zText
    module in a SWORD library folder (the one holding ``mods.d``); verses without text give ``""``.

    Raises ValueError when the module's verse index holds another number of verse-key slots than
    its versification lays out (1 module and 1 testament intro, then per book 1 intro and per
    chapter 1 intro followed by its verses).
    """
    from pysword.bible import BlockType
    from pysword.modules import SwordModules

    library = SwordModules(os.fspath(sword_root))
    confs = library.parse_modules()
    if module not in confs:
        raise ValueError(f"no SWORD module {module!r} in {sword_root} (have {sorted(confs)})")
    conf = confs[module]
    if conf.get("moddrv", "").lower() != "ztext":
        raise ValueError(f"SWORD module {module!r} is not a zText module")
    bible = library.get_bible_from_module(module)
    # pysword decompresses a verse's whole block (a book) again for every verse: over a minute
    # per Bible on two cores, against a tenth of a second with each block decompressed once.
    bible._decompressed_text = functools.lru_cache(maxsize=None)(bible._decompressed_text)
    index_ext = BlockType.get_file_ext_first_letter(conf.get("blocktype", BlockType.BOOK)) + "zv"
    folder = Path(sword_root) / conf["datapath"]
    out = []
    for testament, books in bible.get_structure().get_books().items():
        slots = (folder / f"{testament}.{index_ext}").stat().st_size // 10
        expected = 2 + sum(book.size for book in books)
        if slots != expected:
            raise ValueError(f"{slots} verse slots, but the versification expects {expected}")
        for book in books:
            verses = iter(bible.get_iter(books=[book.osis_name], clean=False))
            chapters = [[next(verses) for _ in range(n)] for n in book.chapter_lengths]
            out.append([book.osis_name, chapters])
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


def parse_bible_module(sword_root: str | os.PathLike, module: str) -> list[list]:
    """``[[book, [[verse text, ...] per chapter]], ...]`` over both testaments, markup stripped."""
    return [
        [book, [[strip_osis(v) for v in chapter] for chapter in chapters]]
        for book, chapters in read_module(sword_root, module)
    ]
