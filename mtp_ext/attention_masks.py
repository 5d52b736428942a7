"""Additive attention masks over a key/value cache whose slots carry a validity flag and a position
id (the decoding loop's cache, and the ``"transformer"`` heads' caches that mirror it)."""

from __future__ import annotations

import torch

__all__ = ["additive_mask", "sequence_mask"]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, q, k]`` bool -> ``[B, 1, q, k]`` additive mask (0 / ``finfo(dtype).min``)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def sequence_mask(slots, new_valid: torch.Tensor, new_pos: torch.Tensor,
                  dtype: torch.dtype, window: int | None):
    """The additive mask of ``n`` new positions per row appended after the cache ``slots``
    (anything with ``valid [B, S]`` bool, ``pos [B, S]`` int64 and ``length`` ``S``, e.g.
    :class:`mtp_ext.tree_step.SlotTable`; None: an empty cache): each attends to the valid cache
    slots and, causally, to the valid new positions. ``new_valid [B, n]`` bool, ``new_pos [B, n]``
    int64 (position ids). Returns ``[B, 1, n, S + n]``, or with a sliding ``window`` the dict
    ``{"full_attention": ..., "sliding_attention": ...}`` whose second mask also hides keys
    ``window`` or more positions behind the query."""
    n = new_valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=new_valid.device).tril_()
    allowed = causal[None] & new_valid[:, None, :]
    key_pos = new_pos
    if slots is not None:
        S = slots.length
        allowed = torch.cat([slots.valid[:, None, :].expand(-1, n, S), allowed], 2)
        key_pos = torch.cat([slots.pos, new_pos], 1)
    full = additive_mask(allowed, dtype)
    if window is None:
        return full
    near = (new_pos[:, :, None] - key_pos[:, None, :]) < window
    return {"full_attention": full, "sliding_attention": additive_mask(allowed & near, dtype)}
