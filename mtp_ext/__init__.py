"""mtp_ext: C++/CUDA PyTorch ops for multi-token prediction (MTP) decoding.

Importing the package registers the ``torch.ops.mtp_ext`` ops (CPU kernels always, CUDA kernels when
the extension was built with them). The typed wrappers are in :mod:`mtp_ext.ops`; the plain-PyTorch
definitions in :mod:`mtp_ext.reference`.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import ops, reference
from .cpu_linear import FastCPU, SmallBatchLinear, fast_cpu
from .ops import (
    compact_kv,
    fused_mtp_heads,
    marginalize,
    small_batch_linear,
    softmax_topk,
    topk_marginalize,
    tree_attention_mask,
    verify_tree,
    verify_tree_from_hidden,
)

__version__ = "0.1.0"

# Lazy imports (transformers-facing modules load only when used): name -> (module, attribute).
_LAZY = {
    "heads": ("heads", None),
    "MTPHeads": ("heads", "MTPHeads"),
    "MTPHeadsConfig": ("heads", "MTPHeadsConfig"),
    "trees": ("trees", None),
    "generate": ("decoding", "generate"),
    "MTPModel": ("decoding", "MTPModel"),
    "load_heads": ("heads", "load_heads"),
    "evaluation": ("evaluation", None),
    "evaluate": ("evaluation", "evaluate"),
}


def __getattr__(name: str):
    """Lazy imports: ``mtp_ext.heads``, ``mtp_ext.MTPHeads``, ``mtp_ext.generate``, ... ."""
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(f".{module_name}", __name__)
        return module if attr is None else getattr(module, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ops",
    "reference",
    "softmax_topk",
    "marginalize",
    "topk_marginalize",
    "fused_mtp_heads",
    "verify_tree",
    "tree_attention_mask",
    "compact_kv",
    "verify_tree_from_hidden",
    "small_batch_linear",
    "fast_cpu",
    "FastCPU",
    "SmallBatchLinear",
    "heads",
    "MTPHeads",
    "MTPHeadsConfig",
    "trees",
    "generate",
    "MTPModel",
    "load_heads",
    "evaluation",
    "evaluate",
    "__version__",
]
