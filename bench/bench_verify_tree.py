"""verify_tree: C++ kernel vs the reference (target tokens in torch, then a Python walk of the
tree) vs torch.compile(reference) (graph breaks at the walk; no fullgraph) vs plain torch with the
walk vectorized over the batch (one step per tree depth).

Trees are Medusa-like: the T - 1 most likely paths of top-k candidates per depth (T = 16 or 64
nodes, root included); the drafts are planted so that a few levels are accepted."""

from __future__ import annotations

import functools
import heapq

import pytest
import torch

from benchlib import assert_equal, cases, compiled, ops
from benchlib import reference as ref
from benchlib import run, shapes

SAMPLING = dict(temperature=0.7, top_k=0, top_p=0.9)
SHAPES = {
    "greedy": shapes(
        full=[dict(V=v, B=b, T=t) for v in (49152, 151936) for b, t in ((1, 16), (1, 64), (8, 64))],
        small=[dict(V=1000, B=4, T=16)],
    ),
    "sampling": shapes(
        full=[dict(V=v, B=b, T=t) for v in (49152, 151936) for b, t in ((1, 64), (8, 64))],
        small=[dict(V=1000, B=4, T=16)],
    ),
}


def medusa_tree(num_nodes: int, depth: int = 5, topk: int = 10) -> list[int]:
    """``parents`` of a Medusa-style sparse tree with ``num_nodes`` nodes (root included).

    A node is a path of candidate ranks (r_1, ..., r_d); its score is the product of per-depth
    acceptance rates ``0.7 ** (d - 1) * 0.5 ** r``. The ``num_nodes - 1`` best paths form a
    prefix-closed tree (scores shrink along a path), ordered by depth then ranks so that every
    parent comes before its children, as Medusa orders its ``medusa_choices``.
    """

    def score(path):
        s = 1.0
        for d, r in enumerate(path):
            s *= 0.7**d * 0.5**r
        return s

    chosen, heap = [], [(-score((r,)), (r,)) for r in range(topk)]
    heapq.heapify(heap)
    while len(chosen) < num_nodes - 1:
        _, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < depth:
            for r in range(topk):
                heapq.heappush(heap, (-score(path + (r,)), path + (r,)))
    chosen.sort(key=lambda p: (len(p), p))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(chosen)}
    return [-1] + [index[p[:-1]] for p in chosen]


def verify_tree_torch(draft_tokens, parents, target_logits, temperature=0.0, top_k=0, top_p=1.0,
                      uniforms=None):
    """Plain torch: targets (argmax, or the reference's sampling), then a walk vectorized over the
    batch: one step per tree depth, each picking the lowest-index matching child of every row."""
    if temperature == 0.0:
        y = target_logits.argmax(-1)  # first maximal index: ties toward the lower id
    else:
        y = ref.target_tokens(target_logits, temperature, top_k, top_p, uniforms)
    b, t = draft_tokens.shape
    par = parents.expand(b, t)
    valid = (draft_tokens >= 0) & (draft_tokens < target_logits.shape[-1])
    match = valid & (draft_tokens == y.gather(1, par.clamp(min=0)))
    match[:, 0] = False
    idx = torch.arange(t)
    rows = torch.arange(b)
    node = torch.zeros(b, dtype=torch.long)
    num = torch.zeros(b, dtype=torch.long)
    tokens = torch.full((b, t), -1, dtype=torch.long)
    path = torch.full((b, t), -1, dtype=torch.long)
    path[:, 0] = 0
    for step in range(1, t):
        cand = match & (par == node.unsqueeze(1))
        nxt = torch.where(cand, idx, t).amin(1)
        has = nxt < t
        if not bool(has.any()):
            break
        r = rows[has]
        path[r, step] = nxt[has]
        tokens[r, step - 1] = draft_tokens[r, nxt[has]]
        node = torch.where(has, nxt, node)
        num += has
        match &= has.unsqueeze(1)  # rows that stopped stay stopped
    tokens[rows, num] = y[rows, node]
    return num, tokens, path


IMPL_FNS = {
    "kernel": ops.verify_tree,
    "reference": ref.verify_tree,
    "compiled": compiled(ref.verify_tree),
    "baseline": verify_tree_torch,
}


@functools.lru_cache(maxsize=1)
def setup(variant, V, B, T):
    gen = torch.Generator().manual_seed(0)
    parents = torch.tensor(medusa_tree(T), dtype=torch.long)
    target_logits = torch.randn(B, T, V, generator=gen) * 3.0
    kwargs = dict(SAMPLING) if variant == "sampling" else {}
    if kwargs:
        kwargs["uniforms"] = torch.rand(B, T, generator=gen)
    y = ref.target_tokens(target_logits, **kwargs)
    # random drafts, except the first-ranked child of each node on the first levels, which gets
    # its parent's target token: the walk accepts a few nodes, as a working draft would.
    draft = torch.randint(0, V, (B, T), generator=gen)
    depth = [0] * T
    first_child = set()
    for c in range(1, T):
        p = int(parents[c])
        depth[c] = depth[p] + 1
        if p not in {int(parents[x]) for x in first_child}:
            first_child.add(c)
    for c in sorted(first_child):
        if depth[c] <= 3:
            draft[:, c] = y[:, int(parents[c])]
    draft[:, 0] = -1  # the root is the last accepted token, never compared
    args = (draft, parents, target_logits, kwargs.get("temperature", 0.0), kwargs.get("top_k", 0),
            kwargs.get("top_p", 1.0), kwargs.get("uniforms"))
    return args, ref.verify_tree(*args)


def _test(benchmark, variant, shape, impl):
    args, (ref_num, ref_tokens, ref_path) = setup(variant, **shape)
    assert int(ref_num.min()) >= 1, "the planted drafts should be accepted"

    def check(out):
        num, tokens, path = out
        assert_equal(num, ref_num, f"{impl} num_accepted")
        assert_equal(tokens, ref_tokens, f"{impl} tokens")
        assert_equal(path, ref_path, f"{impl} path")

    run(benchmark, op="verify_tree", variant=variant, shape=shape, impl=impl, fn=IMPL_FNS[impl],
        args=args, check=check)


@pytest.mark.parametrize("shape,impl", cases(SHAPES["greedy"]))
def test_verify_tree_greedy(benchmark, shape, impl):
    _test(benchmark, "greedy", shape, impl)


@pytest.mark.parametrize("shape,impl", cases(SHAPES["sampling"]))
def test_verify_tree_sampling(benchmark, shape, impl):
    _test(benchmark, "sampling", shape, impl)
