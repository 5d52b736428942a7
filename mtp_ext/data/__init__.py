"""The project's data, all installed offline from package registries.

- :mod:`~mtp_ext.data.texts`: ``load_text(name, split)`` and ``prepare_texts()``: the texts, their
  items and fixed splits, cached as JSON; read by :mod:`~mtp_ext.data.bible` (the Bibles of the
  Debian SWORD packages), :mod:`~mtp_ext.data.alignment` (en-es verse pairs),
  :mod:`~mtp_ext.data.austen` (the R package of Jane Austen's novels) and
  :mod:`~mtp_ext.data.python_code` (the standard library); :mod:`~mtp_ext.data.debian` fetches
  the Debian packages.
- :mod:`~mtp_ext.data.selfgen`: the backbone's own continuations of prompts cut from the texts.
- :mod:`~mtp_ext.data.assets`: the pretrained models that ship in PyPI packages.
- :mod:`~mtp_ext.data.cache`: the cache folder.
"""

from __future__ import annotations

from .assets import MODELS, ModelAsset, load_model, model_file
from .cache import cache_dir
from .selfgen import self_generated
from .texts import SPLITS, TEXTS, load_text, prepare_texts, text_path

__all__ = [
    "MODELS",
    "ModelAsset",
    "SPLITS",
    "TEXTS",
    "cache_dir",
    "load_model",
    "load_text",
    "model_file",
    "prepare_texts",
    "self_generated",
    "text_path",
]
