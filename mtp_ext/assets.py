"""Compatibility names: the offline models live in :mod:`mtp_ext.data.assets`."""

from .data.assets import MODELS, ModelAsset, load_model, model_file
from .data.cache import cache_dir

__all__ = ["MODELS", "ModelAsset", "cache_dir", "load_model", "model_file"]
