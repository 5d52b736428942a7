"""One training step's loss: the positions (frozen mode) or sequences (joint mode) a step draws,
and the loss on this rank's share of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..heads import MTPHeads
from .cache import uncached_features
from .config import TrainConfig
from .distributed import global_scale, rank_slice
from .forward import heads_forward
from .losses import head_counts, head_targets, mtp_loss, teacher_logits


def sample_positions(N: int, T: int, P: int, gen: torch.Generator, whole: bool = False):
    """``P`` positions ``(s, t)`` (two ``[P]`` int64 tensors) uniformly among those of ``N``
    sequences of ``T`` tokens with a head-1 target (``t + 2 < T``); with ``whole``, the positions
    of ``ceil(P / (T - 2))`` random sequences in order (the last one cut to make ``P``): what heads
    that attend over the sequence (the transformer kind) need, since their cost grows with the
    distinct sequences of a batch."""
    per = T - 2
    if whole:
        n = -(-P // per)
        seqs = torch.randint(0, N, (n,), generator=gen)
        return seqs.repeat_interleave(per)[:P], torch.arange(per).repeat(n)[:P]
    flat = torch.randint(0, N * per, (P,), generator=gen)
    return flat // per, flat % per


def frozen_step(model, heads: MTPHeads, train_ids: torch.Tensor, train_cache: dict | None,
                gen: torch.Generator, config: TrainConfig, rank: int = 0, world: int = 1):
    """One frozen-mode step's loss on ``batch_positions`` sampled positions of ``train_ids``
    (``[N, T]`` int64; this rank's share of them when distributed: its loss terms are scaled so
    that the ranks' losses sum to the global batch's). ``train_cache`` None recomputes the
    sequences the positions lie in. Returns ``(loss, {"loss": global-batch loss on one process,
    this rank's share otherwise})``, ``loss`` a float32 scalar."""
    H = heads.config.num_heads
    device = heads.lm_head_weight.device
    N, T = train_ids.shape
    whole = heads.reads_sequence
    s, t = sample_positions(N, T, config.batch_positions, gen, whole)  # the same on every rank
    if world > 1:
        mine = rank_slice(config.batch_positions, rank, world, "batch_positions")
        s, t = s[mine], t[mine]
    if train_cache is not None:
        cache, si = train_cache, s
    else:
        cache, si = uncached_features(model, heads, train_ids, s, config)
    logits = heads_forward(heads, cache["feat"], cache["ids"], si, t)
    targets, valid = head_targets(cache["ids"], cache["greedy"], si, t, H, config.target)
    targets, valid = targets.to(device), valid.to(device)
    kl = config.target == "kl"
    tl = teacher_logits(heads, cache, si, t, valid.cpu()) if kl else None
    scale = global_scale(head_counts(heads, targets, valid, kl), world) if world > 1 else None
    loss, _ = mtp_loss(heads, logits, targets, valid, tl, scale)
    return loss, {"loss": float(loss.detach())}


def joint_step(model, heads: MTPHeads, train_ids: torch.Tensor, gen: torch.Generator, step: int,
               config: TrainConfig, backbone_params, rank: int = 0, world: int = 1):
    """One joint step: NTP + lambda * MTP on ``joint_seqs`` sequences of ``train_ids`` (``[N, T]``
    int64; the backbone frozen during the head warm-up); distributed, on this rank's share of
    them, its loss scaled so that the ranks' losses (and the returned ``loss`` / ``ntp`` / ``mtp``
    values) sum to the global batch's. Returns ``(loss, {"loss", "ntp", "mtp"})``."""
    H = heads.config.num_heads
    device = heads.lm_head_weight.device
    unfrozen = step >= config.head_warmup_steps
    for p in backbone_params:
        p.requires_grad_(unfrozen)
    idx = torch.randint(0, train_ids.shape[0], (config.joint_seqs,), generator=gen)
    if world > 1:
        idx = idx[rank_slice(config.joint_seqs, rank, world, "joint_seqs")]
    x = train_ids[idx].to(device)
    with torch.set_grad_enabled(unfrozen):
        out = model(x, output_hidden_states=True)
    hs = out.hidden_states
    if not unfrozen:
        hs = tuple(h.detach() for h in hs)
    n, T = x.shape
    ntp = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                          x[:, 1:].reshape(-1))
    s = torch.arange(n).repeat_interleave(T - 2)
    t = torch.arange(T - 2).repeat(n)
    if heads.config.layer == "whs":
        feat = torch.stack(hs, 0)
    else:
        feat = hs[heads.config.layer]
    greedy = out.logits.detach().argmax(-1).cpu()
    logits = heads_forward(heads, feat, x.cpu(), s, t)
    targets, valid = head_targets(x.cpu(), greedy, s, t, H, config.target)
    tl = None
    if config.target == "kl":
        pos = (t[:, None] + torch.arange(1, H + 1)[None]).clamp(max=T - 1)
        tl = out.logits.detach()[s[:, None], pos]
    targets, valid = targets.to(device), valid.to(device)
    scale = None
    if world > 1:  # equal shares of equal-length sequences: the NTP mean scales by 1 / world
        ntp = ntp / world
        scale = global_scale(head_counts(heads, targets, valid, tl is not None), world)
    mtp, _ = mtp_loss(heads, logits, targets, valid, tl, scale)
    loss = (ntp if unfrozen else ntp.detach()) + config.mtp_lambda * mtp
    return loss, {"loss": float(loss.detach()), "ntp": float(ntp.detach()), "mtp": float(mtp.detach())}
