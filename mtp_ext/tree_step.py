"""One step of tree decoding, and the per-call state it advances (used by :mod:`mtp_ext.decoding`).

A step drafts a tree with the heads, runs the backbone once over its ``T`` nodes on top of the
key/value cache, verifies it, reads the result on the host (the step's one host synchronization:
one ``[B, 1 + T]`` int64 copy) and compacts the cache to the accepted paths. Everything else stays
on the model's device; the per-slot bookkeeping lives in buffers that grow by doubling, and the
prompt-lookup contexts live in host buffers filled from what the host already read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .hf_compat import cache_kwarg, cache_layers
from .heads import MTPHeads
from .trees import DraftTree, TreeSpec, add_branch, build_tree, lookup_draft

__all__ = ["DecodeState", "SlotTable", "HostContexts", "StepResult", "run_step", "heads_input",
           "logits_from_hidden", "attention_window"]


# ----------------------------------------------------------------------------------------------
# Backbone access
# ----------------------------------------------------------------------------------------------


def backbone(model):
    """The decoder stack that returns hidden states (``model.model`` for Llama, Qwen2, Gemma 3)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no base model (decoder stack) to run trees on")
    return base


def _softcap(model) -> float | None:
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits ``[..., V]`` from its last hidden state ``[..., D]`` (output layer,
    then any soft-capping)."""
    logits = model.get_output_embeddings()(hidden)
    cap = _softcap(model)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def heads_input(heads: MTPHeads, out, index: torch.Tensor | None):
    """What the heads read at one position per row: ``index [B]`` int64 into the output's
    positions (None: the last position). A ``[B, D]`` tensor, or a tuple of them (one per hidden
    state) for heads that read several layers."""
    def at(h):
        if index is None:
            return h[:, -1]
        return h[torch.arange(h.shape[0], device=h.device), index]

    if heads.config.reads_last:
        return at(out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1])
    return tuple(at(h) for h in out.hidden_states)


def attention_window(model) -> int | None:
    """The sliding window of the model's sliding-attention layers, or None when every layer
    attends fully; raises for layer types the loop does not handle."""
    cfg = getattr(model, "config", None)
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:
        raise NotImplementedError(f"mtp_ext.generate does not handle layer types {sorted(unknown)}")
    if "sliding_attention" in types:
        window = getattr(cfg, "sliding_window", None)
        if not window:
            raise ValueError("the model has sliding-attention layers but no config.sliding_window")
        return int(window)
    return None


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------


class SlotTable:
    """What each row may attend to in the key/value cache: ``valid [B, S]`` bool (left padding,
    and the slots a row did not fill in a step, are False) and ``pos [B, S]`` int64, the position
    id held in each slot (for sliding windows). ``S`` is the cache's length, kept on the host; the
    buffers behind the views grow by doubling, so appending a step's slots copies nothing."""

    def __init__(self, valid: torch.Tensor, pos: torch.Tensor, reserve: int = 0):
        B, S = valid.shape
        cap = max(S + reserve, 2 * S, 16)
        self._valid = torch.zeros(B, cap, dtype=torch.bool, device=valid.device)
        self._pos = torch.zeros(B, cap, dtype=torch.long, device=valid.device)
        self._valid[:, :S] = valid
        self._pos[:, :S] = pos
        self.length = S

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, : self.length]

    @property
    def pos(self) -> torch.Tensor:
        return self._pos[:, : self.length]

    def append(self, valid: torch.Tensor, pos: torch.Tensor) -> None:
        """Adds ``n`` slots per row: ``valid [B, n]`` bool, ``pos [B, n]`` int64."""
        n = valid.shape[1]
        need = self.length + n
        if need > self._valid.shape[1]:
            cap = max(need, 2 * self._valid.shape[1])
            grown_v = self._valid.new_zeros(self._valid.shape[0], cap)
            grown_p = self._pos.new_zeros(self._pos.shape[0], cap)
            grown_v[:, : self.length] = self.valid
            grown_p[:, : self.length] = self.pos
            self._valid, self._pos = grown_v, grown_p
        self._valid[:, self.length : need] = valid
        self._pos[:, self.length : need] = pos
        self.length = need


