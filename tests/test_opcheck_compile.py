"""torch.library.opcheck on every op and device; one torch.compile(fullgraph=True) test per op."""

from __future__ import annotations

import pytest
import torch
from helpers import TREES, devices, gen, rand, randn, random_case

from mtp_ext import ops

OPS = torch.ops.mtp_ext


def verify_args(device, sampling, batched_parents, b=3):
    draft, parents, logits = random_case(
        b, 6, 20, torch.float32, seed=b, batched_parents=batched_parents
    )
    args = [draft.to(device), parents.to(device), logits.to(device)]
    if sampling:
        return (*args, 0.8, 5, 0.9, rand(b, 6, seed=1, device=device))
    return (*args, 0.0, 0, 1.0, None)


def compact_args(device, b=2):
    cache = randn(b, 3, 12, 8, seed=2, device=device)
    path = torch.full((b, 5), -1, dtype=torch.long)
    path[:, :3] = torch.tensor([0, 2, 4])
    num = torch.full((b,), 2, dtype=torch.long)
    num[0] = 0
    return cache, path.to(device), num.to(device), 4


def heads_args(device, with_optional, n=3):
    h, d, v = 2, 16, 50
    return (
        randn(n, d, seed=3, device=device),
        randn(h, d, d, seed=4, device=device, scale=0.25),
        randn(h, d, seed=5, device=device) if with_optional else None,
        randn(v, d, seed=6, device=device),
        4,
        (1 + randn(d, seed=7, scale=0.1)).to(device) if with_optional else None,
        1e-5,
    )


def heads_without_weight_args(device, with_vocab_ids, n=3):
    hidden, _, _, lm_head, k, norm_weight, eps = heads_args(device, True, n)
    if not with_vocab_ids:
        return hidden, None, None, lm_head, k, norm_weight, eps
    vocab_ids = torch.randperm(500, generator=gen(22))[: lm_head.shape[0]].to(device)
    return hidden, None, None, lm_head, k, None, eps, vocab_ids


def heads_vocab_args(device, n=3):
    hidden, weight, bias, lm_head, k, norm_weight, eps = heads_args(device, True, n)
    vocab_ids = torch.randperm(500, generator=gen(14))[: lm_head.shape[0]].to(device)
    return hidden, weight, bias, lm_head, k, norm_weight, eps, vocab_ids


def from_hidden_args(device, with_norm, b=3):
    t, d, v = 6, 16, 40
    draft, parents, _ = random_case(b, t, v, torch.float32, seed=15, batched_parents=with_norm)
    dtype = torch.float16 if with_norm else torch.float32
    hidden = randn(b, t, d, seed=16, device=device, dtype=dtype)
    lm_head = randn(v, d, seed=17, device=device, dtype=dtype)
    norm_weight = (1 + randn(d, seed=18, scale=0.1)).to(device) if with_norm else None
    return draft.to(device), parents.to(device), hidden, lm_head, norm_weight, 1e-5


def linear_args(device, with_bias, m=3, dtype=torch.float32):
    k, n = 37, 49
    x = randn(m, k, seed=19, device=device, dtype=dtype)
    weight = randn(n, k, seed=20, device=device, dtype=torch.bfloat16, scale=k**-0.5)
    return x, weight, randn(n, seed=21, device=device) if with_bias else None


