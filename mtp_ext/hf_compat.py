"""The few places where transformers' API changed between the versions mtp_ext supports (5.17 to
the current release), behind one small helper each, so no version checks spread through the code.

* The key/value cache argument of ``forward`` is ``cache=`` in current releases and
  ``past_key_values=`` before (still accepted, with a deprecation warning, up to 5.40).
* ``DynamicCache.crop`` takes a maximum length in older releases and only a negative count of tokens
  to drop in current ones; a negative count works in both.
"""

from __future__ import annotations

import functools
import inspect

import torch

__all__ = ["cache_kwarg", "crop_cache"]


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` with the name this model's ``forward`` uses for its key/value cache."""
    return {_cache_argument(type(model)): cache}


def crop_cache(cache, length: int) -> None:
    """Drops cached tokens beyond the first ``length`` (a no-op when there are not more)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)
