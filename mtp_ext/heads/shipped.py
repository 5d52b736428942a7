"""Heads trained by the project and shipped inside the package (``mtp_ext.load_heads``).

Each entry is a folder under ``mtp_ext/shipped_heads`` written by ``MTPHeads.save_pretrained``;
``README.md`` gives the command that trained it and its measured accuracy. A model may ship
several variants (head kinds); :data:`SHIPPED_HEADS` names the default one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import MTPHeads

__all__ = ["SHIPPED_HEADS", "SHIPPED_VARIANTS", "load_heads", "shipped_heads_dir"]

# model name -> {variant: folder under mtp_ext/shipped_heads}
SHIPPED_VARIANTS = {
    "smollm2-135m": {
        # conditioned heads trained on the backbone's chat answers (and some continuation text)
        "conditioned-chat": "smollm2-135m-chat",
        # conditioned heads trained on continuation text and self-generated text
        "conditioned": "smollm2-135m",
        # an EAGLE-3 drafter trained on the chat answers (exports to vLLM / SGLang)
        "eagle3": "smollm2-135m-eagle3",
    },
}
# model name -> the variant load_heads returns by default
SHIPPED_HEADS = {"smollm2-135m": "conditioned-chat"}


def shipped_heads_dir(name: str, variant: str | None = None) -> Path:
    """The folder of the heads shipped for the known model ``name``: its default variant, or
    ``variant`` (a key of ``SHIPPED_VARIANTS[name]``)."""
    if name not in SHIPPED_HEADS:
        raise ValueError(f"no heads ship for {name!r}; shipped: {sorted(SHIPPED_HEADS)}")
    variants = SHIPPED_VARIANTS[name]
    variant = SHIPPED_HEADS[name] if variant is None else variant
    if variant not in variants:
        raise ValueError(f"no {variant!r} heads ship for {name!r}; variants: {sorted(variants)}")
    folder = Path(__file__).parent.parent / "shipped_heads" / variants[variant]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"the shipped heads for {name!r} are missing from {folder}")
    return folder


def load_heads(name: str, model=None, dtype: torch.dtype | None = None,
               variant: str | None = None) -> MTPHeads:
    """The heads shipped for the known model ``name`` (``"smollm2-135m"``), bound to ``model``.

    Args:
        name: a key of :data:`SHIPPED_HEADS`.
        model: the backbone (a transformers causal LM); loaded with
            :func:`mtp_ext.assets.load_model` when None.
        dtype: the heads' parameter dtype (default: the backbone's output layer's).
        variant: which of the model's shipped heads (``SHIPPED_VARIANTS[name]``, e.g.
            ``"conditioned-chat"``, ``"conditioned"`` or ``"eagle3"``); default
            ``SHIPPED_HEADS[name]``.
    Returns:
        :class:`MTPHeads` sharing the backbone's output layer, final norm and embeddings.
    """
    folder = shipped_heads_dir(name, variant)
    if model is None:
        from ..data.assets import load_model

        model, _ = load_model(name)
    if dtype is None:
        dtype = model.get_output_embeddings().weight.dtype
    return MTPHeads.from_pretrained(folder, model, dtype=dtype).eval()