# (op name, sample-args builder taking (device, size); size varies a batch dim for the compile test)
SAMPLES = {
    "softmax_topk": lambda dev, n=4: (
        randn(n, 3, 101, seed=8, device=dev, dtype=torch.bfloat16),
        7,
        0.9,
    ),
    "softmax_topk_1d": lambda dev, n=4: (randn(100 + n, seed=9, device=dev), 3, 1.0),
    "marginalize": lambda dev, n=2: (
        randn(n, 3, 77, seed=10, device=dev, dtype=torch.float16),
        rand(n, 3, seed=11, device=dev),
        True,
    ),
    "marginalize_no_renorm": lambda dev, n=2: (
        randn(n, 3, 77, seed=10, device=dev),
        rand(n, 3, seed=11, device=dev),
        False,
    ),
    "topk_marginalize": lambda dev, n=2: (
        randn(n, 4, 90, seed=12, device=dev),
        rand(n, 4, seed=13, device=dev),
        6,
        True,
    ),
    "fused_mtp_heads": lambda dev, n=3: heads_args(dev, True, n),
    "fused_mtp_heads_no_bias_norm": lambda dev, n=3: heads_args(dev, False, n),
    "fused_mtp_heads_vocab_ids": lambda dev, n=3: heads_vocab_args(dev, n),
    "fused_mtp_heads_no_weight": lambda dev, n=3: heads_without_weight_args(dev, False, n),
    "fused_mtp_heads_no_weight_vocab_ids": lambda dev, n=3: heads_without_weight_args(dev, True, n),
    "verify_tree": lambda dev, n=3: verify_args(dev, False, False, n),
    "verify_tree_sampling": lambda dev, n=3: verify_args(dev, True, True, n),
    "tree_attention_mask": lambda dev, n=2: (
        torch.tensor(TREES["medusa"], device=dev).expand(n, 10).contiguous(),
        3,
        torch.float16,
    ),
    "tree_attention_mask_1d": lambda dev, n=2: (torch.tensor(TREES["chain"], device=dev), n, None),
    "compact_kv": lambda dev, n=2: compact_args(dev, n),
    "verify_tree_from_hidden": lambda dev, n=3: from_hidden_args(dev, True, n),
    "verify_tree_from_hidden_no_norm": lambda dev, n=3: from_hidden_args(dev, False, n),
    "small_batch_linear": lambda dev, n=3: linear_args(dev, True, n),
    "small_batch_linear_no_bias": lambda dev, n=3: linear_args(dev, False, n, torch.float16),
    "small_batch_linear_many_rows": lambda dev, n=3: linear_args(dev, True, 64 + n),
}


def op_of(sample: str):
    for name in (
        "softmax_topk",
        "topk_marginalize",
        "marginalize",
        "fused_mtp_heads",
        "verify_tree_from_hidden",  # before verify_tree, which is a prefix of it
        "verify_tree",
        "tree_attention_mask",
        "compact_kv",
        "small_batch_linear",
    ):
        if sample.startswith(name):
            return name
    raise KeyError(sample)


def test_every_op_has_samples():
    names = {op_of(s) for s in SAMPLES}
    assert names == set(ops.__all__)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_opcheck(device, sample):
    op = getattr(OPS, op_of(sample)).default
    args = SAMPLES[sample](device)
    results = torch.library.opcheck(op, args)
    assert all(r == "SUCCESS" for r in results.values()), results


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------

# The wrappers called the way user code calls them, inside a compiled region with some torch ops
# around, so that the graph really has to trace through the op (fullgraph: no graph breaks).
PROGRAMS = {
    "softmax_topk": lambda x, k, t: tuple(o * 1 for o in ops.softmax_topk(x * 1, k, t)),
    "marginalize": lambda x, w, r: ops.marginalize(x, w.abs(), r) + 0,
    "topk_marginalize": lambda x, w, m, r: ops.topk_marginalize(x, w.abs(), m, r),
    "fused_mtp_heads": lambda *a: ops.fused_mtp_heads(*a),
    "verify_tree": lambda d, p, x, *rest: ops.verify_tree(d, p, x * 1, *rest),
    "tree_attention_mask": lambda p, n, dt: ops.tree_attention_mask(
        p, n, dt if dt is not None else torch.float32
    ),
    "compact_kv": lambda c, p, n, s: ops.compact_kv(c, p, n, s),
    "verify_tree_from_hidden": lambda d, p, h, w, nw, eps: ops.verify_tree_from_hidden(
        d, p, h * 1, w, nw, eps
    ),
    "small_batch_linear": lambda x, w, b: torch.relu(ops.small_batch_linear(x * 1, w, b)) + 0,
    # The draft-vocabulary path: the mapped ids used by later torch ops in the same graph.
    "fused_mtp_heads_vocab_ids": lambda *a: tuple(o + 0 for o in ops.fused_mtp_heads(*a)),
    # One head without a residual block: the [N, 1, k] outputs used by later torch ops.
    "fused_mtp_heads_no_weight": lambda *a: tuple(o[:, 0] * 1 for o in ops.fused_mtp_heads(*a)),
}

BACKEND = "inductor"


def clone_args(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def assert_same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_compile_fullgraph_matches_eager(device, name):
    torch._dynamo.reset()
    program = PROGRAMS[name]
    compiled = torch.compile(program, fullgraph=True, backend=BACKEND)
    for size in (2, 3):  # a second batch size exercises the fakes with dynamic shapes
        args = SAMPLES[name](device, size)
        eager_args, compiled_args = clone_args(args), clone_args(args)
        expected = program(*eager_args)
        got = compiled(*compiled_args)
        assert_same(got, expected)
        # In-place ops: the compiled call mutates its inputs exactly like the eager one.
        for x, y in zip(compiled_args, eager_args):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y)
    if name == "compact_kv":
        assert not torch.equal(compiled_args[0], args[0]), "the sample must move something"
