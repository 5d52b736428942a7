"""``"resblock"`` heads (Medusa): ``z = x + SiLU(x W_h^T + b_h)``, ``W`` and ``b`` initialized to
zero, so a fresh head predicts what the backbone predicts. :meth:`MTPHeads.draft` runs all heads in
one call of :func:`mtp_ext.ops.fused_mtp_heads` (one pass over ``lm_head``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .base import MTPHeads

__all__ = ["ResBlockHeads"]


class ResBlockHeads(MTPHeads):
    """Independent residual-block heads; parameters ``weight [H, D, D]``, ``bias [H, D]``."""

    def _make_parameters(self, kw, embed, decoder_layer, rotary) -> None:
        H, D = self.config.num_heads, self.config.hidden_size
        self.weight = nn.Parameter(torch.zeros(H, D, D, **kw))
        self.bias = nn.Parameter(torch.zeros(H, D, **kw))

    def _forward(self, x, next_tokens):
        z = x.unsqueeze(-2) + F.silu(torch.einsum("...d,hed->...he", x, self.weight) + self.bias)
        return self._unembed(z)

    def _draft_flat(self, x, k, next_tokens, lead):
        norm_w = self.norm_weight.to(x.dtype) if self._applies_norm else None
        return ops.fused_mtp_heads(
            x, self.weight, self.bias, self._table(), k, norm_w, self.config.rms_norm_eps,
            self.vocab_ids,
        )

    def _draft_head(self, h, f, tokens):
        # The fused op runs the residual block itself.
        return f, self.weight[h : h + 1], self.bias[h : h + 1], f
