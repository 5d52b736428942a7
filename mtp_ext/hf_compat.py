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

__all__ = ["cache_kwarg", "crop_cache", "cache_layers", "last_logits_kwarg"]


@functools.lru_cache(maxsize=None)
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` with the name this model's ``forward`` uses for its key/value cache."""
    return {_cache_argument(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _keeps_logits(forward_owner: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_owner.forward).parameters


def last_logits_kwarg(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` where the model's ``forward`` takes it, else ``{}``: the output
    layer then runs on the last position only, as ``model.generate`` runs the prompt."""
    return {"logits_to_keep": 1} if _keeps_logits(type(model)) else {}


def crop_cache(cache, length: int) -> None:
    """Drops cached tokens beyond the first ``length`` (a no-op when there are not more)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


class _LegacyLayer:
    """``keys`` / ``values`` of one layer of a cache that stores them in ``key_cache`` /
    ``value_cache`` lists (older releases)."""

    def __init__(self, cache, i: int):
        self._cache, self._i = cache, i

    @property
    def keys(self) -> torch.Tensor:
        return self._cache.key_cache[self._i]

    @keys.setter
    def keys(self, value: torch.Tensor) -> None:
        self._cache.key_cache[self._i] = value

    @property
    def values(self) -> torch.Tensor:
        return self._cache.value_cache[self._i]

    @values.setter
    def values(self, value: torch.Tensor) -> None:
        self._cache.value_cache[self._i] = value


def cache_layers(cache) -> list:
    """The layers of a ``DynamicCache``, each with settable ``keys`` and ``values`` tensors
    ``[B, kv_heads, S, head_dim]``. Raises TypeError for caches whose layers drop tokens (sliding
    windows), whose slots cannot be moved in place."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            if getattr(layer, "is_sliding", False) or type(layer).__name__ not in (
                "DynamicLayer",
            ):
                raise TypeError(
                    f"cache layer {type(layer).__name__} is not supported (tree decoding moves "
                    "cache entries in place; sliding-window layers drop them)"
                )
        return list(layers)
    if hasattr(cache, "key_cache"):
        return [_LegacyLayer(cache, i) for i in range(len(cache.key_cache))]
    raise TypeError(f"unsupported cache type {type(cache).__name__}")
