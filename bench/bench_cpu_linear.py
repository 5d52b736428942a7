"""small_batch_linear and verify_tree_from_hidden: C++ kernel vs reference vs torch.compile(reference)
vs the stock path (F.linear; F.linear + verify_tree), at SmolLM2-135M's shapes.

These groups time each op with its weights in cache, one call after another; bench/tree_cost.py
measures them with weights streamed from memory, as inside a model's forward pass, and the tree
forward of a whole model.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.nn import functional as F

from benchlib import assert_close, assert_equal, cases, compiled, ops
from benchlib import reference as ref
from benchlib import run, shapes

LINEAR_SHAPES = shapes(
    full=[dict(M=m, K=k, N=n) for (n, k) in ((1536, 576), (576, 1536), (49152, 576)) for m in (2, 8, 64)],
    small=[dict(M=8, K=64, N=300)],
)
VERIFY_SHAPES = shapes(
    full=[dict(B=1, T=t, D=576, V=49152) for t in (8, 16, 64)],
    small=[dict(B=2, T=8, D=64, V=1000)],
)


def stock_verify(draft, parents, hidden, lm_head, norm_weight=None, eps=1e-6):
    """The unfused path: logits through F.linear, then the verify_tree op."""
    return ops.verify_tree(draft, parents, F.linear(hidden, lm_head))


LINEAR_FNS = {
    "kernel": ops.small_batch_linear,
    "reference": ref.small_batch_linear,
    "compiled": compiled(ref.small_batch_linear),
    "baseline": F.linear,
}
VERIFY_FNS = {
    "kernel": ops.verify_tree_from_hidden,
    "reference": ref.verify_tree_from_hidden,
    "compiled": compiled(ref.verify_tree_from_hidden),
    "baseline": stock_verify,
}


@functools.lru_cache(maxsize=1)
def linear_setup(M, K, N):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen)
    weight = torch.randn(N, K, generator=gen) * K**-0.5
    return x, weight, ref.small_batch_linear(x, weight)


@functools.lru_cache(maxsize=1)
def verify_setup(B, T, D, V):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, D, generator=gen)
    lm_head = torch.randn(V, D, generator=gen) * D**-0.5
    parents = torch.tensor([-1] + [(i - 1) // 2 for i in range(1, T)])  # a binary tree
    targets = (hidden @ lm_head.T).argmax(-1)
    draft = targets.gather(1, parents.clamp(min=0).expand(B, T))  # every draft right: deep walks
    return draft, parents, hidden, lm_head, ref.verify_tree_from_hidden(draft, parents, hidden, lm_head)


@pytest.mark.parametrize("shape,impl", cases(LINEAR_SHAPES))
def test_small_batch_linear(benchmark, shape, impl):
    x, weight, expected = linear_setup(**shape)

    def check(out):
        assert_close(out, expected, "output", rtol=1e-4, atol=1e-4)

    run(benchmark, op="small_batch_linear", shape=shape, impl=impl, fn=LINEAR_FNS[impl],
        args=(x, weight), check=check)


@pytest.mark.parametrize("shape,impl", cases(VERIFY_SHAPES))
def test_verify_tree_from_hidden(benchmark, shape, impl):
    draft, parents, hidden, lm_head, expected = verify_setup(**shape)

    def check(out):
        for got, want, what in zip(out, expected, ("num_accepted", "tokens", "path")):
            assert_equal(got, want, what)

    run(benchmark, op="verify_tree_from_hidden", shape=shape, impl=impl, fn=VERIFY_FNS[impl],
        args=(draft, parents, hidden, lm_head), check=check)
