"""Tree-size selection (``mtp_ext.tree_tuning``): nested dynamic trees, the acceptance each smaller
tree would have had, the profile and its cache."""

from __future__ import annotations

import pytest
import torch

from helpers import perturbed_heads, tiny_llama

import mtp_ext
from mtp_ext import tree_tuning as tt
from mtp_ext.heads import MTPHeads
from mtp_ext.trees import DynamicTree, build_tree

VOCAB = 200


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(VOCAB, 48, 96, 2, 0)
    m.generation_config.eos_token_id = None
    return m


def _heads(model, kind="conditioned", seed=0, scale=0.05):
    return perturbed_heads(model, kind, seed, scale)


def _paths(tree, b):
    out = set()
    for i in range(tree.size):
        path, n = [], i
        while n > 0:
            path.append(int(tree.tokens[b, n]))
            n = int(tree.parents[b, n])
        out.add(tuple(reversed(path)))
    return out


@pytest.mark.parametrize("kind", ["conditioned", "resblock"])
def test_dynamic_trees_are_nested_by_selection_rank(model, kind):
    heads = _heads(model, kind, scale=0.3)
    g = torch.Generator().manual_seed(1)
    x, root = torch.randn(3, 48, generator=g), torch.randint(0, VOCAB, (3,), generator=g)
    big = build_tree(heads, x, root, DynamicTree(24, 4))
    ranks = tt.selection_ranks(big)
    assert sorted(ranks[0].tolist()) == list(range(big.size))
    for t in (1, 2, 5, 9, 16):
        small = build_tree(heads, x, root, DynamicTree(t, 4))
        for b in range(3):
            keep = (ranks[b] < t).nonzero().flatten().tolist()
            sub = _paths(big, b)
            want = set()
            for i in keep:
                path, n = [], i
                while n > 0:
                    path.append(int(big.tokens[b, n]))
                    n = int(big.parents[b, n])
                want.add(tuple(reversed(path)))
            assert _paths(small, b) == want, (t, b)
            assert want <= sub


def test_accepted_by_size_matches_verifying_each_subtree(model):
    heads = _heads(model, "resblock", scale=0.3)
    g = torch.Generator().manual_seed(2)
    x, root = torch.randn(4, 48, generator=g), torch.randint(0, VOCAB, (4,), generator=g)
    big = build_tree(heads, x, root, DynamicTree(20, 3))
    # Target logits per node that make the walk follow the best-ranked children: the target
    # token at node n is the token of n's first child in rank order (sometimes none).
    ranks = tt.selection_ranks(big)
    logits = torch.randn(4, big.size, VOCAB, generator=g)
    for b in range(4):
        for n in range(big.size):
            kids = [c for c in range(big.size) if int(big.parents[b, c]) == n]
            if kids and (n + b) % 3:
                best = min(kids, key=lambda c: int(ranks[b, c]))
                logits[b, n, int(big.tokens[b, best])] = 50.0
    num_acc, _, path = mtp_ext.verify_tree(big.tokens, big.parents, logits)
    sizes = [1, 2, 4, 8, 20]
    got = tt._accepted_by_size(big, num_acc, path, sizes)
    for i, t in enumerate(sizes):
        for b in range(4):
            keep = (ranks[b] < t).nonzero().flatten()
            index = {int(n): j for j, n in enumerate(keep)}
            sub_tokens = big.tokens[b, keep][None]
            sub_parents = torch.tensor([-1] + [index[int(big.parents[b, n])] for n in keep[1:]])
            na, _, _ = mtp_ext.verify_tree(sub_tokens, sub_parents, logits[b, keep][None])
            assert int(got[i, b]) == int(na[0]), (t, b)
    assert torch.equal(got[-1], num_acc)


def test_profile_tree_sizes(model):
    heads = MTPHeads.for_model(model, 3, kind="resblock")  # fresh heads: follow loops
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    prof = tt.profile_tree_sizes(model, heads, ids, sizes=(1, 2, 4, 8), new_tokens=24, timing_steps=4)
    assert prof.sizes == [1, 2, 4, 8] and len(prof.step_ms) == 4
    assert prof.tokens_per_step[0] == 1.0
    assert all(a <= b + 1e-9 for a, b in zip(prof.tokens_per_step, prof.tokens_per_step[1:]))
    best = max(range(4), key=lambda i: prof.tokens_per_ms[i])
    assert prof.best == prof.sizes[best]
    assert isinstance(prof.tree(), DynamicTree) and prof.tree().size == prof.best
