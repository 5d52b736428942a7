"""Profiling draft tree sizes on one prompt (``mtp_ext.tree_tuning``).

A bigger tree accepts more tokens per step but costs more per step; where the balance lies depends
on the model, the device, the dtype and the heads. :func:`profile_tree_sizes` measures both on a
calibration prompt and picks the size ``T`` of a :class:`~mtp_ext.trees.DynamicTree` that
maximizes ``tokens per step / seconds per step``; ``T = 1`` (plain decoding, no drafting) wins
when no tree pays.

- Acceptance: one greedy run with the largest tree. Dynamic trees are nested (the ``T`` best nodes
  of a pool are among its ``T'`` best for ``T < T'``, and a node always ranks after its parent),
  so the tokens the run would have accepted with any smaller tree follow from the same steps: the
  accepted path cut at its first node ranked ``T`` or worse.
- Cost: a few greedy steps at each size, timed step by step (median), through
  :func:`~mtp_ext.tree_step.run_step` as ``generate`` runs them.

This is an offline study of one prompt (benchmarks, the evaluation). ``generate`` does not use it:
its default tree is chosen at every step (:mod:`mtp_ext.controller`), since how much a tree
accepts changes with the text being generated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
import time

import torch

from . import ops
from .controller import DEFAULT_SIZES, DEFAULT_WIDTH  # the grid generate's controller uses
from .heads import MTPHeads
from .settings import GenerationSettings
from .tree_step import prefill, run_step, step_linears
from .trees import DraftTree, DynamicTree

__all__ = ["TreeProfile", "profile_tree_sizes", "selection_ranks"]


@dataclasses.dataclass
class TreeProfile:
    """Measured per tree size: ``step_ms`` (median milliseconds per step), ``tokens_per_step``
    (mean tokens emitted per step, the bonus token included) and ``tokens_per_ms`` (their ratio);
    ``best`` is the size with the highest ``tokens_per_ms``."""

    sizes: list[int]
    width: int
    step_ms: list[float]
    tokens_per_step: list[float]
    tokens_per_ms: list[float]
    best: int

    def tree(self) -> DynamicTree:
        return DynamicTree(self.best, self.width)


def selection_ranks(tree: DraftTree) -> torch.Tensor:
    """``[B, T]`` int64: the order in which a dynamic tree selected its nodes (root 0), i.e. node
    ``i`` belongs to the dynamic tree of size ``t`` of the same pool iff ``rank[i] < t``."""
    # Nodes are stored by depth, then pool index; the selection is by score, then depth, then pool
    # index: one stable sort by score of the stored order reproduces it.
    order = torch.sort(-tree.scores, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return ranks


def _accepted_by_size(tree: DraftTree, num_acc: torch.Tensor, path: torch.Tensor, sizes) -> torch.Tensor:
    """``[len(sizes), B]``: tokens each row would have accepted with the tree of each size."""
    ranks = selection_ranks(tree)
    B, T = path.shape
    j = torch.arange(T, device=path.device)
    on_path = (j[None] >= 1) & (j[None] <= num_acc[:, None])
    node_rank = ranks.gather(1, path.clamp(min=0))
    out = []
    for t in sizes:
        ok = (node_rank < t) | ~on_path
        # accepted = leading path nodes (from j = 1) all inside the subtree
        inside = torch.cumprod(ok[:, 1:].long(), 1) * on_path[:, 1:].long()
        out.append(inside.sum(1))
    return torch.stack(out)


def _greedy_steps(model, heads: MTPHeads, ids: torch.Tensor, tree: DynamicTree):
    """Greedy tree steps on the prompt ``ids [1, P]`` (no EOS, no prompt lookup), run through
    :func:`~mtp_ext.tree_step.run_step` as ``generate`` runs them: yields each step's
    :class:`~mtp_ext.tree_step.StepResult` and ``time.perf_counter()`` at its end. Close it
    (``contextlib.closing``) to restore the model's linear layers."""
    settings = GenerationSettings(max_new_tokens=0, do_sample=False, temperature=1.0, top_k=0,
                                  top_p=1.0, eos_token_ids=(), pad_token_id=None)
    state, _ = prefill(model, heads, ids, torch.ones_like(ids), settings, None, ops)
    with step_linears(model, ids.device):
        while True:
            res = run_step(model, heads, state, tree, settings, None, ops)
            yield res, time.perf_counter()


def _timed_steps(model, heads, ids: torch.Tensor, tree, steps: int) -> list[float]:
    """Milliseconds between the ends of ``steps`` consecutive steps (``steps - 1`` intervals)."""
    with contextlib.closing(_greedy_steps(model, heads, ids, tree)) as run:
        stamps = [t for _, t in itertools.islice(run, steps)]
    return [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]


@torch.no_grad()
def profile_tree_sizes(
    model,
    heads: MTPHeads,
    input_ids: torch.Tensor,
    sizes=DEFAULT_SIZES,
    width: int = DEFAULT_WIDTH,
    new_tokens: int = 64,
    timing_steps: int = 10,
    progress: bool = False,
) -> TreeProfile:
    """Measures tokens per step and time per step of dynamic trees of each size on a prompt.

    Args:
        model, heads: the backbone and its heads.
        input_ids: ``[1, P]`` int64 calibration prompt.
        sizes: tree sizes to consider (1 = plain decoding).
        width: the dynamic trees' width.
        new_tokens: tokens generated for the acceptance run (with the largest tree).
        timing_steps: steps timed per size.
    """
    sizes = sorted({int(s) for s in sizes})
    if sizes[0] < 1:
        raise ValueError(f"sizes must be >= 1, got {sizes}")
    ids = input_ids[:1]
    largest = DynamicTree(sizes[-1], width)
    counts, emitted = [], 1  # the prefill's token first
    with contextlib.closing(_greedy_steps(model, heads, ids, largest)) as run:
        while emitted < new_tokens:
            res, _ = next(run)
            counts.append(_accepted_by_size(res.tree, res.num_accepted, res.path, sizes).cpu())
            emitted += res.accepted[0] + 1
    acc = torch.cat(counts, 1).double().mean(1) if counts else torch.zeros(len(sizes))
    step_ms = []
    for i, t in enumerate(sizes):
        ms = _timed_steps(model, heads, ids, DynamicTree(t, width), timing_steps)
        step_ms.append(statistics.median(ms))
        if progress:
            print(f"tree size {t}: {step_ms[-1]:.1f} ms/step, {1 + float(acc[i]):.2f} tokens/step")
    tps = [1.0 + float(a) for a in acc]
    rate = [n / ms for n, ms in zip(tps, step_ms)]
    best = sizes[max(range(len(sizes)), key=lambda i: rate[i])]
    return TreeProfile(sizes, width, step_ms, tps, rate, best)
