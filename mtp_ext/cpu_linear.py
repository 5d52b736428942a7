"""Route a model's ``nn.Linear`` layers through :func:`mtp_ext.ops.small_batch_linear` on CPU.

On a CPU the BLAS path for 2 to 64 rows costs far more than for one row (for SmolLM2-135M's output
layer, about twice as much), so verifying a tree of T draft tokens costs much more than one decode
step. ``fast_cpu`` swaps every ``nn.Linear`` of a model for a :class:`SmallBatchLinear` that shares
the same parameters and sends inputs of 2 to ``max_rows`` rows on CPU through the small-row kernel;
every other input (one row, long prompts, GPU tensors, anything that needs gradients) takes the
stock ``F.linear`` path. Nothing of the model's own code is edited, and leaving restores the
original modules::

    with mtp_ext.fast_cpu(model):
        out = model(input_ids)            # prefill: stock path; tree steps: small-row kernel

    handle = mtp_ext.fast_cpu(model)      # or keep it on until handle.restore()
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import ops

__all__ = ["SmallBatchLinear", "fast_cpu", "FastCPU"]

DEFAULT_MAX_ROWS = 64


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose forward uses the small-row kernel for 2..``max_rows`` rows on CPU.

    Shares ``weight`` and ``bias`` with the layer it was made from (no copy).
    """

    max_rows: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_rows: int = DEFAULT_MAX_ROWS) -> "SmallBatchLinear":
        """A wrapper of ``linear`` that shares its parameters, hooks and training flag."""
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)  # same parameter and hook dicts, not copies
        new.max_rows = max_rows
        return new

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether an input ``x[..., in_features]`` goes through the small-row kernel."""
        if x.device.type != "cpu" or self.weight.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        return 2 <= rows <= self.max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return F.linear(x, self.weight, self.bias)
        y = ops.small_batch_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class FastCPU:
    """Handle of a model patched by :func:`fast_cpu`; a context manager that restores it on exit."""

    def __init__(self, model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS):
        if max_rows < 2:
            raise ValueError(f"fast_cpu: max_rows must be >= 2, got {max_rows}")
        self.model = model
        self._swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, SmallBatchLinear.from_linear(child, max_rows))
                    self._swapped.append((parent, name, child))

    @property
    def num_swapped(self) -> int:
        """How many ``nn.Linear`` layers were swapped."""
        return len(self._swapped)

    def restore(self) -> None:
        """Puts the original ``nn.Linear`` modules back (idempotent)."""
        for parent, name, original in reversed(self._swapped):
            setattr(parent, name, original)
        self._swapped.clear()

    def __enter__(self) -> "FastCPU":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def fast_cpu(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> FastCPU:
    """Swaps every ``nn.Linear`` of ``model`` for a :class:`SmallBatchLinear` sharing its weights.

    Args:
        model: any module (for example a transformers causal LM).
        max_rows: the largest number of input rows sent to the small-row kernel.
    Returns:
        A :class:`FastCPU` handle; use it as a context manager or call ``restore()``.
    """
    return FastCPU(model, max_rows)
