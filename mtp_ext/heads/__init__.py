"""Multi-token prediction heads on a frozen backbone (``mtp_ext.heads``).

- :mod:`~mtp_ext.heads.base`: :class:`MTPHeads`, what every kind shares (the backbone's frozen
  output layer, final norm and embeddings; input selection and weighted hidden states; the draft
  vocabulary; saving and loading; the drafting entry points).
- one module per kind, each a subclass with its own parameters, ``forward``, drafting and decoding
  state: :mod:`~mtp_ext.heads.resblock`, :mod:`~mtp_ext.heads.linear`,
  :mod:`~mtp_ext.heads.conditioned`, :mod:`~mtp_ext.heads.transformer`; listed in
  :mod:`~mtp_ext.heads.registry` (a new kind is one module plus one line there).
- :mod:`~mtp_ext.heads.config`: :class:`MTPHeadsConfig`; :mod:`~mtp_ext.heads.shipped`: the heads
  that ship in the package (:func:`load_heads`).

``MTPHeads(config, lm_head, ...)``, ``MTPHeads.for_model(model, ...)`` and
``MTPHeads.from_pretrained(dir, model)`` build the subclass of ``config.kind``.
"""

from __future__ import annotations

from .base import MTPHeads
from .config import CONFIG_NAME, WEIGHTS_NAME, MTPHeadsConfig
from .registry import KINDS, kind_class
from .shipped import SHIPPED_HEADS, SHIPPED_VARIANTS, load_heads, shipped_heads_dir
from .transformer import TransformerDraftState

__all__ = ["MTPHeadsConfig", "MTPHeads", "TransformerDraftState", "KINDS", "kind_class",
           "CONFIG_NAME", "WEIGHTS_NAME", "SHIPPED_HEADS", "SHIPPED_VARIANTS", "load_heads",
           "shipped_heads_dir"]
