"""``"transformer"`` heads (Gloeckle et al. 2024, "Better & Faster LLMs via multi-token
prediction"): head ``h`` is one decoder block, a copy of the backbone's last decoder layer
(trainable, saved as ``blocks.{h-1}.*``), with causal self-attention over the positions of the input
sequence ``x`` (rotary position embeddings computed by the backbone's own rotary module, which is
shared, not trained and not saved). The block's output is a residual stream, so the backbone's final
norm is always applied before the unembedding. The heads are independent (each block reads ``x``).

These heads need a sequence axis: ``forward`` and ``draft`` take ``[B, S, D]`` features and return
``[B, S, H, *]``; incremental decoding keeps one key/value cache per head
(:meth:`TransformerHeads.new_draft_state`, then ``draft(..., state=...)`` on the new positions
only), and during decoding :class:`SequenceFeatures` keeps those caches beside the backbone's.
"""

from __future__ import annotations

import copy
import inspect
from typing import Sequence

import torch
from torch import nn

from ..attention_masks import additive_mask, sequence_mask
from ..hf_compat import cache_kwarg, crop_cache
from .base import MTPHeads

__all__ = ["TransformerHeads", "TransformerDraftState", "SequenceFeatures"]


class _Unregistered:
    """Holds a module without registering it as a submodule of its owner: its parameters and
    buffers are neither trained, nor saved, nor moved by the owner's ``.to()``."""

    def __init__(self, module: nn.Module):
        self.module = module


def _decoder_layers(model) -> Sequence[nn.Module]:
    """The backbone's decoder layers (``model.model.layers`` for Llama / Qwen2 / Gemma3 text
    models, or found through ``get_decoder()`` / ``language_model``)."""
    candidates = [getattr(model, "model", None)]
    if hasattr(model, "get_decoder"):
        candidates.append(model.get_decoder())
    for c in list(candidates):
        candidates.append(getattr(c, "language_model", None))
    for c in candidates:
        layers = getattr(c, "layers", None)
        if isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
            return layers
    raise ValueError(
        "kind='transformer' needs the backbone's decoder layers: found none at model.model.layers, "
        "model.get_decoder().layers or *.language_model.layers"
    )


def _transformer_parts(model) -> tuple[nn.Module, nn.Module]:
    """``(last decoder layer, rotary embedding module)`` of a transformers causal LM."""
    layers = _decoder_layers(model)
    inner = [getattr(model, "model", None)]
    if hasattr(model, "get_decoder"):
        inner.append(model.get_decoder())
    owners = inner + [getattr(c, "language_model", None) for c in inner]
    found = [getattr(o, "rotary_emb", None) for o in owners if o is not None]
    rotary = next((r for r in found if r is not None), None)
    if rotary is None:
        raise ValueError(
            "kind='transformer' needs the backbone's rotary embedding module (rotary_emb), "
            "found none next to its decoder layers"
        )
    return layers[-1], rotary


def block_parts(model) -> dict:
    """The constructor arguments of kinds built on the backbone's decoder block:
    ``{"decoder_layer": its last decoder layer, "rotary": its rotary embedding module}``."""
    layer, rotary = _transformer_parts(model)
    return {"decoder_layer": layer, "rotary": rotary}


def _block_copy(layer: nn.Module) -> nn.Module:
    """An independent, trainable copy of a decoder layer, reading cache layer 0 (each head keeps its
    own one-layer cache). Forward hooks are dropped: transformers installs output-capturing hooks on
    the backbone's layers, which must not record the heads' blocks."""
    block = copy.deepcopy(layer)
    for m in block.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "layer_idx"):
            m.layer_idx = 0
    block.requires_grad_(True)
    return block


def _block_causal_mask(
    batch: int, q_len: int, past: int, dtype: torch.dtype, device, sliding_window: int | None
) -> torch.Tensor:
    """Additive attention mask ``[B, 1, q_len, past + q_len]`` of ``dtype``: 0 where query ``i``
    (at cache index ``past + i``) may attend key ``j`` (``j <= past + i``, and within
    ``sliding_window`` when the block has one), ``finfo(dtype).min`` elsewhere."""
    q = torch.arange(past, past + q_len, device=device)[:, None]
    kv = torch.arange(past + q_len, device=device)[None, :]
    allowed = kv <= q
    if sliding_window:
        allowed = allowed & (q - kv < int(sliding_window))
    return additive_mask(allowed[None], dtype).expand(batch, 1, q_len, past + q_len)


