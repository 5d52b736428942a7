"""One step of tree decoding, the prefill that starts it, and the per-call state a step advances
(used by :mod:`mtp_ext.decoding` and, to time steps, by :mod:`mtp_ext.tree_tuning`).

A step drafts a tree with the heads, runs the backbone once over its ``T`` nodes on top of the
key/value cache, verifies it, reads the result on the host (the step's one host synchronization:
one ``[B, 1 + T]`` int64 copy) and compacts the cache to the accepted paths. Everything else stays
on the model's device; the per-slot bookkeeping lives in buffers that grow by doubling, and the
prompt-lookup contexts live in host buffers filled from what the host already read.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from .cpu_linear import fast_cpu
from .growing import GrowingColumns
from .hf_compat import cache_kwarg, cache_layers, last_logits_kwarg
from .heads import MTPHeads
from .heads.base import PointFeatures
from .trees import DraftTree, TreeSpec, add_branch, build_tree, lookup_draft, root_tree

__all__ = ["DecodeState", "SlotTable", "HostContexts", "StepResult", "start_state", "prefill",
           "step_linears", "run_step", "verify_step", "plain_step", "read_step", "tree_mask",
           "compact_cache", "backbone", "logits_from_hidden", "rounds_logits", "attention_window"]


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


def rounds_logits(hidden: torch.Tensor) -> bool:
    """Whether greedy verification reads the model's own logits rather than the fused float32
    argmax of :func:`~mtp_ext.ops.verify_tree_from_hidden`: for 16-bit hidden states. A bfloat16
    or float16 model's output layer rounds its logits to 8 or 11 significant bits, so the top two
    logits may tie after rounding, and ``model.generate`` takes the first of them. Measured on
    SmolLM2-135M in bfloat16, 27 prompts, 64 new tokens, answers identical to ``model.generate``'s:
    with a fixed 6-node tree 11 (rounded logits) against 10 (float32 argmax); with torch's linear
    kernels and 1-node tree steps 14 against 11. The rest of the difference comes from the
    kernels' summation orders, which move bfloat16 roundings inside the backbone. Writing
    ``[B, T, V]`` 16-bit logits costs little next to streaming the output layer."""
    return hidden.dtype in (torch.bfloat16, torch.float16)


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
    buffers behind the views grow by doubling (:class:`~mtp_ext.growing.GrowingColumns`), so a
    step appends its slots in place (amortized constant cost) instead of concatenating the whole
    table."""

    def __init__(self, valid: torch.Tensor, pos: torch.Tensor):
        self._cols = GrowingColumns(min_capacity=max(2 * valid.shape[1], 16))
        self._cols.append(valid=valid, pos=pos)

    @property
    def length(self) -> int:
        return self._cols.length

    @property
    def capacity(self) -> int:
        """Columns allocated behind the views."""
        return self._cols.capacity

    @property
    def valid(self) -> torch.Tensor:
        return self._cols["valid"]

    @property
    def pos(self) -> torch.Tensor:
        return self._cols["pos"]

    def append(self, valid: torch.Tensor, pos: torch.Tensor) -> None:
        """Adds ``n`` slots per row: ``valid [B, n]`` bool, ``pos [B, n]`` int64."""
        self._cols.append(valid=valid, pos=pos)


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


@dataclasses.dataclass
class DecodeState:
    """Per-call decoding state: the model's key/value ``cache``; its ``slots``
    (:class:`SlotTable`); ``next_pos [B]`` int64, the position id of each row's root; ``root [B]``
    int64, the last accepted token; ``feature``, what the heads draft from at the position before
    the root; ``window``, the model's sliding window (None without sliding-attention layers);
    ``features``, how ``feature`` follows the steps (:meth:`MTPHeads.decode_features`); ``dense``,
    True when every cache slot is valid and holds the position of its index (one unpadded row:
    tree steps keep exactly the accepted path), so that a plain step needs no attention mask."""

    cache: Any
    slots: SlotTable
    next_pos: torch.Tensor
    root: torch.Tensor
    feature: Any
    window: int | None
    features: Any = dataclasses.field(default_factory=PointFeatures)
    dense: bool = False


def start_state(model, heads: MTPHeads, cache, prompt_out, valid: torch.Tensor,
                positions: torch.Tensor, root: torch.Tensor, dense: bool = False,
                input_ids: torch.Tensor | None = None) -> DecodeState:
    """The state after the prompt: ``cache`` holds its keys and values and ``prompt_out`` is the
    model's output over it (every hidden state); ``valid [B, P]`` bool (False at padding),
    ``positions [B, P]`` int64 position ids, ``root [B]`` int64 the first new token; ``dense``:
    one row without padding (see :class:`DecodeState`); ``input_ids [B, P]`` int64 the prompt
    (heads that read the token after each position need it)."""
    slots = SlotTable(valid, positions)
    features = heads.decode_features()
    nxt = None if input_ids is None else torch.cat([input_ids[:, 1:], root[:, None]], 1)
    return DecodeState(cache=cache, slots=slots, next_pos=valid.long().sum(1), root=root,
                       feature=features.at_prompt(heads, prompt_out, slots, nxt),
                       window=attention_window(model), features=features, dense=dense)


