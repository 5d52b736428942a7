"""Draft trees from MTP heads (``mtp_ext.trees``).

A draft tree has ``T`` nodes per batch row. Node 0 is the root: the last token already accepted
(the token at position ``t + 1``, whose key/value entry is not cached yet). A node at depth ``d``
carries a drafted token for position ``t + 1 + d``; head ``d`` drafts it. Trees come out in
topological order (``parents[b, i] < i``, ``parents[b, 0] = -1``, nodes sorted by depth), which is
what :func:`mtp_ext.ops.tree_attention_mask` and :func:`mtp_ext.ops.verify_tree` take.

Three shapes (all built with one call of :meth:`MTPHeads.draft_step` per depth, batched over rows
and nodes, never a Python loop over nodes):

- :class:`StaticTree`: a fixed set of paths of top-k ranks (Medusa's "choices"): ``(0,)`` is the
  top-1 child of the root, ``(0, 1)`` the second-best child of that node, and so on. With
  conditioned heads, the children of a node are drafted *given that node's token* (a
  parent-dependent tree); with independent heads every node of a depth gets the same candidates.
- :func:`chain`: a static tree of one path, the top-1 of every head.
- :class:`DynamicTree`: at every depth the ``width`` best nodes so far (by joint draft
  log-probability, the sum over the path) get ``width`` children each; then the ``size - 1`` best
  nodes overall are kept. A node's joint log-probability is never above its parent's, so the kept
  set always contains every kept node's ancestors.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import torch

from .heads import MTPHeads

__all__ = [
    "DraftTree", "StaticTree", "DynamicTree", "chain", "build_tree", "TreeSpec", "lookup_draft",
    "add_branch", "DraftPool", "draft_pool", "root_tree",
]


@dataclasses.dataclass
class DraftTree:
    """A batch of draft trees.

    Attributes:
        tokens: ``[B, T]`` int64, ``tokens[:, 0]`` the root tokens.
        parents: ``[B, T]`` int64, ``parents[:, 0] = -1``, ``parents[b, i] < i``.
        depths: ``[B, T]`` int64 (root 0).
        scores: ``[B, T]`` float32, the joint draft log-probability of each node's path (root 0).
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.tokens.shape[1])


