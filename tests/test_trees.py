"""Draft trees (``mtp_ext.trees``) from heads on a tiny random-weight Llama: static trees (paths of
ranks, parent-dependent with conditioned heads), chains, and dynamic trees against a brute-force
enumeration node by node; and where the prompt-lookup branch joins a tree (``add_branch``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import perturbed_heads, tiny_llama

from mtp_ext.heads import MTPHeads
from mtp_ext.reference import walk_tree
from mtp_ext.trees import DraftTree, DynamicTree, StaticTree, add_branch, build_tree, chain

VOCAB, HIDDEN, H = 500, 32, 3
KINDS = ["resblock", "linear", "conditioned"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, HIDDEN, 64, 2, 0)


def _heads(model, kind, vocab=None, seed=0):
    return perturbed_heads(model, kind, seed, 0.3, H, draft_vocab_size=vocab)


def _inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, HIDDEN, generator=g), torch.randint(0, VOCAB, (B,), generator=g)


def _check_topology(tree):
    B, T = tree.tokens.shape
    assert tree.parents.shape == tree.depths.shape == tree.scores.shape == (B, T)
    assert (tree.parents[:, 0] == -1).all() and (tree.depths[:, 0] == 0).all()
    for i in range(1, T):
        p = tree.parents[:, i]
        assert ((p >= 0) & (p < i)).all()
        assert torch.equal(tree.depths[:, i], tree.depths.gather(1, p[:, None])[:, 0] + 1)
        assert (tree.scores[:, i] <= tree.scores.gather(1, p[:, None])[:, 0] + 1e-6).all()


def _node_children(heads, x_row, root, path_tokens, k):
    """Reference: the top-k children of the node reached by ``path_tokens`` (one row, node by node)."""
    f, tok = x_row[None], torch.tensor([root])
    for d, t in enumerate([None] + list(path_tokens), start=1):
        if t is not None:
            tok = torch.tensor([t])
        f, lp, ids = heads.draft_step(d, f, tok, k)
        if d == len(path_tokens) + 1:
            return lp[0], ids[0]


def test_static_tree_validation_and_order():
    t = StaticTree([(0, 1), (1,), (0,), (0, 0), (0, 0, 0)])
    assert t.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 3] and t.size == 6 and t.max_depth == 3
    with pytest.raises(ValueError, match="no parent path"):
        StaticTree([(0, 1)])
    with pytest.raises(ValueError, match=">= 0"):
        StaticTree([(-1,)])
    assert chain(3).paths == [(0,), (0, 0), (0, 0, 0)]
    with pytest.raises(ValueError, match="size must be"):
        DynamicTree(0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [None, 120])
def test_static_tree_matches_node_by_node(model, kind, vocab):
    heads = _heads(model, kind, vocab)
    x, root = _inputs()
    spec = StaticTree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 1), (0, 0, 0), (1, 0, 2)])
    tree = build_tree(heads, x, root, spec)
    _check_topology(tree)
    assert torch.equal(tree.tokens[:, 0], root)
    for b in range(x.shape[0]):
        for i, path in enumerate(spec.paths, start=1):
            # tokens along the path from the root to node i
            chain_nodes, n = [], i
            while n > 0:
                chain_nodes.append(n)
                n = int(tree.parents[b, n])
            toks = [int(tree.tokens[b, n]) for n in reversed(chain_nodes)]
            lp, ids = _node_children(heads, x[b], int(root[b]), toks[:-1], 3)
            assert toks[-1] == int(ids[path[-1]]), (b, path)
            parent_score = float(tree.scores[b, int(tree.parents[b, i])])
            assert abs(float(tree.scores[b, i]) - parent_score - float(lp[path[-1]])) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_chain_equals_draft_top1(model, kind):
    heads = _heads(model, kind)
    x, root = _inputs()
    tree = build_tree(heads, x, root, chain(H))
    _, ids = heads.draft(x, 1, next_tokens=root if kind == "conditioned" else None)
    assert torch.equal(tree.tokens[:, 1:], ids[:, :, 0])
    assert tree.parents[0].tolist() == [-1, 0, 1, 2]


def _brute_dynamic(heads, x_row, root, size, width, max_depth):
    """Node-by-node reference of DynamicTree: returns [(score, token path)] of the kept nodes."""
    pool = [dict(path=(), score=0.0, depth=0)]
    frontier = [0]
    for d in range(1, max_depth + 1):
        new = []
        for n in frontier:
            node = pool[n]
            lp, ids = _node_children(heads, x_row, root, node["path"], width)
            for j in range(width):
                new.append(dict(path=node["path"] + (int(ids[j]),),
                                score=node["score"] + float(lp[j]), depth=d))
        start = len(pool)
        pool.extend(new)
        order = sorted(range(len(new)), key=lambda j: -new[j]["score"])[:width]
        frontier = [start + j for j in order]
    kept = sorted(range(len(pool)), key=lambda i: (-pool[i]["score"], pool[i]["depth"], i))[:size]
    return sorted((round(pool[i]["score"], 3), pool[i]["path"]) for i in kept)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size,width", [(1, 2), (6, 2), (10, 3), (40, 3)])
def test_dynamic_tree_equals_brute_force(model, kind, size, width):
    heads = _heads(model, kind, seed=2)
    x, root = _inputs(B=2, seed=5)
    tree = build_tree(heads, x, root, DynamicTree(size, width))
    _check_topology(tree)
    assert tree.size == min(size, 1 + width + 2 * width * width)
    for b in range(2):
        got = []
        for i in range(tree.size):
            path, n = [], i
            while n > 0:
                path.append(int(tree.tokens[b, n]))
                n = int(tree.parents[b, n])
            got.append((round(float(tree.scores[b, i]), 3), tuple(reversed(path))))
        assert sorted(got) == _brute_dynamic(heads, x[b], int(root[b]), size, width, H)


def test_build_tree_bad_input(model):
    heads = _heads(model, "conditioned")
    x, root = _inputs()
    with pytest.raises(ValueError, match="root_tokens must be int64"):
        build_tree(heads, x, root.int(), chain(2))
    with pytest.raises(ValueError, match="deep"):
        build_tree(heads, x, root, chain(H + 1))
    with pytest.raises(TypeError, match="spec must be"):
        build_tree(heads, x, root, [(0,)])
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        build_tree(heads, x[None], root, chain(1))


def _tree(tokens, parents, depths) -> DraftTree:
    t = torch.tensor(tokens)
    return DraftTree(t, torch.tensor(parents), torch.tensor(depths), torch.zeros(t.shape))


def test_add_branch_shares_the_prefix_the_tree_drafts():
    """The lookup branch continues under the deepest node that spells its prefix; a branch chained
    under the root behind a head child with the same first token would never be followed."""
    row = ([3, 10, 11, 12], [-1, 0, 0, 1], [0, 1, 1, 2])  # root -> 10 -> 12, root -> 11
    tree = _tree(*[[r] * 4 for r in row])
    branch = torch.tensor([[10, 20, 21], [10, 12, 5], [7, 8, 9], [10, 12, 13]])
    big = add_branch(tree, branch)
    assert big.tokens[:, 4:].tolist() == [[20, 21, -1], [5, -1, -1], [7, 8, 9], [13, -1, -1]]
    assert big.parents[:, 4:].tolist() == [[1, 4, 5], [3, 4, 5], [0, 4, 5], [3, 4, 5]]
    assert big.depths[:, 4:].tolist() == [[2, 3, 4], [3, 4, 5], [1, 2, 3], [3, 4, 5]]
    # Greedy verification with targets along each branch accepts all three of its tokens.
    paths = [[0, 1, 4, 5], [0, 1, 3, 4], [0, 4, 5, 6], [0, 1, 3, 4]]
    targets = torch.full((4, 7), 99)
    for b, path in enumerate(paths):
        for node, child in itertools.pairwise(path):
            targets[b, node] = big.tokens[b, child]
    num_acc, _, _ = walk_tree(big.tokens, big.parents, targets)
    assert num_acc.tolist() == [3, 3, 3, 3]


def test_add_branch_checks_every_ancestor():
    """Tokens that match at depth 2 and deeper under a node that does not match at depth 1 are not
    a shared prefix (pointer jumping must see the whole path)."""
    tree = _tree([[1, 10, 11, 12, 13]], [[-1, 0, 1, 2, 3]], [[0, 1, 2, 3, 4]])
    big = add_branch(tree, torch.tensor([[9, 11, 12, 13]]))
    assert big.parents[0, 5:].tolist() == [0, 5, 6, 7]
    assert big.tokens[0, 5:].tolist() == [9, 11, 12, 13]
    big = add_branch(tree, torch.tensor([[10, 11, 12, 13]]))  # the whole branch is in the tree
    assert big.parents[0, 5:].tolist() == [4, 5, 6, 7] and big.tokens[0, 5:].tolist() == [-1] * 4
