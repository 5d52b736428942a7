"""Targets and losses of MTP heads.

Targets (``target``), for head ``h`` (1-based) at position ``t`` (it predicts the token at
``t + 1 + h``):

- ``"text"``: the text's token at ``t + 1 + h``;
- ``"greedy"``: the backbone's own argmax at position ``t + h`` under teacher forcing (which is its
  prediction of the token at ``t + 1 + h``), cross-entropy;
- ``"kl"``: the backbone's full distribution at position ``t + h``, loss ``KL(backbone || head)``.
  The teacher logits are recomputed from the cached last hidden state through the output embedding
  (exact for Llama-style models; checked against the model's logits when caching).

The MTP loss is the sum over heads of the mean per-head loss over the positions whose target lies
inside the sequence.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..heads import MTPHeads


def head_targets(ids: torch.Tensor, greedy: torch.Tensor, s, t, num_heads: int, target: str):
    """Targets ``[P, H]`` (int64 full-vocabulary ids, -100 past the end) and their mask ``valid``
    (``[P, H]`` bool) for positions ``(s[P], t[P])`` of ``ids`` / ``greedy`` (``[N, T]`` int64):
    the text's token at ``t + 1 + h`` or the backbone's greedy token at position ``t + h``."""
    T = ids.shape[1]
    hs = torch.arange(1, num_heads + 1)
    if target == "text":
        pos = t[:, None] + 1 + hs[None]
        src = ids
    else:
        pos = t[:, None] + hs[None]
        src = greedy
    valid = (t[:, None] + 1 + hs[None]) < T
    out = src[s[:, None], pos.clamp(max=T - 1)]
    return out.masked_fill(~valid, -100), valid


def teacher_logits(heads: MTPHeads, cache: dict, s, t, valid) -> torch.Tensor:
    """The backbone's logits ``[P, H, V]`` (float32, on the heads' device) at positions ``t + h``
    of sequences ``s`` (``[P]`` int64), recomputed from the cache's last hidden state."""
    last = cache.get("last")
    if last is None:
        last = cache["feat"]  # the heads read the last hidden state itself
    T = last.shape[1]
    H = heads.config.num_heads
    pos = (t[:, None] + torch.arange(1, H + 1)[None]).clamp(max=T - 1)
    x = last[s[:, None], pos].to(heads.lm_head_weight.device).float()
    return x @ heads.lm_head_weight.float().T


def mtp_loss(
    heads: MTPHeads,
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    scale: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Sum over heads of the mean loss over valid positions; returns ``(loss, per-head losses)``.

    ``logits [P, H, V']``; ``targets [P, H]`` full-vocabulary ids (-100: no target); for KL,
    ``teacher_logits [P, H, V]`` the backbone's logits at ``t + h``. ``scale`` (``H`` factors,
    default 1) multiplies each head's term in ``loss`` (not in the per-head losses): distributed
    training passes this rank's counted positions over the global count (see :func:`head_counts`).
    ``loss`` is a float32 scalar; a head without any counted position adds nothing and reports
    ``nan``.
    """
    total = logits.new_zeros((), dtype=torch.float32)
    per = []
    for h in range(logits.shape[1]):
        lg = logits[:, h].float()
        if teacher_logits is not None:
            m = valid[:, h]
            if not bool(m.any()):
                per.append(float("nan"))
                continue
            tl = teacher_logits[m, h].float()
            if heads.vocab_ids is not None:
                tl = tl[:, heads.vocab_ids]
            lh = F.kl_div(
                F.log_softmax(lg[m], -1), F.log_softmax(tl, -1), log_target=True,
                reduction="batchmean",
            )
        else:
            tg = heads.draft_index(targets[:, h].clamp(min=0)).masked_fill(targets[:, h] < 0, -100)
            if not bool((tg >= 0).any()):
                per.append(float("nan"))
                continue
            lh = F.cross_entropy(lg, tg, ignore_index=-100)
        total = total + (lh if scale is None else lh * float(scale[h]))
        per.append(float(lh.detach()))
    return total, per


def head_counts(
    heads: MTPHeads, targets: torch.Tensor, valid: torch.Tensor, kl: bool
) -> torch.Tensor:
    """``[H]`` (int64) the number of positions each head's term of :func:`mtp_loss` averages over:
    the valid ones for KL, else those whose target is in the draft vocabulary (cross-entropy
    ignores the others)."""
    if kl:
        return valid.sum(0)
    tg = heads.draft_index(targets.clamp(min=0)).masked_fill(targets < 0, -100)
    return (tg >= 0).sum(0)


def topk_hits(heads: MTPHeads, logits: torch.Tensor, targets: torch.Tensor, k: int):
    """``[P, H]`` bool: the target (``targets [P, H]``, full-vocabulary ids) is among the top
    ``k`` of ``logits [P, H, V']``."""
    k = min(k, logits.shape[-1])
    top = logits.float().topk(k, -1).indices
    if heads.vocab_ids is not None:
        top = heads.vocab_ids[top]
    return (top == targets[..., None]).any(-1)