class HostContexts:
    """Each row's tokens so far (prompt without padding, then what was emitted), on the host, for
    prompt-lookup drafting: one int64 buffer per row, grown by doubling."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reserve: int):
        self._rows: list[torch.Tensor] = []
        self._len: list[int] = []
        for ids, m in zip(input_ids.cpu(), attention_mask.cpu().bool()):
            prompt = ids[m]
            buf = torch.empty(max(16, prompt.numel() + reserve), dtype=torch.long)
            buf[: prompt.numel()] = prompt
            self._rows.append(buf)
            self._len.append(prompt.numel())

    def row(self, b: int) -> torch.Tensor:
        """``[L]`` int64 view of row ``b``'s tokens."""
        return self._rows[b][: self._len[b]]

    def extend(self, b: int, tokens: list[int]) -> None:
        n, need = self._len[b], self._len[b] + len(tokens)
        if need > self._rows[b].numel():
            grown = torch.empty(max(need, 2 * self._rows[b].numel()), dtype=torch.long)
            grown[:n] = self._rows[b][:n]
            self._rows[b] = grown
        self._rows[b][n:need] = torch.tensor(tokens, dtype=torch.long)
        self._len[b] = need

    def lookup(self, length: int, rows: list[bool]) -> torch.Tensor | None:
        """``[B, length]`` int64 prompt-lookup drafts (-1 padded) for the rows flagged in ``rows``,
        or None when no flagged row has a match (host tensors only: no device access)."""
        if length <= 0:
            return None
        found = [lookup_draft(self.row(b), length) if use else None for b, use in enumerate(rows)]
        if all(r is None for r in found):
            return None
        blank = torch.full((length,), -1, dtype=torch.long)
        return torch.stack([r if r is not None else blank for r in found])


@dataclasses.dataclass
class DecodeState:
    """Per-call decoding state: the model's key/value ``cache``; its ``slots``
    (:class:`SlotTable`); ``next_pos [B]`` int64, the position id of each row's root; ``root [B]``
    int64, the last accepted token; ``feature``, the heads' input at the position before the root;
    ``window``, the model's sliding window (None without sliding-attention layers)."""

    cache: Any
    slots: SlotTable
    next_pos: torch.Tensor
    root: torch.Tensor
    feature: Any
    window: int | None


@dataclasses.dataclass
class StepResult:
    """What one step produced. On the host, as Python lists: ``accepted`` (``B`` ints, the draft
    tokens each row accepted; each row also emits one bonus token) and ``emitted`` (``B`` lists,
    the ``accepted[b] + 1`` tokens row ``b`` emits). On the device: ``tree`` (the drafted
    :class:`~mtp_ext.trees.DraftTree`), ``num_accepted [B]`` and ``path [B, T]`` as the verifier
    returned them."""

    accepted: list[int]
    emitted: list[list[int]]
    tree: DraftTree
    num_accepted: torch.Tensor
    path: torch.Tensor


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------


def tree_mask(state: DecodeState, parents: torch.Tensor, dtype: torch.dtype, ops):
    """The attention mask for a tree over the cache and the nodes' position ids ``[B, T]``:
    ``[B, 1, T, S + T]`` additive, or, for models with sliding-window layers,
    ``{"full_attention": ..., "sliding_attention": ...}`` (keys at least ``window`` positions
    behind the query masked too)."""
    kv_valid = state.slots.valid
    B, S = kv_valid.shape
    t_mask, depths = ops.tree_attention_mask(parents, 0, dtype)  # [B, T, T], [B, T]
    T = t_mask.shape[-1]
    neg = torch.finfo(dtype).min
    pos = state.next_pos[:, None] + depths
    full = torch.empty(B, 1, T, S + T, dtype=dtype, device=kv_valid.device)
    full[:, 0, :, :S] = torch.where(kv_valid, 0.0, neg).to(dtype)[:, None, :]
    full[:, 0, :, S:] = t_mask
    window = state.window
    if window is None:
        return full, pos
    # Tree nodes are at most T - 1 positions apart: only cache slots can fall out of the window.
    far = (pos[:, :, None] - state.slots.pos[:, None, :]) >= window  # [B, T, S]
    sliding = full.clone()
    sliding[:, 0, :, :S].masked_fill_(far, neg)
    return {"full_attention": full, "sliding_attention": sliding}, pos


