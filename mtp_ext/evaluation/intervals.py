"""95% intervals from a bootstrap over text windows, and verdicts from a stated rule.

Scored positions are not independent: they come from a few windows of text (16 windows of 128
tokens per dataset in the full study), and neighbouring positions of one window move together.
So the unit resampled is the window. Each record of :class:`~mtp_ext.evaluation.tally.Tally`
keeps its per-window ``[sum, count]`` (``windows``); a metric's value is ``sum of sums / sum of
counts``, and its interval is the percentile interval of that ratio over ``n_boot`` resamples of
the windows with replacement.

A difference between two methods scored on the same windows (a head at layer 27 against one at
layer 30, joint against frozen) is resampled *paired*: one draw of window indices serves both,
so what the windows share cancels. Where the two sides were scored on different windows, or were
trained with several seeds, the sides are resampled independently (:func:`difference_interval`).

:func:`verdict` applies the rule the study states: a claim is **confirmed** when the 95% interval
of the difference excludes zero in the claimed direction on at least ``need`` datasets (3 of 4 by
default), **contradicted** when it excludes zero in the other direction on at least ``need``, and
**not reproduced** otherwise.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["LEVEL", "N_BOOT", "interval", "difference_interval", "verdict", "with_intervals",
           "VERDICTS"]

LEVEL = 0.95
N_BOOT = 2000
VERDICTS = ("confirmed", "contradicted", "not reproduced")


def _windows(windows) -> torch.Tensor:
    """``[W, 2]`` float64 ``(sum, count)`` rows with a positive count."""
    w = torch.as_tensor(windows, dtype=torch.float64).reshape(-1, 2)
    if bool((w[:, 1] < 0).any()):
        raise ValueError("window counts must be >= 0")
    return w[w[:, 1] > 0]


def _ratios(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per resample (rows of ``idx [n_boot, W]``), sum of sums over sum of counts."""
    picked = w[idx]  # [n_boot, W, 2]
    return picked[..., 0].sum(1) / picked[..., 1].sum(1)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    lo = (1.0 - level) / 2
    q = torch.quantile(values, torch.tensor([lo, 1.0 - lo], dtype=values.dtype))
    return float(q[0]), float(q[1])


def interval(windows: Sequence[Sequence[float]], n_boot: int = N_BOOT, level: float = LEVEL,
             seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of ``sum(sums) / sum(counts)`` over windows.

    Args:
        windows: ``[[sum, count], ...]`` per window (windows with count 0 are dropped).
        n_boot: resamples; level: the interval's coverage; seed: the resampling's seed.
    Returns:
        ``(lo, hi)``; ``(value, value)`` with one window (nothing to resample); raises
        ValueError without any window.
    """
    w = _windows(windows)
    if w.shape[0] == 0:
        raise ValueError("no window with a scored position")
    if w.shape[0] == 1:
        v = float(w[0, 0] / w[0, 1])
        return v, v
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, w.shape[0], (n_boot, w.shape[0]), generator=g)
    return _percentiles(_ratios(w, idx), level)


def difference_interval(a: Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]],
                        b: Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]],
                        paired: bool = True, n_boot: int = N_BOOT, level: float = LEVEL,
                        seed: int = 0) -> tuple[float, float, float]:
    """``(difference, lo, hi)`` of ``value(a) - value(b)`` with its bootstrap interval.

    Args:
        a, b: per-window ``[[sum, count], ...]`` of each side, or a list of such (one per seed:
            the seeds are resampled too, then the windows within each drawn seed).
        paired: the two sides were scored on the same windows in the same order (one draw of
            window indices serves both); with several seeds, pairing holds within a seed index.
    """
    sa = _seeds(a)
    sb = _seeds(b)
    value = _pooled(sa) - _pooled(sb)
    g = torch.Generator().manual_seed(seed)
    if paired:
        if len(sa) != len(sb) or any(x.shape != y.shape for x, y in zip(sa, sb)):
            raise ValueError("paired sides need the same seeds and windows")
        diffs = _resample_pair(sa, sb, n_boot, g)
    else:
        diffs = _resample(sa, n_boot, g) - _resample(sb, n_boot, g)
    lo, hi = _percentiles(diffs, level)
    return value, lo, hi


def _seeds(side) -> list[torch.Tensor]:
    t = torch.as_tensor(side, dtype=torch.float64)
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[-1] != 2:
        raise ValueError("expected [[sum, count], ...] per window, or a list of them per seed")
    return [s for s in t]


def _pooled(seeds: list[torch.Tensor]) -> float:
    """The mean over seeds of each seed's ratio."""
    return sum(float(s[:, 0].sum() / s[:, 1].sum()) for s in seeds) / len(seeds)


def _draw(seeds: list[torch.Tensor], n_boot: int, g: torch.Generator):
    """One bootstrap draw: ``(seed indices [n_boot, S, 1], window indices [n_boot, S, W])``."""
    S, W = len(seeds), seeds[0].shape[0]
    pick_s = torch.randint(0, S, (n_boot, S), generator=g)
    pick_w = torch.randint(0, W, (n_boot, S, W), generator=g)
    return pick_s[..., None], pick_w


def _drawn_ratios(seeds: list[torch.Tensor], draw) -> torch.Tensor:
    """Per resample, the mean over drawn seeds of sum of sums over sum of counts."""
    picked = torch.stack(seeds)[draw]  # [n_boot, S, W, 2]
    return (picked[..., 0].sum(-1) / picked[..., 1].sum(-1)).mean(-1)


def _resample(seeds: list[torch.Tensor], n_boot: int, g: torch.Generator) -> torch.Tensor:
    return _drawn_ratios(seeds, _draw(seeds, n_boot, g))


def _resample_pair(sa, sb, n_boot: int, g: torch.Generator) -> torch.Tensor:
    draw = _draw(sa, n_boot, g)  # one draw serves both sides
    return _drawn_ratios(sa, draw) - _drawn_ratios(sb, draw)


def verdict(intervals: Mapping[str, tuple[float, float]], direction: int = 1,
            need: int = 3) -> str:
    """The stated rule over datasets: ``intervals[dataset] = (lo, hi)`` of the claimed
    difference; ``direction`` +1 when the claim says it is positive, -1 negative. Returns
    ``"confirmed"`` (the interval excludes zero in the claimed direction on at least ``need``
    datasets), ``"contradicted"`` (excludes it the other way on at least ``need``) or
    ``"not reproduced"``."""
    if direction not in (1, -1):
        raise ValueError("direction must be +1 or -1")
    if need < 1:
        raise ValueError("need must be >= 1")
    lows = [direction * (lo if direction > 0 else hi) for lo, hi in intervals.values()]
    highs = [direction * (hi if direction > 0 else lo) for lo, hi in intervals.values()]
    if sum(v > 0 for v in lows) >= need:
        return "confirmed"
    if sum(v < 0 for v in highs) >= need:
        return "contradicted"
    return "not reproduced"


def with_intervals(records: Sequence[dict], n_boot: int = N_BOOT, level: float = LEVEL,
                   seed: int = 0) -> list[dict]:
    """``records`` with ``lo`` and ``hi`` added wherever a record has ``windows`` (2 or more
    windows with positions); others unchanged."""
    out = []
    for r in records:
        w = r.get("windows")
        if w and sum(1 for _, c in w if c > 0) >= 2:
            lo, hi = interval(w, n_boot, level, seed)
            r = {**r, "lo": lo, "hi": hi}
        out.append(r)
    return out
