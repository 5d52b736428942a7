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

__all__ = ["DecodeState", "SlotTable", "HostContexts", "StepResult", "start_state", "run_step",
           "read_step", "tree_mask", "sequence_mask", "compact_cache", "backbone", "heads_input",
           "logits_from_hidden", "attention_window", "PointFeatures", "SequenceFeatures",
           "features_for"]


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


def heads_input(heads: MTPHeads, out, index: torch.Tensor | slice | None):
    """What the heads read at some positions of a backbone output ``out``: ``index [B]`` int64
    (one position per row: ``[B, D]``), ``[B, K]`` (``K`` per row: ``[B, K, D]``), a slice of
    positions (``[B, S', D]``) or None (the last position: ``[B, D]``). A tensor, or a tuple of
    them (one per hidden state) for heads that read several layers."""
    def at(h):
        if index is None:
            return h[:, -1]
        if isinstance(index, slice):
            return h[:, index]
        rows = torch.arange(h.shape[0], device=h.device).view(-1, *([1] * (index.dim() - 1)))
        return h[rows, index]

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
    buffers behind the views grow by doubling, so a step appends its slots in place (amortized
    constant cost) instead of concatenating the whole table."""

    def __init__(self, valid: torch.Tensor, pos: torch.Tensor):
        B, S = valid.shape
        cap = max(2 * S, 16)
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

    def lookup(self, length: int, rows: list[bool], pin: bool = False) -> torch.Tensor | None:
        """``[B, length]`` int64 prompt-lookup drafts (-1 padded) for the rows flagged in ``rows``,
        or None when no flagged row has a match (host tensors only: no device access). ``pin``:
        in pinned memory, so that the copy to a GPU does not wait for the stream."""
        if length <= 0:
            return None
        found = [lookup_draft(self.row(b), length) if use else None for b, use in enumerate(rows)]
        if all(r is None for r in found):
            return None
        blank = torch.full((length,), -1, dtype=torch.long)
        drafts = torch.stack([r if r is not None else blank for r in found])
        return drafts.pin_memory() if pin else drafts


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, q, k]`` bool -> ``[B, 1, q, k]`` additive mask (0 / ``finfo(dtype).min``)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def sequence_mask(slots: SlotTable | None, new_valid: torch.Tensor, new_pos: torch.Tensor,
                  dtype: torch.dtype, window: int | None):
    """The additive mask of ``n`` new positions per row appended after the cache ``slots``
    (None: an empty cache): each attends to the valid cache slots and, causally, to the valid new
    positions. ``new_valid [B, n]`` bool, ``new_pos [B, n]`` int64 (position ids). Returns
    ``[B, 1, n, S + n]``, or with a sliding ``window`` the dict ``{"full_attention": ...,
    "sliding_attention": ...}`` whose second mask also hides keys ``window`` or more positions
    behind the query."""
    n = new_valid.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=new_valid.device).tril_()
    allowed = causal[None] & new_valid[:, None, :]
    key_pos = new_pos
    if slots is not None:
        S = slots.length
        allowed = torch.cat([slots.valid[:, None, :].expand(-1, n, S), allowed], 2)
        key_pos = torch.cat([slots.pos, new_pos], 1)
    full = _additive(allowed, dtype)
    if window is None:
        return full
    near = (new_pos[:, :, None] - key_pos[:, None, :]) < window
    return {"full_attention": full, "sliding_attention": _additive(allowed & near, dtype)}


class PointFeatures:
    """What heads that read one position draft from: their input (:func:`heads_input`) at the
    last accepted position of each row."""

    def at_prompt(self, heads: MTPHeads, out, slots: SlotTable):
        """After the prefill ``out`` over the prompt (``slots`` its cache slots)."""
        return heads_input(heads, out, None)

    def after_step(self, heads: MTPHeads, out, path: torch.Tensor, num_acc: torch.Tensor,
                   keep: int, slots: SlotTable, next_pos: torch.Tensor):
        """After a tree step: ``out`` the backbone over the tree, ``path [B, T]`` /
        ``num_acc [B]`` the verification, ``keep`` the slots each row adds, ``slots`` and
        ``next_pos`` the cache as it was before the step."""
        rows = torch.arange(path.shape[0], device=path.device)
        return heads_input(heads, out, path[rows, num_acc])


class SequenceFeatures:
    """``"transformer"`` heads, whose blocks attend over the sequence: one key/value cache per
    head (:class:`~mtp_ext.heads.TransformerDraftState`) mirrors the backbone's cache slot for
    slot, so the same validity (padding, rejected nodes) masks both. After each step the blocks
    run over the accepted path's positions (``keep`` per row, the invalid ones masked), and the
    heads draft from their outputs at the last accepted position: ``[B, H, D]``."""

    def __init__(self, heads: MTPHeads):
        self.state = heads.new_draft_state()
        self.window = heads.block_window

    def _blocks(self, heads, x, new_valid, new_pos, slots):
        mask = sequence_mask(slots, new_valid, new_pos, heads.param_dtype, self.window)
        return heads.block_outputs(x, position_ids=new_pos, state=self.state, attention_mask=mask)

    def at_prompt(self, heads: MTPHeads, out, slots: SlotTable):
        z = self._blocks(heads, heads_input(heads, out, slice(None)), slots.valid, slots.pos, None)
        return z[:, -1]

    def after_step(self, heads: MTPHeads, out, path: torch.Tensor, num_acc: torch.Tensor,
                   keep: int, slots: SlotTable, next_pos: torch.Tensor):
        kept = torch.arange(keep, device=path.device)[None]
        x = heads_input(heads, out, path[:, :keep].clamp(min=0))  # -1 past a row's path: masked
        z = self._blocks(heads, x, kept <= num_acc[:, None], next_pos[:, None] + kept, slots)
        return z[torch.arange(path.shape[0], device=path.device), num_acc]


def features_for(heads: MTPHeads):
    """:class:`SequenceFeatures` for ``"transformer"`` heads, else :class:`PointFeatures`."""
    return SequenceFeatures(heads) if heads.config.kind == "transformer" else PointFeatures()


@dataclasses.dataclass
class DecodeState:
    """Per-call decoding state: the model's key/value ``cache``; its ``slots``
    (:class:`SlotTable`); ``next_pos [B]`` int64, the position id of each row's root; ``root [B]``
    int64, the last accepted token; ``feature``, what the heads draft from at the position before
    the root; ``window``, the model's sliding window (None without sliding-attention layers);
    ``features``, how ``feature`` follows the steps (:func:`features_for`)."""

    cache: Any
    slots: SlotTable
    next_pos: torch.Tensor
    root: torch.Tensor
    feature: Any
    window: int | None
    features: Any = dataclasses.field(default_factory=PointFeatures)


def start_state(model, heads: MTPHeads, cache, prompt_out, valid: torch.Tensor,
                positions: torch.Tensor, root: torch.Tensor) -> DecodeState:
    """The state after the prompt: ``cache`` holds its keys and values and ``prompt_out`` is the
    model's output over it (every hidden state); ``valid [B, P]`` bool (False at padding),
    ``positions [B, P]`` int64 position ids, ``root [B]`` int64 the first new token."""
    slots = SlotTable(valid, positions)
    features = features_for(heads)
    return DecodeState(cache=cache, slots=slots, next_pos=valid.long().sum(1), root=root,
                       feature=features.at_prompt(heads, prompt_out, slots),
                       window=attention_window(model), features=features)


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
    tree: every layer ends ``prefix + keep`` long (``keep = max accepted + 1``). With ``keep = 1``
    only the roots stay, already in place (node 0), and nothing moves."""
    for layer in cache_layers(cache):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            prefix = t.shape[-2] - T
            if keep > 1:
                ops.compact_kv(t, path, num_accepted, prefix)
            setattr(layer, name, t[..., : prefix + keep, :])


