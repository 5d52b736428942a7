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

Each text's reading lives in its own module: :mod:`mtp_ext.data.bible` (web, rv1909),
:mod:`mtp_ext.data.alignment` (en-es), :mod:`mtp_ext.data.austen` and
:mod:`mtp_ext.data.python_code`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .alignment import build_en_es
from .austen import AUSTEN_NOVELS, austen_items, read_rdb
from .bible import bible_split, parse_bible_module
from .cache import cache_dir, write_file
from .debian import fetch_deb
from .python_code import python_files, python_split

__all__ = ["TEXTS", "SPLITS", "load_text", "prepare_texts", "text_path"]

TEXTS = ("web", "rv1909", "en-es", "austen", "python")
SPLITS = ("train", "validation", "test")
PREPARE_COMMAND = "mtp-ext assets prepare"
_FORMAT = 1  # bump when the cached JSON layout changes

_DEBIAN = {  # text -> (Debian package, path inside it, SWORD module)
    "web": ("sword-text-web", "usr/share/sword", "engWEB2015eb"),
    "rv1909": ("sword-text-sparv", "usr/share/sword", "spaRV1909eb"),
    "austen": ("r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/Rdata.rdx", None),
}


def text_path(name: str) -> Path:
    """The cached JSON file of a prepared text."""
    return cache_dir() / "texts" / f"{name}.json"


def _write_json(path: Path, obj) -> None:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


def _prepare_debian(name: str, workdir: str, state: dict) -> dict:
    package, inner, module = _DEBIAN[name]
    root = fetch_deb(package, workdir, state)
    if name == "austen":
        data = read_rdb(root / inner)
        novels = {}
        for key in AUSTEN_NOVELS:
            if key not in data:
                raise RuntimeError(f"{package}: novel {key!r} not found (have {sorted(data)})")
            novels[key] = data[key]
        return {"format": _FORMAT, "source": package, "novels": novels}
    return {"format": _FORMAT, "source": package, "books": parse_bible_module(root / inner, module)}


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
