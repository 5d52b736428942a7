"""softmax_topk: C++ kernel vs reference vs torch.compile(reference) vs softmax + torch.topk."""

from __future__ import annotations

import functools

import pytest
import torch

from benchlib import assert_close, assert_equal, assert_topk_equivalent, cases, compiled, ops
from benchlib import reference as ref
from benchlib import run, shapes

K = 8
SHAPES = shapes(
    full=[dict(V=v, B=b, k=K) for v in (49152, 151936) for b in (1, 8, 64)],
    small=[dict(V=1000, B=4, k=K)],
)


def softmax_torch_topk(logits, k, temperature=1.0):
    """Plain torch: full softmax, then torch.topk (tie order not guaranteed)."""
    return torch.softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)


IMPL_FNS = {
    "kernel": ops.softmax_topk,
    "reference": ref.softmax_topk,
    "compiled": compiled(ref.softmax_topk),
    "baseline": softmax_torch_topk,
}


@functools.lru_cache(maxsize=1)
def setup(V, B, k):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(B, V, generator=gen) * 3.0
    expected = ref.softmax_topk(logits, k)
    full = torch.softmax(logits, dim=-1)
    return logits, expected, full


@pytest.mark.parametrize("shape,impl", cases(SHAPES))
def test_softmax_topk(benchmark, shape, impl):
    logits, (ref_probs, ref_ids), full = setup(**shape)

    def check(out):
        probs, ids = out
        if impl == "kernel":  # the op's contract: exact ids, tie order included
            assert_equal(ids, ref_ids, "ids")
            assert_close(probs, ref_probs, "probs")
        else:
            assert_topk_equivalent(probs, ids, ref_probs, full, impl)

    run(benchmark, op="softmax_topk", shape=shape, impl=impl, fn=IMPL_FNS[impl],
        args=(logits, shape["k"]), check=check)