def read_step(num_accepted: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], list[list[int]]]:
    """The step's one host synchronization: ``num_accepted [B]`` and ``tokens [B, T]`` (int64, on
    the device) read in one copy; returns the accepted counts and each row's emitted tokens."""
    rows = torch.cat([num_accepted[:, None], tokens], 1).tolist()
    return [r[0] for r in rows], [r[1 : r[0] + 2] for r in rows]


def run_step(model, heads: MTPHeads, state: DecodeState, spec: TreeSpec, settings, uniforms_fn, ops,
             branch: torch.Tensor | None = None, active: list[bool] | None = None) -> StepResult:
    """Drafts, runs and verifies one tree, compacts the cache and advances ``state``.

    Args:
        settings: the call's :class:`~mtp_ext.decoding.GenerationSettings` (``do_sample``,
            ``temperature``, ``top_k``, ``top_p``).
        uniforms_fn: ``shape -> uniforms`` on the model's device (sampling only).
        ops: the backend (``tree_attention_mask``, ``verify_tree``, ``verify_tree_from_hidden``,
            ``compact_kv``).
        branch: ``[B, K]`` int64 host tensor of extra drafts after each root (-1 padded), e.g.
            :meth:`HostContexts.lookup`'s, or None; added by :func:`~mtp_ext.trees.add_branch`.
        active: per row, whether it is still generating (None: all). Finished rows keep no more
            of their path than the longest kept by a live row, so they do not widen the cache.
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
    live = accepted if active is None else [a for a, on in zip(accepted, active) if on]
    keep = max(live or accepted) + 1
    verified = num_acc
    if keep <= max(accepted):  # a finished row accepted more: cut its path (no host read)
        num_acc = num_acc.clamp(max=keep - 1)
    compact_cache(state.cache, path, num_acc, T, keep, ops)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    kept = torch.arange(keep, device=tokens.device)[None]
    state.feature = state.features.after_step(heads, out, path, num_acc, keep, state.slots,
                                              state.next_pos)
    state.slots.append(kept <= num_acc[:, None], state.next_pos[:, None] + kept)
    state.next_pos = state.next_pos + num_acc + 1
    state.root = tokens[rows, num_acc]
    return StepResult(accepted, emitted, tree, verified, path)
