"""English-Spanish verse pairs: the WEB (NRSVA numbering) and the RV1909 (KJV numbering) number a
few verses differently, so each chapter is aligned by a banded dynamic programme on verse lengths
(Gale-Church style)."""

from __future__ import annotations

import math

from .bible import versification

__all__ = ["align_verses", "build_en_es"]

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
    nt_books = [b for b, _ in versification("KJV")["nt"]]
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
