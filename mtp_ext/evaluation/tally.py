"""Running sums of per-position metrics, turned into the harness's records at the end."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import torch

__all__ = ["Key", "Tally", "hits"]


@dataclasses.dataclass(frozen=True)
class Key:
    """What a metric measures: a method (with its ``k`` and ``layer`` where they apply) predicting
    the token ``offset`` positions after the last one it sees."""

    method: str
    offset: int
    k: int | None = None
    layer: int | str | None = None


def hits(top_ids: torch.Tensor, target: torch.Tensor, m: int) -> torch.Tensor:
    """``[P]`` float64: 1 where ``target[P]`` is among the first ``m`` columns of ``top_ids[P, >=m]``."""
    return (top_ids[:, :m] == target[:, None]).any(-1).double()


class Tally:
    """Sums and counts per ``(Key, metric)``, per text window and in all, plus the tokens the model
    evaluated per ``Key``. Set :attr:`window` to the index of the window being scored before its
    values are added (positions of one window are not independent: intervals resample windows,
    :mod:`mtp_ext.evaluation.intervals`)."""

    def __init__(self):
        self._sum: dict[tuple[Key, str], float] = defaultdict(float)
        self._count: dict[tuple[Key, str], int] = defaultdict(int)
        self._tokens: dict[Key, int] = defaultdict(int)
        self._per_window: dict[tuple[Key, str], dict[int, list[float]]] = defaultdict(dict)
        self.window = 0
        self._windows = 0  # windows seen: 1 + the largest index values were added under

    def add(self, key: Key, metric: str, values: torch.Tensor) -> None:
        """Adds per-position values ``[P]`` of ``metric`` (non-finite values are an error) to the
        current :attr:`window`."""
        values = values.detach().double().flatten().cpu()
        if values.numel() == 0:
            return
        if not bool(torch.isfinite(values).all()):
            raise FloatingPointError(f"non-finite {metric} for {key}")
        total, n = float(values.sum()), values.numel()
        self._sum[(key, metric)] += total
        self._count[(key, metric)] += n
        cell = self._per_window[(key, metric)].setdefault(int(self.window), [0.0, 0])
        cell[0] += total
        cell[1] += n
        self._windows = max(self._windows, int(self.window) + 1)

    def cost(self, key: Key, tokens: int) -> None:
        """Counts ``tokens`` more tokens evaluated by the model for ``key``."""
        self._tokens[key] += int(tokens)

    def records(self, **base) -> list[dict]:
        """One record per ``(Key, metric)``: ``base`` fields plus ``method, k, layer, offset,
        metric, value`` (the mean), ``positions``, ``model_tokens`` and ``windows`` (``[sum,
        count]`` per window index ``0..W-1``, the same ``W`` for every record, ``[0.0, 0]`` where
        a window had no position of that metric)."""
        out = []
        for (key, metric), total in sorted(self._sum.items(), key=lambda kv: _order(kv[0])):
            n = self._count[(key, metric)]
            per = self._per_window[(key, metric)]
            windows = [list(per.get(i, [0.0, 0])) for i in range(self._windows)]
            out.append(
                {
                    **base,
                    "method": key.method,
                    "k": key.k,
                    "layer": key.layer,
                    "offset": key.offset,
                    "metric": metric,
                    "value": total / n,
                    "positions": n,
                    "model_tokens": self._tokens.get(key, 0),
                    "windows": windows,
                }
            )
        return out


def _order(item: tuple[Key, str]):
    key, metric = item
    layer = key.layer if isinstance(key.layer, int) else -1 if key.layer is None else 10**6
    return (key.method, key.offset, key.k or 0, layer, metric)