class StaticTree:
    """A fixed tree given as paths of ranks (each path a tuple of 0-based top-k ranks, one per
    depth). Every prefix of a path must be a path too (the empty path, the root, is implicit).

    Args:
        paths: e.g. ``[(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]``.
    """

    def __init__(self, paths: Sequence[Sequence[int]]):
        norm = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        if any(len(p) == 0 for p in norm):
            raise ValueError("paths must not contain the empty path (the root is implicit)")
        if any(r < 0 for p in norm for r in p):
            raise ValueError("path ranks must be >= 0")
        index = {(): 0}
        for i, p in enumerate(norm, start=1):
            if p[:-1] not in index:
                raise ValueError(f"path {p} has no parent path {p[:-1]} in the tree")
            index[p] = i
        self.paths: list[tuple[int, ...]] = norm
        self.parents = torch.tensor([-1] + [index[p[:-1]] for p in norm], dtype=torch.long)
        self.depths = torch.tensor([0] + [len(p) for p in norm], dtype=torch.long)
        self.ranks = torch.tensor([0] + [p[-1] for p in norm], dtype=torch.long)

        # Per depth, computed once on the host (no device synchronization while drafting):
        # (children, their parents, the parents sorted and unique, each child's parent's slot in
        # that list, the children's ranks, the number of children to draft per parent).
        self._levels = []
        for d in range(1, self.max_depth + 1):
            children = torch.nonzero(self.depths == d).flatten()
            par = self.parents[children]
            expanded = torch.unique(par)
            slot = torch.searchsorted(expanded, par)
            r = self.ranks[children]
            self._levels.append((children, par, expanded, slot, r, int(r.max()) + 1))
        self._device_levels: dict = {}

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list]:
        """``(parents [T], depths [T], levels)`` on ``device``, copied once per device (drafting
        then copies nothing from the host); ``levels`` holds the per-depth index tensors."""
        key = str(device)
        if key not in self._device_levels:
            self._device_levels[key] = (
                self.parents.to(device),
                self.depths.to(device),
                [tuple(t.to(device) for t in lvl[:5]) + (lvl[5],) for lvl in self._levels],
            )
        return self._device_levels[key]

    @property
    def size(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def __repr__(self) -> str:
        return f"StaticTree(size={self.size}, depth={self.max_depth})"


def chain(depth: int) -> StaticTree:
    """A single path of ``depth`` top-1 drafts (``depth + 1`` nodes with the root)."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return StaticTree([(0,) * d for d in range(1, depth + 1)])


@dataclasses.dataclass(frozen=True)
class DynamicTree:
    """Expand the ``width`` best nodes per depth by ``width`` children each, up to ``max_depth``
    (default: every head), then keep the ``size`` best nodes (root included)."""

    size: int
    width: int = 4
    max_depth: int | None = None

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.max_depth is not None and self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")


TreeSpec = Union[StaticTree, DynamicTree]


def _expand(heads: MTPHeads, depth: int, feats, toks, k: int):
    """Children of ``P`` nodes per row: ``feats [B, P, D]`` (the features the nodes' parents
    produced), ``toks [B, P]`` the nodes' tokens; returns the nodes' own features ``[B, P, D]`` and
    their top-``k`` children ``(logprobs [B, P, k], ids [B, P, k])``."""
    B, P, D = feats.shape
    f, lp, ids = heads.draft_step(depth, feats.reshape(B * P, D), toks.reshape(B * P), k)
    return f.view(B, P, D), lp.view(B, P, k), ids.view(B, P, k)


def _build_static(heads: MTPHeads, x: torch.Tensor, root: torch.Tensor, spec: StaticTree) -> DraftTree:
    B, D = x.shape
    T = spec.size
    dev = x.device
    parents, depths, levels = spec.on_device(dev)
    tokens = torch.empty(B, T, dtype=torch.long, device=dev)
    scores = torch.zeros(B, T, dtype=torch.float32, device=dev)
    tokens[:, 0] = root
    # in_feat[:, i]: the feature node i's parent produced (the heads' input for the root).
    in_feat = x.new_empty(B, T, D)
    in_feat[:, 0] = x
    H = heads.config.num_heads
    if spec.max_depth > H:
        raise ValueError(f"the tree is {spec.max_depth} deep but the heads draft only {H} tokens")
    for d, (children, par, expanded, slot, r, k) in enumerate(levels, start=1):
        f, lp, ids = _expand(heads, d, in_feat[:, expanded], tokens[:, expanded], k)
        tokens[:, children] = ids[:, slot, r]
        scores[:, children] = scores[:, par] + lp[:, slot, r]
        in_feat[:, children] = f[:, slot]
    return DraftTree(tokens, parents.expand(B, T).clone(), depths.expand(B, T).clone(), scores)


def _repeat_each(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x [B, P, ...]`` with each of the ``P`` entries repeated ``n`` times: ``[B, P * n, ...]``
    (``repeat_interleave(n, 1)`` without its possible host synchronization on CUDA)."""
    B, P = x.shape[:2]
    return x.unsqueeze(2).expand(B, P, n, *x.shape[2:]).reshape(B, P * n, *x.shape[2:])


@dataclasses.dataclass
class DraftPool:
    """The candidates a :class:`DynamicTree` is cut from, before the cut: ``C`` pool nodes per row
    (index 0 the root) with their ``tokens``, ``parents`` (pool indices), ``depths`` and joint
    draft log-probabilities ``scores`` (all ``[B, C]``), and ``ranked [B, C]`` int64, the pool
    indices in selection order (by score, then depth, then pool index; the root first). The
    dynamic tree of size ``T`` is the first ``T`` of ``ranked`` (:meth:`select`), so the trees of
    every size come from one pool, and drafting costs the same whatever size is cut."""

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    scores: torch.Tensor
    ranked: torch.Tensor

    @property
    def capacity(self) -> int:
        """``C``, the largest tree the pool holds."""
        return int(self.tokens.shape[1])

    def ranked_nodes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B, n] float32, depths [B, n] int64)`` of the first ``n`` nodes in selection
        order (``n`` at most :attr:`capacity`)."""
        order = self.ranked[:, :n]
        return self.scores.gather(1, order), self.depths.gather(1, order)

    def select(self, size: int) -> DraftTree:
        """The dynamic tree of the ``min(size, C)`` best nodes, in topological order."""
        B, C = self.tokens.shape
        dev = self.tokens.device
        T = max(1, min(int(size), C))
        order = self.ranked[:, :T]
        # Topological order of the kept nodes: by depth, then pool index.
        rank = self.depths.gather(1, order) * C + order
        order = order.gather(1, torch.sort(rank, dim=1).indices)
        # Re-index parents into the kept order.
        new_index = torch.full((B, C), -1, dtype=torch.long, device=dev)
        new_index.scatter_(1, order, torch.arange(T, device=dev).expand(B, T))
        old_par = self.parents.gather(1, order)
        parents = torch.where(old_par < 0, old_par, new_index.gather(1, old_par.clamp(min=0)))
        # Every kept node's parent is kept (scores never rise along a path, and ties go to the
        # shallower node), so no parent index is -1 past the root: tests check it (no device sync).
        return DraftTree(self.tokens.gather(1, order), parents, self.depths.gather(1, order),
                         self.scores.gather(1, order))


def draft_pool(heads: MTPHeads, x: torch.Tensor, root: torch.Tensor, width: int,
               max_depth: int | None = None) -> DraftPool:
    """The candidate pool of a dynamic tree (:class:`DraftPool`): at every depth the ``width``
    best nodes so far get ``width`` children each, up to ``max_depth`` (default: every head).

    Args:
        x: ``[B, D]`` what the heads draft from (:meth:`MTPHeads.draft_input`).
        root: ``[B]`` int64 root tokens.
    """
    B, D = x.shape
    dev = x.device
    W = width
    max_depth = heads.config.num_heads if max_depth is None else max_depth
    if max_depth > heads.config.num_heads:
        raise ValueError(
            f"max_depth={max_depth} but the heads draft only {heads.config.num_heads} tokens"
        )
    n_vocab = heads.config.draft_vocab_size or heads.config.vocab_size
    W = min(W, n_vocab)
    # Candidate pool, grown one depth at a time: index 0 is the root.
    tok = [root.view(B, 1)]
    par = [torch.full((B, 1), -1, dtype=torch.long, device=dev)]
    score = [torch.zeros(B, 1, dtype=torch.float32, device=dev)]
    depth = [torch.zeros(B, 1, dtype=torch.long, device=dev)]
    feat = [x.view(B, 1, D)]
    frontier = torch.zeros(B, 1, dtype=torch.long, device=dev)  # pool indices at depth d - 1
    for d in range(1, max_depth + 1):
        pool_tok = torch.cat(tok, 1)
        pool_feat = torch.cat(feat, 1)
        f_tok = pool_tok.gather(1, frontier)
        f_feat = pool_feat.gather(1, frontier[..., None].expand(-1, -1, D))
        f_score = torch.cat(score, 1).gather(1, frontier)
        own, lp, ids = _expand(heads, d, f_feat, f_tok, W)
        P = frontier.shape[1]
        tok.append(ids.reshape(B, P * W))
        par.append(_repeat_each(frontier, W))
        new_score = (f_score[..., None] + lp).reshape(B, P * W)
        score.append(new_score)
        depth.append(torch.full((B, P * W), d, dtype=torch.long, device=dev))
        feat.append(_repeat_each(own, W))
        base = sum(t.shape[1] for t in tok[:-1])
        # Next frontier: the W best of this depth (ties: lower pool index first).
        keep = min(W, P * W)
        order = torch.sort(-new_score, dim=1, stable=True).indices[:, :keep]
        frontier = base + order
    tok, par, score, depth = (torch.cat(a, 1) for a in (tok, par, score, depth))
    # Selection order: by score, then depth (a parent before a child of equal score; the root,
    # score 0 and depth 0, always first), then pool index. Two stable sorts, the last key first.
    order = torch.sort(depth, dim=1, stable=True).indices
    order = order.gather(1, torch.sort(-score.gather(1, order), dim=1, stable=True).indices)
    return DraftPool(tok, par, depth, score, order)


def root_tree(root: torch.Tensor) -> DraftTree:
    """The tree of the roots alone (``root [B]`` int64): one node per row, nothing drafted."""
    B = root.shape[0]
    z = torch.zeros(B, 1, dtype=torch.long, device=root.device)
    return DraftTree(root.view(B, 1).clone(), z - 1, z, torch.zeros(B, 1, device=root.device))


def _build_dynamic(heads: MTPHeads, x: torch.Tensor, root: torch.Tensor, spec: DynamicTree) -> DraftTree:
    if spec.size <= 1:  # the root alone: nothing to draft
        if spec.max_depth is not None and spec.max_depth > heads.config.num_heads:
            raise ValueError(f"max_depth={spec.max_depth} but the heads draft only "
                             f"{heads.config.num_heads} tokens")
        return root_tree(root)
    return draft_pool(heads, x, root, spec.width, spec.max_depth).select(spec.size)


@torch.no_grad()
def build_tree(
    heads: MTPHeads, hidden_states, root_tokens: torch.Tensor, spec: TreeSpec
) -> DraftTree:
    """Draft trees for a batch of rows.

    Args:
        heads: trained :class:`MTPHeads`.
        hidden_states: what the heads read at the position before the root, for each row: the
            backbone's ``hidden_states`` tuple with each element ``[B, D]``, or one ``[B, D]``
            tensor for heads reading one layer. ``"transformer"`` heads: their blocks' outputs
            there, ``[B, H, D]`` (:meth:`MTPHeads.block_outputs` at that position).
        root_tokens: ``[B]`` int64, the last accepted token of each row (the root).
        spec: a :class:`StaticTree` or :class:`DynamicTree`.
    Returns:
        a :class:`DraftTree` with ``T = spec.size`` nodes per row (fewer for a dynamic tree whose
        expansions hold fewer candidates).
    """
    x = heads.draft_input(hidden_states)
    if x.dim() != 2:
        raise ValueError(f"hidden states must be [B, D] (one position per row), got {list(x.shape)}")
    if root_tokens.dtype != torch.long or tuple(root_tokens.shape) != (x.shape[0],):
        raise ValueError(
            f"root_tokens must be int64 of shape [{x.shape[0]}], got {root_tokens.dtype} "
            f"{list(root_tokens.shape)}"
        )
    if isinstance(spec, StaticTree):
        return _build_static(heads, x, root_tokens, spec)
    if isinstance(spec, DynamicTree):
        return _build_dynamic(heads, x, root_tokens, spec)
    raise TypeError(f"spec must be a StaticTree or DynamicTree, got {type(spec).__name__}")


def lookup_draft(context: torch.Tensor, length: int, max_ngram: int = 3) -> torch.Tensor | None:
    """Prompt-lookup drafting for one row: the ``length`` tokens that followed the most recent
    earlier occurrence of the context's last ``n``-gram (``n = max_ngram .. 1``, longest first).

    Args:
        context: ``[L]`` int64, the row's tokens so far (prompt and generated; the last one is the
            root of the next tree).
    Returns:
        ``[length]`` int64 (-1 where the context ends first), or None without a match.
    """
    L = context.numel()
    for n in range(min(max_ngram, L - 1), 0, -1):
        windows = context.unfold(0, n, 1)[:-1]  # every earlier n-gram, by start
        hits = (windows == context[L - n :]).all(1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            follow = context[start : start + length]
            out = context.new_full((length,), -1)
            out[: follow.numel()] = follow
            return out
    return None


def add_branch(tree: DraftTree, branch: torch.Tensor) -> DraftTree:
    """``tree`` with ``K`` more nodes that draft ``branch [B, K]`` int64 after each row's root
    (e.g. :func:`lookup_draft` rows; -1 entries never match the target, and a chain stops
    being accepted there). The branch's scores are 0 (it is not a head draft).

    The branch shares its prefix with the tree: the deepest node whose path from the root spells
    the branch's first ``k`` tokens gets the other ``K - k`` as a chain, followed by ``k`` nodes
    of -1. Chained under the root instead, the branch would never be followed when its first
    token is also a head's draft: verification follows the lowest-index child that matches.
    """
    B, T = tree.tokens.shape
    K = branch.shape[1]
    dev = tree.tokens.device
    # From pinned host memory (HostContexts.lookup(pin=True)) the copy is queued on the stream
    # instead of waiting for it; from pageable memory non_blocking changes nothing.
    branch = branch.to(dev, non_blocking=True)
    attach = _deepest_prefix_node(tree, branch)  # [B]
    shared = tree.depths.gather(1, attach[:, None])  # [B, 1]: branch tokens already in the tree
    steps = torch.arange(K, dtype=torch.long, device=dev)
    src = shared + steps  # [B, K]
    rest = branch.gather(1, src.clamp(max=K - 1)).masked_fill(src >= K, -1)
    par = torch.cat([attach[:, None], (T + steps[:-1]).expand(B, K - 1)], 1)
    return DraftTree(
        torch.cat([tree.tokens, rest], 1),
        torch.cat([tree.parents, par], 1),
        torch.cat([tree.depths, shared + 1 + steps], 1),
        torch.cat([tree.scores, tree.scores.new_zeros(B, K)], 1),
    )


def _deepest_prefix_node(tree: DraftTree, branch: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: per row, the deepest node whose path from the root spells a prefix of
    ``branch [B, K]`` (the root, 0, when none does). Pointer jumping over the parents: no loop
    over the nodes, ceil(log2 T) rounds."""
    K = branch.shape[1]
    depth = tree.depths
    own = tree.tokens == branch.gather(1, (depth - 1).clamp(0, K - 1))
    ok = (own & (depth >= 1) & (depth <= K)) | (depth == 0)
    up = tree.parents.clamp(min=0)  # the root is its own parent
    for _ in range(max(1, (tree.size - 1).bit_length())):
        ok = ok & ok.gather(1, up)
        up = up.gather(1, up)
    return torch.where(ok, depth, -1).argmax(1)
