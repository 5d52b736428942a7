"""fused_mtp_heads: C++ kernel vs the per-head reference vs torch.compile(reference) vs plain
torch with all heads batched into one matmul against lm_head (then log_softmax and torch.topk).

Shapes of SmolLM-135M (D = 576, V = 49152) with H = 4 Medusa heads, bias and the final RMSNorm."""

from __future__ import annotations

import functools

import pytest
import torch

from benchlib import assert_topk_equivalent, cases, compiled, ops
from benchlib import reference as ref
from benchlib import run, shapes

K = 8
SHAPES = shapes(
    full=[dict(N=n, H=4, D=576, V=49152, k=K) for n in (1, 8, 64)],
    small=[dict(N=n, H=4, D=64, V=1000, k=K) for n in (1, 4)],
)


def heads_torch(hidden, weight, bias, lm_head, k, norm_weight=None, eps=1e-6):
    """Plain torch: the heads' features, one [N*H, D] @ [D, V] matmul, log_softmax, torch.topk."""
    z = ref.head_features(hidden, weight, bias, norm_weight, eps)  # [N, H, D]
    logits = z @ lm_head.float().T  # [N, H, V]
    return torch.log_softmax(logits, dim=-1).topk(k, dim=-1)


IMPL_FNS = {
    "kernel": ops.fused_mtp_heads,
    "reference": ref.fused_mtp_heads,
    "compiled": compiled(ref.fused_mtp_heads),
    "baseline": heads_torch,
}


@functools.lru_cache(maxsize=1)
def setup(N, H, D, V, k):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(H, D, D, generator=gen) * D**-0.5
    bias = torch.randn(H, D, generator=gen) * 0.1
    lm_head = torch.randn(V, D, generator=gen) * 0.1  # logits with a std of ~2.4: peaked softmaxes
    norm_weight = 1.0 + 0.1 * torch.randn(D, generator=gen)
    args = (hidden, weight, bias, lm_head, k, norm_weight)
    ref_logprobs, _ = ref.fused_mtp_heads(*args)
    z = ref.head_features(hidden, weight, bias, norm_weight)
    full = torch.log_softmax(z @ lm_head.T, dim=-1)  # [N, H, V]: every token's reference score
    return args, ref_logprobs, full


@pytest.mark.parametrize("shape,impl", cases(SHAPES))
def test_fused_mtp_heads(benchmark, shape, impl):
    args, ref_logprobs, full = setup(**shape)

    def check(out):  # ties-tolerant: matmul summation order may swap near-equal logits
        logprobs, ids = out
        assert_topk_equivalent(logprobs, ids, ref_logprobs, full, impl, rtol=1e-4, atol=1e-4)

    run(benchmark, op="fused_mtp_heads", shape=shape, impl=impl, fn=IMPL_FNS[impl],
        args=args, check=check)
