"""Heads trained by the project and shipped inside the package (``mtp_ext.load_heads``).

Each entry is a folder under ``mtp_ext/shipped_heads`` written by ``MTPHeads.save_pretrained``;
``README.md`` gives the command that trained it and its measured accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import MTPHeads

__all__ = ["SHIPPED_HEADS", "load_heads", "shipped_heads_dir"]

SHIPPED_HEADS = {"smollm2-135m": "smollm2-135m"}


def shipped_heads_dir(name: str) -> Path:
    """The folder of the heads shipped for the known model ``name``."""
    if name not in SHIPPED_HEADS:
        raise ValueError(f"no heads ship for {name!r}; shipped: {sorted(SHIPPED_HEADS)}")
    folder = Path(__file__).parent.parent / "shipped_heads" / SHIPPED_HEADS[name]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the shipped heads for {name!r} are missing from {folder}")
    return folder


def load_heads(name: str, model=None, dtype: torch.dtype | None = None) -> MTPHeads:
    """The heads shipped for the known model ``name`` (``"smollm2-135m"``), bound to ``model``.

    Args:
        name: a key of :data:`SHIPPED_HEADS`.
        model: the backbone (a transformers causal LM); loaded with
            :func:`mtp_ext.assets.load_model` when None.
        dtype: the heads' parameter dtype (default: the backbone's output layer's).
    Returns:
        :class:`MTPHeads` sharing the backbone's output layer, final norm and embeddings.
    """
    folder = shipped_heads_dir(name)
    if model is None:
        from ..data.assets import load_model

        model, _ = load_model(name)
    if dtype is None:
        dtype = model.get_output_embeddings().weight.dtype
    return MTPHeads.from_pretrained(folder, model, dtype=dtype).eval()