def compact_cache(cache, path: torch.Tensor, num_accepted: torch.Tensor, T: int, keep: int, ops) -> None:
    """Moves each row's accepted path to the slots after the prefix and drops the rest of the
    tree: every layer ends ``prefix + keep`` long (``keep = max accepted + 1``)."""
    for layer in cache_layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            prefix = t.shape[-2] - T
            ops.compact_kv(t, path, num_accepted, prefix)
            setattr(layer, name, t[..., : prefix + keep, :])


def read_step(num_accepted: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], list[list[int]]]:
    """The step's one host synchronization: ``num_accepted [B]`` and ``tokens [B, T]`` (int64, on
    the device) read in one copy; returns the accepted counts and each row's emitted tokens."""
    rows = torch.cat([num_accepted[:, None], tokens], 1).tolist()
    return [r[0] for r in rows], [r[1 : r[0] + 2] for r in rows]


def run_step(model, heads: MTPHeads, state: DecodeState, spec: TreeSpec, settings, uniforms_fn, ops,
             branch: torch.Tensor | None = None) -> StepResult:
    """Drafts, runs and verifies one tree, compacts the cache and advances ``state``.

    Args:
        settings: the call's :class:`~mtp_ext.decoding.GenerationSettings` (``do_sample``,
            ``temperature``, ``top_k``, ``top_p``).
        uniforms_fn: ``shape -> uniforms`` on the model's device (sampling only).
        ops: the backend (``tree_attention_mask``, ``verify_tree``, ``verify_tree_from_hidden``,
            ``compact_kv``).
        branch: ``[B, K]`` int64 host tensor of extra drafts chained under each root (-1 padded),
            e.g. :meth:`HostContexts.lookup`'s, or None.
    """
    tree = build_tree(heads, state.feature, state.root, spec)
    if branch is not None:
        tree = add_branch(tree, branch)
    T = tree.size
    dtype = heads.lm_head_weight.dtype
    mask, pos = tree_mask(state, tree.parents, dtype, ops)
    base = backbone(model)
    out = base(
        tree.tokens.clamp(min=0), attention_mask=mask, position_ids=pos, use_cache=True,
        output_hidden_states=not heads.config.reads_last, **cache_kwarg(base, state.cache),
    )
    hidden = out.last_hidden_state
    if settings.do_sample:
        logits = logits_from_hidden(model, hidden)
        num_acc, tokens, path = ops.verify_tree(
            tree.tokens, tree.parents, logits, settings.temperature, settings.top_k,
            settings.top_p, uniforms_fn(tree.tokens.shape),
        )
    else:
        # argmax is unchanged by soft-capping: the output layer alone decides greedy tokens.
        num_acc, tokens, path = ops.verify_tree_from_hidden(
            tree.tokens, tree.parents, hidden, model.get_output_embeddings().weight
        )
    accepted, emitted = read_step(num_acc, tokens)
    keep = max(accepted) + 1
    compact_cache(state.cache, path, num_acc, T, keep, ops)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    kept = torch.arange(keep, device=tokens.device)[None]
    state.slots.append(kept <= num_acc[:, None], state.next_pos[:, None] + kept)
    state.next_pos = state.next_pos + num_acc + 1
    state.root = tokens[rows, num_acc]
    state.feature = heads_input(heads, out, path[rows, num_acc])
    return StepResult(accepted, emitted, tree, num_acc, path)
