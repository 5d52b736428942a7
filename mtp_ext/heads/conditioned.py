"""``"conditioned"`` heads (DeepSeek-V3 MTP / EAGLE style): each depth also sees the embedding of
the token it follows, and chains on the previous depth's feature, so a child's candidates depend on
its parent's token.

Depth ``d`` computes ``p = P_d [RMSNorm_h(f_{d-1}); RMSNorm_e(embed(tok_d))]`` and
``f_d = p + SiLU(p W_d^T + b_d)`` with ``f_0 = x``; ``P_d: 2D -> D`` starts as the identity on the
hidden half and zero on the embedding half, ``W_d``, ``b_d`` start at zero and the two RMSNorm
weights at one. ``tok_1`` is the token at ``t + 1`` (``next_tokens``); ``tok_{d+1}`` is the token at
``t + 1 + d``: the true one under teacher forcing (``forward`` with ``next_tokens[..., H]``), or
depth ``d``'s own top-1 draft (``draft``, and ``forward`` with ``next_tokens[...]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import stable_topk
from .base import MTPHeads, rms_norm

__all__ = ["ConditionedHeads"]


class ConditionedHeads(MTPHeads):
    """Chained heads conditioned on their parent token; parameters ``proj [H, D, 2D]``,
    ``hnorm [H, D]``, ``enorm [H, D]``, ``weight [H, D, D]``, ``bias [H, D]``; the backbone's
    input embedding is held as the buffer ``embed_weight [V, D]``."""

    def _check_parts(self, embed, decoder_layer, rotary) -> None:
        if embed is None:
            raise ValueError("kind='conditioned' needs the backbone's input embedding (embed)")
        D = self.config.hidden_size
        if embed.shape[-1] != D:
            raise ValueError(f"embed must have shape [*, {D}], got {list(embed.shape)}")

    def _make_parameters(self, kw, embed, decoder_layer, rotary) -> None:
        H, D = self.config.num_heads, self.config.hidden_size
        self.embed_weight = embed.detach()
        proj = torch.zeros(H, D, 2 * D, **kw)
        proj[:, :, :D] = torch.eye(D, **kw)
        self.proj = nn.Parameter(proj)
        self.hnorm = nn.Parameter(torch.ones(H, D, **kw))
        self.enorm = nn.Parameter(torch.ones(H, D, **kw))
        self.weight = nn.Parameter(torch.zeros(H, D, D, **kw))
        self.bias = nn.Parameter(torch.zeros(H, D, **kw))

    def _feature(self, h: int, f: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """Depth ``h + 1``'s feature ``[..., D]`` from the parent's ``f[..., D]`` and token
        ``tok[...]``."""
        eps = self.config.rms_norm_eps
        e = F.embedding(tok, self.embed_weight).to(f.dtype)
        cat = torch.cat([rms_norm(f, self.hnorm[h], eps), rms_norm(e, self.enorm[h], eps)], -1)
        p = cat @ self.proj[h].T
        return p + F.silu(p @ self.weight[h].T + self.bias[h])

    def _check_tokens(self, next_tokens, lead, allow_per_head: bool) -> bool:
        """Validates ``next_tokens``; returns True when it holds one token per head."""
        if next_tokens is None:
            raise ValueError("kind='conditioned' needs next_tokens (the token after each position)")
        if next_tokens.dtype != torch.long:
            raise ValueError(f"next_tokens must be int64, got {next_tokens.dtype}")
        shape = tuple(next_tokens.shape)
        if shape == tuple(lead):
            return False
        if allow_per_head and shape == (*lead, self.config.num_heads):
            return True
        want = f"{list(lead)}" + (
            f" or {list(lead) + [self.config.num_heads]}" if allow_per_head else ""
        )
        raise ValueError(f"next_tokens must have shape {want}, got {list(shape)}")

    def _forward(self, x, next_tokens):
        per_head = self._check_tokens(next_tokens, x.shape[:-1], allow_per_head=True)
        f, out = x, []
        tok = next_tokens[..., 0] if per_head else next_tokens
        for h in range(self.config.num_heads):
            f = self._feature(h, f, tok)
            logits = self._unembed(f)
            out.append(logits)
            if h + 1 < self.config.num_heads:
                if per_head:
                    tok = next_tokens[..., h + 1]
                else:
                    tok = stable_topk(logits.detach().float(), 1)[1][..., 0]
                    if self.vocab_ids is not None:
                        tok = self.vocab_ids[tok]
        return torch.stack(out, -2)

    def _draft_flat(self, x, k, next_tokens, lead):
        self._check_tokens(next_tokens, lead, allow_per_head=False)
        tok = next_tokens.reshape(-1)
        f = x
        lps, idss = [], []
        for depth in range(1, self.config.num_heads + 1):  # each depth chains on the last's top-1
            f, lp_h, ids_h = self.draft_step(depth, f, tok, k)
            lps.append(lp_h)
            idss.append(ids_h)
            tok = ids_h[:, 0]
        return torch.stack(lps, 1), torch.stack(idss, 1)

    def _draft_head(self, h, f, tokens):
        self._check_tokens(tokens, f.shape[:1], allow_per_head=False)
        z = self._feature(h, f, tokens)
        return z, None, None, z
