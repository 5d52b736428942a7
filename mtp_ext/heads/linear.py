"""``"linear"`` heads: ``z = W_h x``, ``W`` initialized to the identity."""

from __future__ import annotations

import torch
from torch import nn

from .base import MTPHeads

__all__ = ["LinearHeads"]


class LinearHeads(MTPHeads):
    """Independent linear heads; parameter ``weight [H, D, D]``."""

    def _make_parameters(self, kw, embed, decoder_layer, rotary) -> None:
        H, D = self.config.num_heads, self.config.hidden_size
        self.weight = nn.Parameter(torch.eye(D, **kw).expand(H, D, D).clone())

    def _forward(self, x, next_tokens):
        return self._unembed(torch.einsum("...d,hed->...he", x, self.weight))

    def _draft_flat(self, x, k, next_tokens, lead):
        return self._topk_logprobs(self._forward(x, None), k)

    def _draft_head(self, h, f, tokens):
        return f @ self.weight[h].T, None, None, f
