"""The head kinds: ``kind name -> "module:Class"`` inside :mod:`mtp_ext.heads`.

A new kind is one module defining a subclass of :class:`~mtp_ext.heads.base.MTPHeads` plus one
line here. The classes are imported only when a kind is used, so this table imports nothing (the
configuration validates names against it without importing the kinds).
"""

from __future__ import annotations

import importlib

__all__ = ["KINDS", "kind_class"]

_REGISTRY = {
    "resblock": "resblock:ResBlockHeads",
    "linear": "linear:LinearHeads",
    "conditioned": "conditioned:ConditionedHeads",
    "transformer": "transformer:TransformerHeads",
    "eagle": "eagle:EagleHeads",
}

KINDS = tuple(_REGISTRY)


def kind_class(kind: str) -> type:
    """The :class:`~mtp_ext.heads.base.MTPHeads` subclass of ``kind``."""
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    module, name = _REGISTRY[kind].split(":")
    return getattr(importlib.import_module(f".{module}", __package__), name)
