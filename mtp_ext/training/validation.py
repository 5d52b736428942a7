"""Validation of MTP heads on a hidden-state cache: per-head top-1 / top-5 accuracy against the
text and against the backbone's greedy prediction, the backbone's own next-token accuracy and the
mean MTP loss."""

from __future__ import annotations

import math

import torch

from ..heads import MTPHeads
from .config import TrainConfig
from .forward import heads_forward
from .losses import head_targets, mtp_loss, teacher_logits, topk_hits


@torch.no_grad()
def evaluate(heads: MTPHeads, cache: dict, config: TrainConfig) -> dict:
    """Per-head top-1 / top-5 accuracy on every position of a cache (chunks of ``eval_batch``),
    against the text and against the backbone's greedy prediction; plus the backbone's own
    next-token accuracy and the mean MTP loss (per head) for the configured target.

    Returns lists of ``H`` floats under ``top1_text``, ``top5_text``, ``top1_greedy``,
    ``top5_greedy``, ``loss`` and ``positions`` (the counted positions per head), and the float
    ``ntp_top1_text``."""
    ids, greedy = cache["ids"], cache["greedy"]
    N, T = ids.shape
    H = heads.config.num_heads
    s_all = torch.arange(N).repeat_interleave(T - 2)
    t_all = torch.arange(T - 2).repeat(N)
    sums = {k: torch.zeros(H, dtype=torch.float64) for k in ("t1", "t5", "g1", "g5")}
    counts = torch.zeros(H, dtype=torch.float64)
    loss_sum = torch.zeros(H, dtype=torch.float64)
    was_training = heads.training
    heads.eval()
    for i in range(0, s_all.numel(), config.eval_batch):
        s, t = s_all[i : i + config.eval_batch], t_all[i : i + config.eval_batch]
        logits = heads_forward(heads, cache["feat"], ids, s, t).cpu()
        tt, valid = head_targets(ids, greedy, s, t, H, "text")
        tg, _ = head_targets(ids, greedy, s, t, H, "greedy")
        v = valid.double()
        counts += v.sum(0)
        sums["t1"] += (topk_hits(heads, logits, tt, 1).double() * v).sum(0)
        sums["t5"] += (topk_hits(heads, logits, tt, 5).double() * v).sum(0)
        sums["g1"] += (topk_hits(heads, logits, tg, 1).double() * v).sum(0)
        sums["g5"] += (topk_hits(heads, logits, tg, 5).double() * v).sum(0)
        tl = None
        if config.target == "kl":
            tl = teacher_logits(heads, cache, s, t, valid).cpu()
        targets = tt if config.target == "text" else tg
        _, per = mtp_loss(heads, logits, targets, valid, tl)
        loss_sum += torch.tensor([0.0 if math.isnan(p) else p for p in per], dtype=torch.float64) * v.sum(0)
    heads.train(was_training)
    c = counts.clamp(min=1)
    res = {
        "top1_text": (sums["t1"] / c).tolist(),
        "top5_text": (sums["t5"] / c).tolist(),
        "top1_greedy": (sums["g1"] / c).tolist(),
        "top5_greedy": (sums["g5"] / c).tolist(),
        "loss": (loss_sum / c).tolist(),
        "positions": counts.tolist(),
        "ntp_top1_text": float((greedy[:, :-1] == ids[:, 1:]).double().mean()),
    }
    return res
