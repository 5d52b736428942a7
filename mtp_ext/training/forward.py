"""The heads' logits at chosen positions ``(s, t)`` of cached (or freshly computed) hidden
states: per position for most kinds, over the needed sequences for heads that attend over the
sequence (``heads.reads_sequence``: the ``"transformer"`` and ``"eagle"`` kinds)."""

from __future__ import annotations

import torch

from ..heads import MTPHeads


def teacher_tokens(ids: torch.Tensor, s, t, num_heads: int) -> torch.Tensor:
    """``next_tokens[P, H]`` (int64) for conditioned heads: the text's tokens at ``t + 1 + d``
    of ``ids`` (``[N, T]`` int64) for positions ``(s[P], t[P])``."""
    T = ids.shape[1]
    pos = (t[:, None] + 1 + torch.arange(num_heads)[None]).clamp(max=T - 1)
    return ids[s[:, None], pos]


def sequence_heads_forward(heads: MTPHeads, feat, s, t, ids=None) -> torch.Tensor:
    """Logits ``[P, H, V']`` of heads that attend over the sequence at positions
    ``(s[P], t[P])`` of cached features ``feat`` (``[N, T, D]``, or ``[L + 1, N, T, D]`` for
    WHS): the heads run on the distinct sequences among ``s``, cut after the last position asked
    for (causal attention: later positions change nothing before them). ``"transformer"`` heads:
    only the ``P`` gathered block outputs go through the norm and the unembedding; ``"eagle"``
    heads read the text's next tokens from ``ids [N, T]`` (teacher forcing at every depth)."""
    device = heads.lm_head_weight.device
    uniq, inv = torch.unique(s, return_inverse=True)
    end = int(t.max()) + 1
    if heads.config.layer == "whs":
        x = tuple(a.to(device) for a in feat[:, uniq.to(feat.device), :end])
    else:
        x = feat[uniq.to(feat.device), :end].to(device)
    if heads.config.kind == "transformer":
        z = heads.block_outputs(x)  # [n, end, H, D]
        return heads.unembed(z[inv.to(device), t.to(device)])
    nt = MTPHeads.teacher_tokens(ids[uniq.to(ids.device)], heads.config.num_heads)[:, :end]
    logits = heads(x, nt.to(device))  # [n, end, H, V']
    return logits[inv.to(device), t.to(device)]


def heads_forward(heads: MTPHeads, feat, ids, s, t) -> torch.Tensor:
    """Heads' logits ``[P, H, V']`` (the heads' dtype, on their device) for positions
    ``(s[P], t[P])`` of features ``feat`` (``[N, T, D]``, or ``[L + 1, N, T, D]`` for WHS) of the
    sequences ``ids`` (``[N, T]`` int64; conditioned heads read the text's next tokens)."""
    if heads.reads_sequence:
        return sequence_heads_forward(heads, feat, s, t, ids)
    device = heads.lm_head_weight.device
    if heads.config.layer == "whs":
        x = tuple(a.to(device) for a in feat[:, s, t])
    else:
        x = feat[s, t].to(device)
    nt = None
    if heads.config.kind == "conditioned":
        nt = teacher_tokens(ids, s, t, heads.config.num_heads).to(heads.lm_head_weight.device)
    return heads(x, nt)
