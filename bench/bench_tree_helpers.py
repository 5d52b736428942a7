"""Tree helpers: tree_attention_mask and compact_kv, C++ kernels vs reference (Python loops) vs
torch.compile(reference) (graph breaks at the loops; no fullgraph) vs plain torch vectorized
(the mask by walking all nodes' ancestors at once, one step per depth; compact_kv as one gather
and one masked copy)."""

from __future__ import annotations

import functools

import pytest
import torch

from bench_verify_tree import medusa_tree
from benchlib import assert_equal, cases, compiled, ops
from benchlib import reference as ref
from benchlib import run, shapes

# The mask for one shared tree (B="shared": parents [T]) and per-row trees (parents [B, T]) placed
# after `prefix` cached tokens.
MASK_SHAPES = shapes(
    full=[dict(B=b, T=t, prefix=p) for b in ("shared", 8) for t in (16, 64) for p in (0, 2048)],
    small=[dict(B=b, T=16, prefix=32) for b in ("shared", 2)],
)
# KV cache [B, heads, prefix + T, head_dim] of one layer (8 KV heads of 128, as in 7-8B models).
KV_SHAPES = shapes(
    full=[dict(B=b, heads=8, head_dim=128, prefix=2048, T=t) for b in (1, 8) for t in (16, 64)],
    small=[dict(B=4, heads=2, head_dim=16, prefix=32, T=16)],
)


def tree_attention_mask_torch(parents, prefix_len, dtype=torch.float32):
    """Plain torch: every node's ancestor set at once, one step up the tree per iteration."""
    t = parents.shape[-1]
    visible = torch.eye(t, dtype=torch.bool).expand(*parents.shape, t).clone()
    depth = torch.zeros_like(parents)
    cur = parents.clone()
    cols = torch.arange(t)
    for _ in range(t - 1):
        up = cur >= 0
        if not bool(up.any()):
            break
        visible |= (cols == cur.unsqueeze(-1)) & up.unsqueeze(-1)
        depth += up
        cur = torch.where(up, parents.gather(-1, cur.clamp(min=0)), -1)
    mask = torch.zeros((*parents.shape, prefix_len + t), dtype=dtype)
    mask[..., prefix_len:].masked_fill_(~visible, torch.finfo(dtype).min)
    return mask, depth


def compact_kv_torch(cache, path, num_accepted, prefix_len):
    """Plain torch: gather the accepted entries, then one masked copy into place."""
    b, h, _, d = cache.shape
    t = path.shape[1]
    keep = torch.arange(t).unsqueeze(0) <= num_accepted.unsqueeze(1)  # [B, T]
    src = (prefix_len + path.clamp(min=0)).view(b, 1, t, 1).expand(b, h, t, d)
    moved = cache.gather(2, src)
    dst = cache[:, :, prefix_len:prefix_len + t]
    dst.copy_(torch.where(keep.view(b, 1, t, 1), moved, dst))
    return cache


MASK_FNS = {
    "kernel": ops.tree_attention_mask,
    "reference": ref.tree_attention_mask,
    "compiled": compiled(ref.tree_attention_mask),
    "baseline": tree_attention_mask_torch,
}
KV_FNS = {
    "kernel": ops.compact_kv,
    "reference": ref.compact_kv,
    "compiled": compiled(ref.compact_kv),
    "baseline": compact_kv_torch,
}


def _parents(B, T, gen):
    tree = torch.tensor(medusa_tree(T), dtype=torch.long)
    if B == "shared":
        return tree
    # per-row trees: each node keeps its Medusa parent or, with probability 1/2, takes a random
    # earlier node as parent (still a valid tree: 0 <= parents[i] < i).
    rows = []
    for _ in range(B):
        rnd = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, T)])
        rows.append(torch.where(torch.rand(T, generator=gen) < 0.5, tree, rnd))
    return torch.stack(rows)


@functools.lru_cache(maxsize=1)
def mask_setup(B, T, prefix):
    gen = torch.Generator().manual_seed(0)
    parents = _parents(B, T, gen)
    return parents, ref.tree_attention_mask(parents, prefix)


@pytest.mark.parametrize("shape,impl", cases(MASK_SHAPES))
def test_tree_attention_mask(benchmark, shape, impl):
    parents, (ref_mask, ref_depth) = mask_setup(**shape)

    def check(out):
        mask, depth = out
        assert_equal(mask, ref_mask, f"{impl} mask")
        assert_equal(depth, ref_depth, f"{impl} position_offsets")

    run(benchmark, op="tree_attention_mask", shape=shape, impl=impl, fn=MASK_FNS[impl],
        args=(parents, shape["prefix"]), check=check)


@functools.lru_cache(maxsize=1)
def kv_setup(B, heads, head_dim, prefix, T):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(B, heads, prefix + T, head_dim, generator=gen)
    parents = medusa_tree(T)
    # each row accepted the path from the root to a random node
    path = torch.full((B, T), -1, dtype=torch.long)
    num = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        node, chain = int(torch.randint(1, T, (1,), generator=gen)), []
        while node >= 0:
            chain.append(node)
            node = parents[node]
        path[b, : len(chain)] = torch.tensor(chain[::-1])
        num[b] = len(chain) - 1
    expected = ref.compact_kv(cache.clone(), path, num, prefix)
    return cache, path, num, expected


@pytest.mark.parametrize("shape,impl", cases(KV_SHAPES))
def test_compact_kv(benchmark, shape, impl):
    cache, path, num, expected = kv_setup(**shape)
    prefix = shape["prefix"]

    def check(out):
        assert_equal(out, expected, f"{impl} cache")

    # In place: the warm-up and the check work on fresh copies; the timed calls then rewrite the
    # same slots of one copy over and over (the cost does not depend on the values).
    run(benchmark, op="compact_kv", shape=shape, impl=impl, fn=KV_FNS[impl],
        args=lambda: (cache.clone(), path, num, prefix), check=check)