class TransformerDraftState:
    """Incremental drafting state of ``"transformer"`` heads: one key/value cache per head
    (transformers ``DynamicCache``), holding the positions drafted so far (made by
    :meth:`MTPHeads.new_draft_state`; pass it as ``draft(..., state=...)``)."""

    def __init__(self, num_heads: int):
        from transformers import DynamicCache

        self.caches = [DynamicCache() for _ in range(num_heads)]

    @property
    def length(self) -> int:
        """Number of cached positions (the same in every head's cache)."""
        return int(self.caches[0].get_seq_length())

    def crop(self, length: int) -> None:
        """Drops cached positions beyond the first ``length`` (e.g. after rejected draft tokens)."""
        for c in self.caches:
            crop_cache(c, length)


class TransformerHeads(MTPHeads):
    """One decoder block per head over the input sequence; parameters ``blocks.{h}.*``."""

    reads_sequence = True

    def _check_parts(self, embed, decoder_layer, rotary) -> None:
        if decoder_layer is None or rotary is None:
            missing = [n for n, v in (("decoder_layer", decoder_layer), ("rotary", rotary))
                       if v is None]
            raise ValueError(
                "kind='transformer' needs the backbone's last decoder layer (decoder_layer) "
                f"and its rotary embedding module (rotary); missing: {missing} "
                "(MTPHeads.for_model finds both)"
            )
        D = self.config.hidden_size
        layer_d = getattr(decoder_layer, "hidden_size", D)
        if layer_d != D:
            raise ValueError(f"decoder_layer must have hidden_size={D}, got hidden_size={layer_d}")

    def _make_parameters(self, kw, embed, decoder_layer, rotary) -> None:
        self.blocks = nn.ModuleList(
            _block_copy(decoder_layer).to(**kw) for _ in range(self.config.num_heads)
        )
        self._rotary = _Unregistered(rotary)

    @classmethod
    def _backbone_kwargs(cls, model) -> dict:
        return block_parts(model)

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.blocks.parameters()).dtype

    @property
    def _applies_norm(self) -> bool:
        return self.norm_weight is not None

    @property
    def feature_width(self) -> int:
        return self.config.num_heads * self.config.hidden_size

    def decode_features(self) -> "SequenceFeatures":
        return SequenceFeatures(self)

    @property
    def block_window(self) -> int | None:
        """``"transformer"`` heads: the sliding window of their blocks' attention, None when they
        attend fully (all blocks copy one decoder layer, so they share it)."""
        windows = {getattr(getattr(b, "self_attn", None), "sliding_window", None) for b in self.blocks}
        windows.discard(None)
        if len(windows) > 1:
            raise ValueError(f"the heads' blocks have different sliding windows {sorted(windows)}")
        return int(windows.pop()) if windows else None

    def new_draft_state(self) -> TransformerDraftState:
        """An empty incremental drafting state (one key/value cache per head) for
        ``draft(..., state=...)``; ``"transformer"`` heads only."""
        return TransformerDraftState(self.config.num_heads)

    def _check_sequence(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(
                "kind='transformer' needs features with a sequence axis [B, S, "
                f"{self.config.hidden_size}], got shape {list(x.shape)}"
            )

    def _position_embeddings(
        self, block: nn.Module, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` from the backbone's rotary module for ``position_ids [B, S]`` (Gemma3's
        rotary module also takes the block's ``layer_type``)."""
        rotary = self._rotary.module
        params = inspect.signature(rotary.forward).parameters
        if "layer_type" in params:
            layer_type = getattr(getattr(block, "self_attn", None), "layer_type", None)
            return rotary(x, position_ids, layer_type or "full_attention")
        return rotary(x, position_ids)

    def block_outputs(
        self,
        hidden_states,
        position_ids: torch.Tensor | None = None,
        state: "TransformerDraftState | None" = None,
        attention_mask=None,
    ) -> torch.Tensor:
        """``"transformer"`` heads: each head's decoder block on the input sequence.

        Args:
            hidden_states: as for :meth:`forward`, with a sequence axis: each ``[B, S, D]``.
            position_ids: ``[B, S]`` or ``[S]`` int64 rotary positions (default: ``past + 0 ..
                past + S - 1``, ``past`` the number of positions cached in ``state``, 0 without).
            state: a :class:`TransformerDraftState` (:meth:`new_draft_state`): the ``S`` positions
                attend to the cached ones and are appended to the caches.
            attention_mask: instead of the causal mask, an additive ``[B, 1, S, past + S]`` mask of
                the heads' dtype (0 = attend, ``finfo.min`` = masked; decoding masks padding and
                rejected cache slots with it), or a dict with one such mask under
                ``"full_attention"`` and ``"sliding_attention"``, picked per block by whether its
                attention has a sliding window.
        Returns:
            ``[B, S, H, D]`` of the heads' parameter dtype: the blocks' outputs (residual streams,
            not normed; :meth:`unembed` gives the logits).
        """
        x = self.select_input(hidden_states)
        self._check_sequence(x)
        B, S, _ = x.shape
        past = 0 if state is None else state.length
        if state is not None and len(state.caches) != self.config.num_heads:
            raise ValueError(
                f"state must hold num_heads={self.config.num_heads} caches, got {len(state.caches)}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x.device)
        position_ids = torch.as_tensor(position_ids, device=x.device)
        if position_ids.dtype != torch.long or position_ids.shape not in ((S,), (B, S)):
            raise ValueError(
                f"position_ids must be int64 of shape [{S}] or [{B}, {S}], got "
                f"{position_ids.dtype} {list(position_ids.shape)}"
            )
        position_ids = position_ids.expand(B, S)
        outs = []
        for h, block in enumerate(self.blocks):
            window = getattr(getattr(block, "self_attn", None), "sliding_window", None)
            if attention_mask is None:
                mask = _block_causal_mask(B, S, past, x.dtype, x.device, window)
            elif isinstance(attention_mask, dict):
                mask = attention_mask["sliding_attention" if window else "full_attention"]
            else:
                mask = attention_mask
            if tuple(mask.shape) != (B, 1, S, past + S):
                raise ValueError(
                    f"attention_mask must have shape [{B}, 1, {S}, {past + S}], got {list(mask.shape)}"
                )
            cache = None if state is None else state.caches[h]
            out = block(
                x,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=self._position_embeddings(block, x, position_ids),
                **cache_kwarg(block, cache),
            )
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.stack(outs, -2)

    def forward(self, hidden_states, next_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self._unembed(self.block_outputs(hidden_states))

    forward.__doc__ = MTPHeads.forward.__doc__

    @torch.no_grad()
    def draft(self, hidden_states, k: int, next_tokens=None, state=None, position_ids=None):
        self._check_k(k)
        z = self.block_outputs(hidden_states, position_ids=position_ids, state=state)
        return self._topk_logprobs(self._unembed(z), k)

    draft.__doc__ = MTPHeads.draft.__doc__

    def draft_input(self, hidden_states) -> torch.Tensor:
        """What :meth:`draft_step` takes at depth 1: the blocks' outputs at the position before
        each root, ``[B, H, D]``, flattened to ``[B, H * D]``."""
        H, D = self.config.num_heads, self.config.hidden_size
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or tuple(
            hidden_states.shape[1:]
        ) != (H, D):
            raise ValueError(
                f"transformer heads draft from their block outputs [B, {H}, {D}], got "
                f"{list(getattr(hidden_states, 'shape', [type(hidden_states).__name__]))}"
            )
        return hidden_states.flatten(1)

    def _draft_head(self, h, f, tokens):
        D = self.config.hidden_size
        return f[:, h * D : (h + 1) * D], None, None, f


class SequenceFeatures:
    """Decoding state of ``"transformer"`` heads, whose blocks attend over the sequence: one
    key/value cache per head (:class:`TransformerDraftState`) mirrors the backbone's cache slot for
    slot, so the same validity (padding, rejected nodes) masks both. After each step the blocks
    run over the accepted path's positions (``keep`` per row, the invalid ones masked), and the
    heads draft from their outputs at the last accepted position: ``[B, H, D]``."""

    def __init__(self, heads: TransformerHeads):
        self.state = heads.new_draft_state()
        self.window = heads.block_window

    def _blocks(self, heads, x, new_valid, new_pos, slots):
        mask = sequence_mask(slots, new_valid, new_pos, heads.param_dtype, self.window)
        return heads.block_outputs(x, position_ids=new_pos, state=self.state, attention_mask=mask)

    def at_prompt(self, heads: TransformerHeads, out, slots, next_tokens=None):
        z = self._blocks(heads, heads.input_at(out, slice(None)), slots.valid, slots.pos, None)
        return z[:, -1]

    def after_step(self, heads: TransformerHeads, out, path: torch.Tensor, num_acc: torch.Tensor,
                   keep: int, slots, next_pos: torch.Tensor, tokens=None):
        kept = torch.arange(keep, device=path.device)[None]
        x = heads.input_at(out, path[:, :keep].clamp(min=0))  # -1 past a row's path: masked
        z = self._blocks(heads, x, kept <= num_acc[:, None], next_pos[:, None] + kept, slots)
        return z[torch.arange(path.shape[0], device=path.device), num_acc]
