"""Per-row buffers that grow along their second axis by doubling: decoding appends a few columns
per step (a drafter's key/value entries, one per cache slot) in place, at amortized constant
cost, instead of concatenating everything kept so far."""

from __future__ import annotations

import torch

__all__ = ["GrowingColumns"]


class GrowingColumns:
    """Tensors ``[B, cap, ...]`` (one per name, the same ``B``) of which the first ``length``
    columns are in use; :meth:`append` adds ``n`` columns to each, doubling the capacity when full.

    Args:
        min_capacity: the smallest capacity allocated (columns).
    """

    def __init__(self, min_capacity: int = 16):
        self._bufs: dict[str, torch.Tensor] | None = None
        self.length = 0
        self.min_capacity = int(min_capacity)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The columns in use of buffer ``name``, ``[B, length, ...]`` (a view)."""
        if self._bufs is None:
            raise KeyError(f"{name!r}: nothing appended yet")
        return self._bufs[name][:, : self.length]

    @property
    def empty(self) -> bool:
        return self._bufs is None

    @property
    def capacity(self) -> int:
        """Columns allocated (0 before the first :meth:`append`)."""
        return 0 if self._bufs is None else next(iter(self._bufs.values())).shape[1]

    def append(self, **columns: torch.Tensor) -> None:
        """Adds ``columns[name] [B, n, ...]`` to each buffer (the same names and ``n`` every
        call; the trailing shape and dtype of the first call). Raises ``ValueError`` on a mismatch."""
        ns = {t.shape[1] for t in columns.values()}
        if len(ns) != 1:
            raise ValueError(f"columns must all add the same count, got {sorted(ns)}")
        if self._bufs is not None and set(columns) != set(self._bufs):
            raise ValueError(f"expected buffers {sorted(self._bufs)}, got {sorted(columns)}")
        need = self.length + ns.pop()
        cap = self.capacity
        if need > cap:
            cap = max(need, self.min_capacity, 2 * cap)
            grown = {}
            for name, t in columns.items():
                g = t.new_zeros(t.shape[0], cap, *t.shape[2:])
                if self._bufs is not None:
                    g[:, : self.length] = self._bufs[name][:, : self.length]
                grown[name] = g
            self._bufs = grown
        for name, t in columns.items():
            self._bufs[name][:, self.length : need] = t
        self.length = need
