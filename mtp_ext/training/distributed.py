"""Data-parallel training over ``torch.distributed`` ranks: rank and world size, each rank's share
of a global batch, and the collectives that keep the ranks in step.

Active when ``torch.distributed`` is initialized with a world size above 1 (CPU ``gloo`` or GPU
``nccl``, e.g. ``torchrun --nproc_per_node N -m mtp_ext train-heads ...``). Every rank draws the
same global batch from the same seeded generator (``batch_positions`` positions, or
``joint_seqs`` sequences in joint mode, which must be divisible by the world size) and keeps its
contiguous share (:func:`rank_slice`). Each rank's loss is its share of the global-batch loss:
each head's term is weighted by the rank's number of counted positions over the global number
(:func:`global_scale`, one small all-reduce). After ``backward``, :func:`all_reduce_grads` sums
the gradient shares across ranks with one ``torch.distributed.all_reduce`` per gradient, before
clipping; so a run on ``W`` processes follows the single-process run on the same global batch up
to float rounding, in frozen and in joint mode. The trainable parameters are broadcast from rank
0 at the start (:func:`broadcast_params`). Only rank 0 prints progress, writes ``log.jsonl``,
checkpoints and the final heads; every rank resumes from the same checkpoint (``out_dir`` must be
visible to all of them, :func:`check_same_step`). With ``cache_dir``, rank 0 builds and saves the
caches first and the others load them after a barrier; without it, every rank builds them in
memory. Every rank evaluates the whole validation set (same result; no collective inside the
evaluation).

The gradients are summed by plain collectives rather than a ``DistributedDataParallel`` wrapper:
DDP reduces only in a backward that follows its own ``forward``, while the heads also run through
``block_outputs`` and ``unembed`` (the transformer kind); it buckets the parameters that require a
gradient when it is built, while joint mode unfreezes the backbone after the head warm-up; and it
averages over the ranks where the loss shares here add up. On 2 CPU processes (gloo) the
per-gradient sums took 0.40 s for the 135M gradients of SmolLM2-135M (272 tensors) and 13 ms for
three conditioned heads, against 2.5 s and 20 ms for float64 buckets of 2^24 elements.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .config import TrainConfig


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_slice(n: int, rank: int, world: int, what: str = "batch") -> slice:
    """Rank ``rank``'s contiguous share ``[rank * n / world, (rank + 1) * n / world)`` of ``n``
    items of a global batch; ``n`` must be divisible by ``world`` (``what`` names it in the error)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if n % world:
        raise ValueError(
            f"{what}={n} must be divisible by the world size {world} (every rank takes an equal "
            f"share of the global batch)"
        )
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def check_distributed(config: TrainConfig, world: int) -> None:
    """Raises ``ValueError`` when the global batch cannot be split evenly over ``world`` ranks."""
    if config.joint:
        rank_slice(config.joint_seqs, 0, world, "joint_seqs")
    else:
        rank_slice(config.batch_positions, 0, world, "batch_positions")


def global_scale(local: torch.Tensor, world: int) -> list[float] | None:
    """Per-head factors ``local / global`` of the counted positions (``local`` ``[H]``, any
    dtype; ``None`` on one process), so that the ranks' scaled losses sum to the global-batch
    loss. ``global`` is the float64 sum of ``local`` over the ranks."""
    if world == 1:
        return None
    glob = local.detach().double().clone()
    dist.all_reduce(glob, op=dist.ReduceOp.SUM)
    return (local.double() / glob.clamp(min=1)).tolist()


def broadcast_params(tensors: Sequence[torch.Tensor]) -> None:
    """Copies rank 0's values of ``tensors`` to every rank (in place)."""
    for x in tensors:
        dist.broadcast(x.data, src=0)


def all_reduce_grads(
    params: Sequence[torch.Tensor], scalars: dict[str, float], device: torch.device
) -> dict[str, float]:
    """Sums the gradients of the parameters that require one, and ``scalars``, over the ranks.

    Runs after ``backward``. One float64 all-reduce on ``device`` (a CUDA device for ``nccl``)
    sums ``scalars`` and, per parameter, whether the rank has a gradient; then every gradient some
    rank has is summed in place, in its own dtype, by its own ``all_reduce`` (all of them queued
    before the first wait), a rank without one contributing zeros. A parameter no rank has a
    gradient for keeps ``grad=None`` (as in a single process). Every rank must call it with the
    same parameters in the same order. Returns the summed ``scalars``."""
    params = [p for p in params if p.requires_grad]
    keys = list(scalars)
    head = torch.tensor(
        [float(p.grad is not None) for p in params] + [float(scalars[k]) for k in keys],
        dtype=torch.float64, device=device,
    )
    dist.all_reduce(head, op=dist.ReduceOp.SUM)
    flags = head[: len(params)].tolist()
    pending = []
    for p, has in zip(params, flags):
        if has == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        pending.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
    for work in pending:
        work.wait()
    return dict(zip(keys, head[len(params) :].tolist()))


def check_same_step(step: int, world: int, device: torch.device) -> None:
    """Raises when the ranks resumed at different steps (a checkpoint only some of them see)."""
    if world == 1:
        return
    x = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    if int(x[0]) != -int(x[1]):
        raise RuntimeError(
            f"ranks resumed at different steps (from {-int(x[1])} to {int(x[0])}): out_dir and its "
            f"checkpoint must be visible to every rank"
        )


def barrier(world: int) -> None:
    """Waits for every rank (nothing on one process)."""
    if world > 1:
        dist.barrier()
