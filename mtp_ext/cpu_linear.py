"""Route a model's ``nn.Linear`` layers through :func:`mtp_ext.ops.small_batch_linear` on CPU
where that is faster than torch's own kernel.

On a CPU the BLAS path for 2 to 64 rows can cost far more than for one row (on an AMD EPYC, for
SmolLM2-135M's output layer, about twice as much), so verifying a tree of T draft tokens would cost
much more than one decode step. ``fast_cpu`` swaps every ``nn.Linear`` of a model for a
:class:`SmallBatchLinear` that shares the same parameters; each input on CPU (without gradients)
then goes through the small-row kernel ("ours") or ``F.linear`` ("torch") by its row count.
Nothing of the model's own code is edited, and leaving restores the original modules::

    with mtp_ext.fast_cpu(model):
        out = model(input_ids)            # each linear: the kernel measured faster at its rows

    handle = mtp_ext.fast_cpu(model)      # or keep it on until handle.restore()

How it chooses: :func:`mtp_ext.linear_choice.choice_for_model` times both kernels once per machine
(CPU model, ISA flags, torch version, threads) for each of the model's weight shapes and dtypes at
1..64 rows, with the weights streamed from memory as in a forward pass, and caches the table (about
6 to 7 s the first time for SmolLM2-135M at 2 threads, then read from the cache). Ours is used at a
row count only where it measured at least 3 % faster (the next measured row count up decides
between grid points); torch for every other count, above 64 rows (or ``max_rows``), on GPU, and
whenever gradients are needed. When ``fast_cpu`` swaps the layers each one gets a tuple
``use_ours_by_rows[0..max_rows]``, so a forward call costs one index; a layer whose table says torch
at every row count is not swapped at all, so it costs what it did. ``MTP_EXT_LINEAR_KERNEL=torch`` forces torch everywhere, ``MTP_EXT_LINEAR_KERNEL=ours`` the routing
of before the choice (ours for 2..``max_rows`` rows, torch for one row); a
:class:`~mtp_ext.linear_choice.LinearChoice` can also be passed in. A :class:`SmallBatchLinear`
made directly with :meth:`SmallBatchLinear.from_linear` and no table keeps that routing of before
too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import ops
from .linear_choice import LinearChoice, choice_for_model

__all__ = ["SmallBatchLinear", "fast_cpu", "FastCPU"]

DEFAULT_MAX_ROWS = 64


def _default_table(max_rows: int) -> tuple[bool, ...]:
    """Ours for 2..max_rows rows (the routing before measured choices)."""
    return tuple(2 <= r <= max_rows for r in range(max_rows + 1))


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose forward sends CPU inputs of ``rows`` rows through the small-row
    kernel where ``use_ours_by_rows[rows]`` is True (``rows <= max_rows``), through ``F.linear``
    otherwise.

    Shares ``weight`` and ``bias`` with the layer it was made from (no copy).
    """

    max_rows: int
    use_ours_by_rows: tuple[bool, ...]

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_rows: int = DEFAULT_MAX_ROWS,
                    use_ours_by_rows=None) -> "SmallBatchLinear":
        """A wrapper of ``linear`` that shares its parameters, hooks and training flag.

        ``use_ours_by_rows``: ``max_rows + 1`` bools, whether ``rows`` rows go through the
        small-row kernel (:meth:`~mtp_ext.linear_choice.LinearChoice.rows_table`); None: rows
        ``2..max_rows``.
        """
        table = _default_table(max_rows) if use_ours_by_rows is None else tuple(
            bool(b) for b in use_ours_by_rows)
        if len(table) != max_rows + 1:
            raise ValueError(f"use_ours_by_rows must hold max_rows + 1 = {max_rows + 1} entries, "
                             f"got {len(table)}")
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)  # same parameter and hook dicts, not copies
        new.max_rows = max_rows
        new.use_ours_by_rows = table
        return new

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether an input ``x[..., in_features]`` goes through the small-row kernel."""
        rows = x.numel() // max(x.shape[-1], 1)
        table = self.use_ours_by_rows
        if rows >= len(table) or not table[rows]:
            return False
        weight = self.weight
        if not (x.is_cpu and weight.is_cpu):
            return False
        return not ((x.requires_grad or weight.requires_grad) and torch.is_grad_enabled())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_kernel(x):
            return F.linear(x, self.weight, self.bias)
        y = ops.small_batch_linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class FastCPU:
    """Handle of a model patched by :func:`fast_cpu`; a context manager that restores it on exit."""

    def __init__(self, model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS,
                 choice: LinearChoice | None = None):
        if max_rows < 2:
            raise ValueError(f"fast_cpu: max_rows must be >= 2, got {max_rows}")
        self.model = model
        found = [(parent, name, child) for parent in list(model.modules())
                 for name, child in list(parent.named_children()) if type(child) is nn.Linear]
        if choice is None and any(c.weight.device.type == "cpu" for _, _, c in found):
            choice = choice_for_model(model)
        self.choice = choice
        self._swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        for parent, name, child in found:
            table = None
            if choice is not None and child.weight.device.type == "cpu":
                table = choice.rows_table(child.out_features, child.in_features,
                                          child.weight.dtype, max_rows)
                if not any(table):  # torch at every row count: the layer stays as it is (no
                    continue        # Python wrapper around each call)
            setattr(parent, name, SmallBatchLinear.from_linear(child, max_rows, table))
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


def fast_cpu(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS,
             choice: LinearChoice | None = None) -> FastCPU:
    """Swaps every ``nn.Linear`` of ``model`` for a :class:`SmallBatchLinear` sharing its weights.

    Args:
        model: any module (for example a transformers causal LM).
        max_rows: the largest number of input rows ever sent to the small-row kernel.
        choice: which kernel runs each weight shape, dtype and row count; None: measured for this
            machine and cached (:func:`mtp_ext.linear_choice.choice_for_model`) when the model has
            linear layers on the CPU (GPU layers always take ``F.linear``).
    Returns:
        A :class:`FastCPU` handle; use it as a context manager or call ``restore()``.
    """
    return FastCPU(model, max_rows, choice)