def prefill(model, heads: MTPHeads, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            settings, uniforms_fn, ops) -> tuple[DecodeState, torch.Tensor]:
    """Runs the prompt as ``model.generate`` does (the output layer on the last position only,
    where the model allows it) and picks the first new token: a one-node "tree" verified on the
    prompt's last logits (greedy, or sampled with ``uniforms_fn``'s uniforms).

    Args:
        input_ids, attention_mask: ``[B, P]`` int64 prompts (left-padded) and their mask.
        settings: the call's :class:`~mtp_ext.settings.GenerationSettings`.
        uniforms_fn: ``shape -> uniforms`` on the model's device (sampling only).
        ops: the backend (``verify_tree``).
    Returns:
        ``(state, first [B] int64)``: the state before the first tree step (its root is the
        first token) and the first token on the device.
    """
    from transformers import DynamicCache

    B = input_ids.shape[0]
    cache = DynamicCache()
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    out = model(
        input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
        output_hidden_states=True, **cache_kwarg(model, cache), **last_logits_kwarg(model),
    )
    first = _next_token(out.logits[:, -1], settings, uniforms_fn, ops)
    dense = B == 1 and bool(attention_mask.bool().all())
    state = start_state(model, heads, cache, out, attention_mask.bool(), pos, first, dense,
                        input_ids)
    return state, first


def _next_token(logits: torch.Tensor, settings, uniforms_fn, ops) -> torch.Tensor:
    """``[B]`` int64, the token after ``logits [B, V]``: a one-node "tree" verified on them
    (greedy, or sampled with ``uniforms_fn``'s uniforms)."""
    B, device = logits.shape[0], logits.device
    root_draft = torch.full((B, 1), -1, dtype=torch.long, device=device)
    parents = torch.full((1,), -1, dtype=torch.long, device=device)
    _, tokens, _ = ops.verify_tree(root_draft, parents, logits[:, None],
                                   *_sampling(settings, uniforms_fn, (B, 1)))
    return tokens[:, 0]


def _sampling(settings, uniforms_fn, shape) -> tuple:
    """``verify_tree``'s ``(temperature, top_k, top_p, uniforms)`` for nodes of ``shape``: the
    call's settings with ``uniforms_fn``'s uniforms, or greedy (the sampling settings ignored,
    as ``model.generate`` ignores them)."""
    if settings.do_sample:
        return settings.temperature, settings.top_k, settings.top_p, uniforms_fn(shape)
    return 0.0, 0, 1.0, None


def step_linears(model, device: torch.device):
    """The context that tree steps run in: on CPU the backbone's linear layers swapped for
    small-row kernels (:func:`mtp_ext.fast_cpu`), which is what makes a tree of a few nodes cost
    about one plain step there; elsewhere nothing."""
    return fast_cpu(model) if torch.device(device).type == "cpu" else contextlib.nullcontext()


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
    return verify_step(model, heads, state, tree, settings, uniforms_fn, ops, branch, active)


def verify_step(model, heads: MTPHeads, state: DecodeState, tree: DraftTree, settings, uniforms_fn,
                ops, branch: torch.Tensor | None = None,
                active: list[bool] | None = None) -> StepResult:
    """The rest of :func:`run_step` once the tree is drafted: adds ``branch``, runs the backbone
    over the tree, verifies it, compacts the cache and advances ``state``."""
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
    if settings.do_sample or rounds_logits(hidden):
        num_acc, tokens, path = ops.verify_tree(
            tree.tokens, tree.parents, logits_from_hidden(model, hidden),
            *_sampling(settings, uniforms_fn, tree.tokens.shape),
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
    if keep != max(accepted) + 1 or min(accepted) != max(accepted):
        state.dense = False  # rows keep paths of different lengths: the cache gets holes
    compact_cache(state.cache, path, num_acc, T, keep, ops)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    kept = torch.arange(keep, device=tokens.device)[None]
    state.feature = state.features.after_step(heads, out, path, num_acc, keep, state.slots,
                                              state.next_pos, tokens)
    state.slots.append(kept <= num_acc[:, None], state.next_pos[:, None] + kept)
    state.next_pos = state.next_pos + num_acc + 1
    state.root = tokens[rows, num_acc]
    return StepResult(accepted, emitted, tree, verified, path)


def plain_step(model, heads: MTPHeads, state: DecodeState, settings, uniforms_fn, ops) -> StepResult:
    """One token per row, as a step of ``model.generate`` makes it: the backbone over the roots
    alone (no draft, no tree mask where the cache is dense: the model masks causally itself),
    the output layer on that position, then an argmax (greedy) or one sample (the 1-node
    :func:`verify_tree` the prefill uses). Keeps the state as a tree step of one node would, so
    the next step may draft again.

    Returns:
        a :class:`StepResult` with ``accepted`` all 0 and ``tree`` the one-node tree of roots.
    """
    B = state.root.shape[0]
    dev = state.root.device
    pos = state.next_pos[:, None]
    tree = root_tree(state.root)
    mask = None
    if not state.dense:
        mask, _ = tree_mask(state, tree.parents, heads.lm_head_weight.dtype, ops)
    base = backbone(model)
    out = base(
        state.root[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
        output_hidden_states=not heads.config.reads_last, **cache_kwarg(base, state.cache),
    )
    hidden = out.last_hidden_state[:, -1]  # [B, D]
    zeros = torch.zeros(B, dtype=torch.long, device=dev)
    path = zeros[:, None]
    if settings.do_sample:
        token = _next_token(logits_from_hidden(model, hidden), settings, uniforms_fn, ops)
    else:  # soft-capping does not move the argmax
        token = model.get_output_embeddings()(hidden).argmax(-1)
    emitted = [[t] for t in token.tolist()]
    state.feature = state.features.after_step(heads, out, path, zeros, 1, state.slots,
                                              state.next_pos, token[:, None])
    state.slots.append(torch.ones(B, 1, dtype=torch.bool, device=dev), pos)
    state.next_pos = state.next_pos + 1
    state.root = token
    return StepResult([0] * B, emitted, tree, zeros, path)
