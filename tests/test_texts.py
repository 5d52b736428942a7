"""mtp_ext.data's texts: the readers on small synthetic data (fast), and the real texts (slow,
when prepared with ``mtp-ext assets prepare``)."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest
import rdata

from mtp_ext.data import texts
from mtp_ext.data.alignment import align_verses, build_en_es
from mtp_ext.data.austen import austen_items, r_unserialize, read_rdb
from mtp_ext.data.bible import read_module, strip_osis, versification
from mtp_ext.data.python_code import python_files, python_split
from mtp_ext.data.texts import load_text

# --- SWORD zText modules ----------------------------------------------------------------------


def _write_ztext(folder, testament, slots, block_of):
    """Write ``slots`` (one str per verse-key slot) as a zText testament in blocks ``block_of``."""
    blocks: dict[int, bytearray] = {}
    bzv = bytearray()
    for i, text in enumerate(slots):
        raw = text.encode("utf-8")
        if not raw:
            bzv += struct.pack("<IIH", 0, 0, 0)
            continue
        buf = blocks.setdefault(block_of[i], bytearray())
        bzv += struct.pack("<IIH", block_of[i], len(buf), len(raw))
        buf += raw
    bzs, bzz = bytearray(), bytearray()
    for b in range(max(blocks) + 1):
        comp = zlib.compress(bytes(blocks.get(b, b"")))
        bzs += struct.pack("<III", len(bzz), len(comp), len(blocks.get(b, b"")))
        bzz += comp
    (folder / f"{testament}.bzs").write_bytes(bytes(bzs))
    (folder / f"{testament}.bzv").write_bytes(bytes(bzv))
    (folder / f"{testament}.bzz").write_bytes(bytes(bzz))


def _write_library(root, name, versification_name, slots, block_of):
    """A SWORD library folder holding one zText module (Old Testament only) and its ``mods.d``
    configuration."""
    folder = root / "modules" / "texts" / "ztext" / name.lower()
    folder.mkdir(parents=True)
    _write_ztext(folder, "ot", slots, block_of)
    (root / "mods.d").mkdir()
    (root / "mods.d" / f"{name.lower()}.conf").write_text(
        f"[{name}]\nDataPath=./modules/texts/ztext/{name.lower()}/\nModDrv=zText\n"
        f"SourceType=OSIS\nEncoding=UTF-8\nVersification={versification_name}\n"
    )


def test_ztext_module_by_book_and_chapter(tmp_path):
    books = versification("KJV")["ot"]
    slots, block_of, expect = ["", "<milestone/>"], [0, 0], {}
    for bi, (book, counts) in enumerate(books):
        slots.append(f'<div osisID="{book}" type="book"/>')  # book intro
        block_of.append(bi)
        for c, n in enumerate(counts, start=1):
            slots.append(f'<chapter n="{c}"/>')  # chapter intro
            block_of.append(bi)
            for v in range(1, n + 1):
                text = f"{book} {c}:{v} café" if (book, c, v) != ("Ruth", 1, 2) else ""
                expect[(book, c, v)] = text
                slots.append(f'<w lemma="x">{text}</w>' if text else "")
                block_of.append(bi)
    _write_library(tmp_path / "full", "Test", "KJV", slots, block_of)
    mapped = read_module(tmp_path / "full", "Test")
    assert [b for b, _ in mapped] == [b for b, _ in books]
    assert sum(len(v) for _, chapters in mapped for v in chapters) == len(expect)
    for book, chapters in mapped:
        for c, verses in enumerate(chapters, start=1):
            for v, text in enumerate(verses, start=1):
                assert strip_osis(text) == expect[(book, c, v)]
    _write_library(tmp_path / "short", "Test", "KJV", slots[:-1], block_of[:-1])
    with pytest.raises(ValueError, match="versification expects"):
        read_module(tmp_path / "short", "Test")


def test_versification_counts():
    kjv, nrsva = versification("KJV"), versification("NRSVA")
    slots = lambda bs: 2 + sum(1 + len(c) + sum(c) for _, c in bs)  # noqa: E731
    # the slot counts of the real modules: spaRV1909eb (KJV) and engWEB2015eb (NRSVA)
    assert (slots(kjv["ot"]), slots(kjv["nt"])) == (24115, 8246)
    assert (slots(nrsva["ot"]), slots(nrsva["nt"])) == (31027, 8248)
    assert sum(sum(c) for _, c in kjv["ot"] + kjv["nt"]) == 31102


def test_strip_osis():
    text = (
        '<div type="x-milestone" subType="x-preverse" sID="p1"/>'
        '<title type="section">Heading</title>'
        '<w lemma="strong:G1">For</w> <w lemma="strong:G2">God</w>,<note placement="foot">'
        '<reference>John 3:16</reference> a <hi>note</hi></note> so &amp; '
        '<q who="Jesus">loved</q>\n'
        '  the   <transChange type="added">world</transChange><w>today</w>.'
        ' <chapter eID="John.3"/> <div type="glossary"/> Glossary text'
    )
    assert strip_osis(text) == "For God, so & loved the world today."
    psalm = '<title canonical="true" type="psalm">A Psalm.</title> Text'
    assert strip_osis(psalm) == "A Psalm. Text"
    assert strip_osis("") == ""


# --- alignment ---------------------------------------------------------------------------------


def test_align_identical_and_merges():
    a = ["one two three", "four five six seven", "eight", "nine ten eleven twelve"]
    assert align_verses(a, list(a)) == [([i], [i]) for i in range(4)]
    # the second source verse is split in two on the target side
    b = ["one two three", "four five", "six seven", "eight", "nine ten eleven twelve"]
    groups = align_verses(a, b)
    assert groups == [([0], [0]), ([1], [1, 2]), ([2], [3]), ([3], [4])]
    # the other direction
    assert align_verses(b, a) == [([0], [0]), ([1, 2], [1]), ([3], [2]), ([4], [3])]


def test_align_empty_verse_and_extra():
    src = ["a" * 80, "b" * 60, "", "d" * 90]
    tgt = ["A" * 85, "B" * 65, "C" * 70, "D" * 95]
    assert align_verses(src, tgt) == [([0], [0]), ([1], [1]), ([2], [2]), ([3], [3])]
    # an extra short verse at the end of the source list joins its neighbour
    groups = align_verses(src[:2] + src[3:] + ["e" * 40], tgt[:2] + tgt[3:])
    assert groups == [([0], [0]), ([1], [1]), ([2, 3], [2])]
    assert align_verses([], ["x"]) == [([], [0])]


def test_build_en_es_drops_empty_sides():
    web = [["John", [["In the beginning was the Word.", "", "All things were made through him."]]]]
    rv = [["John", [["En el principio era el Verbo.", "Y aquel Verbo.", "Todas las cosas."]]]]
    pairs = build_en_es(web, rv)
    assert [p[:2] for p in pairs] == [["John", 1], ["John", 1]]
    assert pairs[1][2].startswith("All things") and pairs[1][3].startswith("Todas")


# --- R lazy-load databases ----------------------------------------------------------------------


def _i(v):
    return struct.pack(">i", v)


def _charsxp(s):
    raw = s.encode("utf-8")
    return _i(9 | (1 << 3) << 12) + _i(len(raw)) + raw


def _sym(name):
    return _i(1) + _charsxp(name)


def _names_attr(names, sym_names):
    # pairlist(names = c(...)): LISTSXP with a tag, then NIL
    strs = _i(16) + _i(len(names)) + b"".join(map(_charsxp, names))
    return _i(2 | 1 << 10) + sym_names + strs + _i(254)


def _serialize(body, version=3):
    head = b"X\n" + _i(version) + _i(0x040201) + _i(0x030500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + body


def test_r_unserialize_str_vector():
    body = _i(16) + _i(3) + _charsxp("Emma") + _i(9) + _i(-1) + _charsxp("Mr. Knightley’s")
    assert r_unserialize(_serialize(body)) == ["Emma", None, "Mr. Knightley’s"]
    v2 = gzip.compress(_serialize(body, version=2))
    assert r_unserialize(v2) == ["Emma", None, "Mr. Knightley’s"]
    ints = _i(13) + _i(2) + _i(7) + _i(-(2**31))
    assert r_unserialize(_serialize(ints)) == [7, None]
    reals = _i(14) + _i(1) + struct.pack(">d", 2.5)
    assert r_unserialize(_serialize(reals)) == [2.5]


def test_read_rdb_pair(tmp_path):
    lines = ["CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich,", "had lived nearly", ""]
    obj = _serialize(_i(16) + _i(len(lines)) + b"".join(map(_charsxp, lines)))
    record = struct.pack(">I", len(obj)) + zlib.compress(obj)
    rdb = b"junk" + record
    # list(variables = list(emma = c(offset, length)), references = list(), compressed = TRUE),
    # with the "names" symbol written once and then referenced (REF 255, index 1)
    variables = _i(19 | 1 << 9) + _i(1) + _i(13) + _i(2) + _i(4) + _i(len(record))
    variables += _names_attr(["emma"], _sym("names"))
    index = _i(19 | 1 << 9) + _i(3) + variables + _i(19) + _i(0) + _i(10) + _i(1) + _i(1)
    index += _names_attr(["variables", "references", "compressed"], _i(255 | 1 << 8))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_serialize(index)))
    data = read_rdb(tmp_path / "Rdata.rdx")
    assert data == {"emma": lines}
    # rdata reads R serializations but not the lazy-load database around them: a record of the
    # .rdb (a 4-byte length, then a zlib stream) is no format it knows, so read_rdb cuts the
    # records out and decompresses them itself.
    with pytest.raises(NotImplementedError, match="Unknown file format"):
        rdata.parser.parse_data(record, extension=".rds")
    assert austen_items(lines, "paragraph") == [
        "CHAPTER I",
        "Emma Woodhouse, handsome, clever, and rich, had lived nearly",
    ]
    assert austen_items(["Title", "", "CHAPTER I", "a", "", "b", "Chapter 2", "c"], "chapter") == [
        "Title",
        "CHAPTER I\na\n\nb",
        "Chapter 2\nc",
    ]


# --- splits and loading ------------------------------------------------------------------------


def test_python_split_rule():
    expect = {0: "test", 1: "validation"}.get(zlib.crc32(b"json") % 20, "train")
    assert python_split("json") == expect
    counts = {s: 0 for s in texts.SPLITS}
    for name in (f"mod{i}" for i in range(2000)):
        counts[python_split(name)] += 1
    assert counts["test"] > 50 and counts["validation"] > 50 and counts["train"] > 1500


def test_python_files_excludes_tests(tmp_path):
    for rel in ["os.py", "email/parser.py", "test/test_os.py", "idlelib/idle_test/t.py",
                "site-packages/foo/bar.py", "lib2to3/tests/x.py", "json/__init__.py", "README"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    got = [(m, p.relative_to(tmp_path).as_posix()) for m, p in python_files(tmp_path)]
    assert got == [("email", "email/parser.py"), ("json", "json/__init__.py"), ("os", "os.py")]


def test_load_text_missing_names_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mtp-ext assets prepare"):
        load_text("web", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_text("web", "dev")
    with pytest.raises(ValueError, match="unit"):
        load_text("web", "train", unit="paragraph")


def test_load_text_synthetic_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path))
    books = [["Gen", [["In the beginning.", "Light."]]], ["Ruth", [["In the days."]]],
             ["Joel", [["The word.", ""]]], ["Gal", [["Paul.", "Grace."]]]]
    texts._write_json(texts.text_path("web"), {"format": texts._FORMAT, "books": books})
    assert load_text("web", "train") == ["In the beginning. Light."]
    assert load_text("web", "test", unit="verse") == ["In the days.", "Paul.", "Grace."]
    assert load_text("web", "validation", unit="verse") == ["The word."]
    pairs = [["Gal", 1, "Paul.", "Pablo."], ["Gal", 1, "Grace.", "Gracia."]]
    pairs.append(["Matt", 1, "A.", "B."])
    texts._write_json(texts.text_path("en-es"), {"format": texts._FORMAT, "pairs": pairs})
    assert load_text("en-es", "test") == ["Paul.\tPablo.", "Grace.\tGracia."]
    assert load_text("en-es", "test", unit="chapter") == ["Paul. Grace.\tPablo. Gracia."]
    assert load_text("en-es", "validation") == []


# --- the real texts (slow) ---------------------------------------------------------------------


def _need(*names):
    for name in names:
        if not texts.text_path(name).is_file():
            pytest.skip(f"text {name!r} is not prepared ({texts.text_path(name)} missing); "
                        f"run: mtp-ext assets prepare")


def _sizes(name, **kw):
    return {s: load_text(name, s, **kw) for s in texts.SPLITS}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,low,high", [("web", 4.6e6, 5.1e6), ("rv1909", 3.5e6, 4.0e6), ("austen", 3.8e6, 4.2e6)]
)
def test_real_text_sizes_and_splits(name, low, high):
    _need(name)
    by_split = _sizes(name)
    total = sum(len(x) for items in by_split.values() for x in items)
    assert low < total < high, total
    assert all(by_split[s] for s in texts.SPLITS)
    # short items ("Yes.") repeat across novels; longer ones must not cross splits
    sets = [{x for x in by_split[s] if len(x) >= 200} for s in texts.SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert by_split == _sizes(name)  # deterministic


@pytest.mark.slow
def test_real_en_es_pairs():
    _need("en-es", "web", "rv1909")
    by_split = _sizes("en-es")
    total = sum(len(v) for v in by_split.values())
    assert 7900 <= total <= 8000, total
    assert all(len(v) > 200 for v in by_split.values())
    assert all(item.count("\t") == 1 for v in by_split.values() for item in v)
    john = [p for p in by_split["train"] if "For God so loved the world" in p]
    assert len(john) == 1 and "de tal manera amó Dios al mundo" in john[0].split("\t")[1]
    web = load_text("web", "train", unit="verse")
    assert any(v.startswith("For God so loved the world") for v in web)


@pytest.mark.slow
def test_real_python_files():
    by_split = _sizes("python")
    assert all(by_split[s] for s in texts.SPLITS)
    assert sum(len(x) for v in by_split.values() for x in v) > 5e6
    files = python_files()
    modules = {s: {m for m, _ in files if python_split(m) == s} for s in texts.SPLITS}
    assert not (modules["train"] & modules["test"])
    assert not (modules["validation"] & modules["test"])
    assert not (modules["train"] & modules["validation"])
    assert by_split == _sizes("python")
