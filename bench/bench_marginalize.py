"""marginalize and topk_marginalize: C++ kernels vs reference vs torch.compile(reference) vs
plain torch (a batched matmul of the weights with the softmaxes, then torch.topk)."""

from __future__ import annotations

import functools

import pytest
import torch

from benchlib import assert_close, assert_topk_equivalent, cases, compiled, ops
from benchlib import reference as ref
from benchlib import run, shapes

M = 8  # top-m of the marginal
# (B, L): one sequence with 16 intermediate tokens, a small batch, an evaluation batch.
SHAPES = shapes(
    full=[dict(V=v, B=b, L=l) for v in (49152, 151936) for b, l in ((1, 16), (8, 8), (64, 4))],
    small=[dict(V=1000, B=4, L=4)],
)


def marginalize_torch(next_logits, weights, renormalize=True):
    """Plain torch: softmax, then one batched matmul [B, 1, L] @ [B, L, V] (no [B, L, V] product)."""
    w = weights.float()
    if renormalize:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total, torch.zeros_like(w))
    p = torch.softmax(next_logits.float(), dim=-1)
    return torch.bmm(w.unsqueeze(1), p).squeeze(1)


def topk_marginalize_torch(next_logits, weights, m, renormalize=True):
    """Plain torch: ``marginalize_torch`` then torch.topk (tie order not guaranteed)."""
    return marginalize_torch(next_logits, weights, renormalize).topk(m, dim=-1)


MARG_FNS = {
    "kernel": ops.marginalize,
    "reference": ref.marginalize,
    "compiled": compiled(ref.marginalize),
    "baseline": marginalize_torch,
}
TOPK_FNS = {
    "kernel": ops.topk_marginalize,
    "reference": ref.topk_marginalize,
    "compiled": compiled(ref.topk_marginalize),
    "baseline": topk_marginalize_torch,
}


@functools.lru_cache(maxsize=1)
def setup(V, B, L):
    gen = torch.Generator().manual_seed(0)
    next_logits = torch.randn(B, L, V, generator=gen) * 3.0
    # weights: the intermediate tokens' probabilities (descending, not normalized)
    weights = torch.rand(B, L, generator=gen).sort(-1, descending=True).values
    marginal = ref.marginalize(next_logits, weights)
    return next_logits, weights, marginal


@pytest.mark.parametrize("shape,impl", cases(SHAPES))
def test_marginalize(benchmark, shape, impl):
    next_logits, weights, marginal = setup(**shape)

    def check(out):
        assert_close(out, marginal, f"{impl} marginal", rtol=1e-4, atol=1e-7)

    run(benchmark, op="marginalize", shape=shape, impl=impl, fn=MARG_FNS[impl],
        args=(next_logits, weights), check=check)


@pytest.mark.parametrize("shape,impl", cases([dict(s, m=M) for s in SHAPES]))
def test_topk_marginalize(benchmark, shape, impl):
    next_logits, weights, marginal = setup(shape["V"], shape["B"], shape["L"])
    ref_probs, _ = ref.stable_topk(marginal, shape["m"])

    def check(out):  # ties-tolerant: the marginal's close values may swap places
        probs, ids = out
        assert_topk_equivalent(probs, ids, ref_probs, marginal, impl, rtol=1e-4, atol=1e-7)

    run(benchmark, op="topk_marginalize", shape=shape, impl=impl, fn=TOPK_FNS[impl],
        args=(next_logits, weights, shape["m"]), check=check)
