"""CUDA kernels beyond the device-parametrized tests: capture and replay in a CUDA graph for every
op, equality with the CPU kernels on the same inputs, and large shapes that would overflow 32-bit
indexing. Skipped with a reason where no GPU is present.

Sampled tokens may differ between the CPU and CUDA kernels only where the uniform lies within
rounding of a boundary of the (filtered) CDF: the two kernels compute exp and the sums in different
orders. Such differences are counted, each must be explained by moving the uniform (or top_p) by
at most 1e-5, and there must be few of them.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    CUDA_AVAILABLE,
    TOL,
    assert_close,
    assert_equal_up_to_near_ties,
    assert_topk_equivalent,
    heads_inputs,
    linear_tol,
    medusa_tree,
    rand,
    randn,
    ref64,
    unaligned_paths_mixture,
    verify_inputs,
)
from helpers import assert_same_outputs as compare

from mtp_ext import ops
from mtp_ext import reference as ref

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available"),
]

BF16, F16, F32, I64 = torch.bfloat16, torch.float16, torch.float32, torch.int64


def to_cuda(args):
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


# ------------------------------------------------------------------------------------------------
# Inputs of every op (CPU tensors; seed changes the values, not the shapes)
# ------------------------------------------------------------------------------------------------


def chain_tree(t):
    return torch.tensor([-1] + list(range(t - 1)))


CASES = {
    "softmax_topk": (
        lambda s: (randn(4, 5000, dtype=BF16, seed=s, scale=3.0),),
        lambda x: ops.softmax_topk(x, 8, 0.7),
    ),
    "softmax_topk_large_k": (
        lambda s: (randn(3, 3000, dtype=F16, seed=s, scale=3.0),),
        lambda x: ops.softmax_topk(x, 300),
    ),
    "marginalize": (
        lambda s: (randn(2, 5, 9000, dtype=BF16, seed=s, scale=3.0), rand(2, 5, seed=s + 1)),
        lambda x, w: ops.marginalize(x, w),
    ),
    "topk_marginalize": (
        lambda s: (randn(2, 5, 9000, dtype=F32, seed=s, scale=3.0), rand(2, 5, seed=s + 1)),
        lambda x, w: ops.topk_marginalize(x, w, 10),
    ),
    "topk_marginalize_large_m": (
        lambda s: (randn(2, 3, 2000, dtype=F32, seed=s, scale=3.0), rand(2, 3, seed=s + 1)),
        lambda x, w: ops.topk_marginalize(x, w, 200, False),
    ),
    "fused_mtp_heads": (
        lambda s: (
            randn(4, 64, dtype=BF16, seed=s),
            randn(3, 64, 64, dtype=BF16, seed=s + 1, scale=0.125),
            randn(3, 64, dtype=BF16, seed=s + 2, scale=0.1),
            randn(3000, 64, dtype=BF16, seed=s + 3, scale=0.4),
            (1 + randn(64, seed=s + 4, scale=0.1)).to(BF16),
            torch.randperm(5000, generator=torch.Generator().manual_seed(s))[:3000],
        ),
        lambda x, w, b, lm, nw, vid: ops.fused_mtp_heads(x, w, b, lm, 5, nw, 1e-6, vid),
    ),
    "fused_mtp_heads_without_weight": (
        lambda s: (
            randn(6, 64, dtype=BF16, seed=s),
            randn(3000, 64, dtype=BF16, seed=s + 1, scale=0.4),
            (1 + randn(64, seed=s + 2, scale=0.1)).to(BF16),
        ),
        lambda x, lm, nw: ops.fused_mtp_heads(x, None, None, lm, 5, nw),
    ),
    "verify_tree_greedy": (
        lambda s: verify_inputs(s)[:3],
        lambda d, p, x: ops.verify_tree(d, p, x),
    ),
    "verify_tree_sampled": (
        lambda s: verify_inputs(s),
        lambda d, p, x, u: ops.verify_tree(d, p, x, 0.8, 0, 1.0, u),
    ),
    "verify_tree_top_k_top_p": (
        lambda s: verify_inputs(s),
        lambda d, p, x, u: ops.verify_tree(d, p, x, 1.0, 20, 0.8, u),
    ),
    "verify_tree_top_p_sorted": (
        lambda s: verify_inputs(s),
        lambda d, p, x, u: ops.verify_tree(d, p, x, 1.2, 0, 0.9, u),
    ),
    "verify_tree_from_hidden": (
        lambda s: (
            verify_inputs(s, v=50)[0] % 50,
            medusa_tree(),
            randn(3, 10, 64, dtype=BF16, seed=s),
            randn(2000, 64, dtype=BF16, seed=s + 1),
            (1 + randn(64, seed=s + 2, scale=0.1)).to(BF16),
        ),
        lambda d, p, h, lm, nw: ops.verify_tree_from_hidden(d, p, h, lm, nw),
    ),
    "small_batch_linear": (
        lambda s: (randn(5, 96, dtype=F32, seed=s), randn(300, 96, dtype=BF16, seed=s + 1),
                   randn(300, dtype=F32, seed=s + 2)),
        lambda x, w, b: ops.small_batch_linear(x, w, b),
    ),
    "tree_attention_mask": (
        lambda s: (torch.stack([medusa_tree(), torch.tensor([-1, 0, 1, 2, 0, 4, 4, 1, 7, 8])]),),
        lambda p: ops.tree_attention_mask(p, 7, torch.bfloat16),
    ),
}


# ------------------------------------------------------------------------------------------------
# CUDA graphs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_capture_and_replay(name):
    make, fn = CASES[name]
    static = to_cuda(make(0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    # Replayed on two other inputs: nothing was baked into the graph but the shapes.
    for seed in (1, 2):
        fresh = to_cuda(make(seed))
        for st, fr in zip(static, fresh):
            st.copy_(fr)
        graph.replay()
        torch.cuda.synchronize()
        compare(out, fn(*fresh), name)


def test_compact_kv_capture_and_replay():
    def make(seed):
        cache = randn(2, 3, 16, 8, dtype=BF16, seed=seed)
        path = torch.tensor([[0, 2, 5, 7, -1, -1, -1, -1], [0, 1, 3, -1, -1, -1, -1, -1]])
        if seed % 2:
            path = torch.tensor([[0, 3, 4, -1, -1, -1, -1, -1], [0, 2, 6, 7, -1, -1, -1, -1]])
        num = (path >= 0).sum(1) - 1
        return cache.cuda(), path.cuda(), num.cuda()

    cache, path, num = make(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.compact_kv(cache.clone(), path, num, 4)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.compact_kv(cache, path, num, 4)
    for seed in (1, 2):
        fresh = make(seed)
        for st, fr in zip((cache, path, num), fresh):
            st.copy_(fr)
        graph.replay()
        torch.cuda.synchronize()
        expected = ref.compact_kv(fresh[0].cpu(), fresh[1].cpu(), fresh[2].cpu(), 4)
        assert torch.equal(cache.cpu(), expected)


# ------------------------------------------------------------------------------------------------
# CUDA equals the CPU kernel on the same inputs
# ------------------------------------------------------------------------------------------------

EXACT = [
    "softmax_topk",
    "softmax_topk_large_k",
    "marginalize",
    "verify_tree_greedy",
    "verify_tree_from_hidden",
    "small_batch_linear",
    "tree_attention_mask",
]


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("seed", [3, 4])
def test_cuda_equals_cpu(name, seed):
    make, fn = CASES[name]
    args = make(seed)
    expected = fn(*args)
    actual = fn(*to_cuda(args))
    if name == "small_batch_linear":
        assert_close(actual.cpu(), expected, linear_tol(F32, BF16, "cuda"))
        return
    compare(actual, expected, name)


@pytest.mark.parametrize("seed", [3, 4])
def test_cuda_topk_marginalize_matches_cpu(seed):
    x, w = randn(3, 7, 20000, dtype=BF16, seed=seed, scale=3.0), rand(3, 7, seed=seed + 1)
    for m in (1, 10, 64, 100):
        probs, ids = ops.topk_marginalize(x.cuda(), w.cuda(), m)
        cpu_probs, cpu_ids = ops.topk_marginalize(x, w, m)
        full = ref64(ref.marginalize, x, w)
        assert_topk_equivalent(probs.cpu(), ids.cpu(), cpu_probs, cpu_ids, full, TOL[BF16].prob)


def test_cuda_topk_marginalize_rows_on_both_paths():
    # One batch whose rows take the one-read path (random) and the second pass: a flat row, five
    # best tokens in one warp's share (the fifth bounds the rest), a token second on both paths
    # but first in the marginal, exact ties at the m-th place, a NaN.
    x = randn(7, 3, 20000, dtype=F32, seed=31, scale=0.5) - 4.0
    x[0] = randn(3, 20000, dtype=F32, seed=32, scale=3.0)
    x[1] = 0.25
    x[2, 0, 100:105] = torch.tensor([9.0, 8.9, 8.8, 8.7, 8.6])
    x[2, 0, 700] = 8.5
    x[3, 0, 10], x[3, 0, 300], x[3, 1, 600], x[3, 1, 300] = 10.0, 9.9, 10.0, 9.9
    x[4] = float("-inf")
    x[4, 0, 900] = x[4, 1, 100] = x[4, 2, 50] = 5.0
    x[5, 1, 17] = float("nan")
    x[6] = randn(3, 20000, dtype=F32, seed=33, scale=3.0)
    w = torch.ones(7, 3)
    for m in (1, 2, 5, 16):
        probs, ids = ops.topk_marginalize(x.cuda(), w.cuda(), m)
        cpu_probs, cpu_ids = ops.topk_marginalize(x, w, m)
        expected = {1: list(range(m)), 2: [100, 101, 102, 103, 104], 3: [300], 4: [50, 100, 900]}
        for row, best in expected.items():  # exact answers, far from near-ties
            assert ids[row, : len(best)].tolist() == best[:m]
        finite = [0, 1, 2, 3, 4, 6]
        full = ref64(ref.marginalize, x[finite], w[finite])
        got, want = (probs[finite].cpu(), ids[finite].cpu()), (cpu_probs[finite], cpu_ids[finite])
        assert_topk_equivalent(*got, *want, full, TOL[F32].prob)
        compare((probs[5:6].cpu(), ids[5:6].cpu()), (cpu_probs[5:6], cpu_ids[5:6]), "NaN row")


def test_cuda_topk_marginalize_rows_of_different_alignment():
    # Path 0's row is 16-byte aligned, path 1's is not (tests/test_cuda_emulator.py).
    x, w = unaligned_paths_mixture()
    _, ids = ops.topk_marginalize(x.cuda(), w.cuda(), 4)
    assert ids[0].tolist() == ops.topk_marginalize(x, w, 4)[1][0].tolist()


@pytest.mark.parametrize("seed", [3, 4])
def test_cuda_fused_mtp_heads_matches_cpu(seed):
    make, fn = CASES["fused_mtp_heads"]
    args = make(seed)
    lp, ids = fn(*to_cuda(args))
    cpu_lp, cpu_ids = fn(*args)
    hidden, weight, bias, lm_head, nw, vocab_ids = args
    z = ref.head_features(hidden, weight, bias, nw, 1e-6).double()
    logprobs = torch.log_softmax(z @ lm_head.double().T, -1).float()  # [N, H, V]
    # Compare in lm_head row space (ids are mapped through vocab_ids).
    inverse = torch.full((int(vocab_ids.max()) + 1,), -1, dtype=I64)
    inverse[vocab_ids] = torch.arange(vocab_ids.numel())
    assert_topk_equivalent(lp.cpu(), inverse[ids.cpu()], cpu_lp, inverse[cpu_ids], logprobs,
                           TOL[BF16].logprob)


# ------------------------------------------------------------------------------------------------
# The unembedding paths of fused_mtp_heads and verify_tree_from_hidden: up to 64 rows (k <= 64, D a
# multiple of 8, contiguous lm_head rows) one streaming kernel with a running top-k that never
# writes the logits (on tensor cores for 16-bit lm_head from compute capability 8.0); otherwise
# the logits are computed and ranked. Both against the CPU kernel.
# ------------------------------------------------------------------------------------------------


def check_heads_against_cpu(hidden, weight, bias, lm_head, k, nw, vocab_ids=None):
    lp, ids = ops.fused_mtp_heads(*to_cuda((hidden, weight, bias, lm_head, k, nw, 1e-6, vocab_ids)))
    cpu_lp, cpu_ids = ops.fused_mtp_heads(hidden, weight, bias, lm_head, k, nw, 1e-6, vocab_ids)
    z = ref.head_features(hidden, weight, bias, nw, 1e-6).double()
    full = torch.log_softmax(z @ lm_head.double().T, -1).float()  # [N, H, V]
    if vocab_ids is not None:  # compare in lm_head row space
        inverse = torch.full((int(vocab_ids.max()) + 1,), -1, dtype=I64)
        inverse[vocab_ids] = torch.arange(vocab_ids.numel())
        ids, cpu_ids = inverse[ids.cpu()], inverse[cpu_ids]
    assert_topk_equivalent(lp.cpu(), ids.cpu(), cpu_lp, cpu_ids, full, TOL[lm_head.dtype].logprob)


@pytest.mark.parametrize(
    "n, h, d, v",
    [
        (1, 3, 64, 1000),  # 3 rows: the streaming kernel's 16-row tiles, V not a multiple of 128
        (4, 4, 96, 5000),  # 16 rows
        (7, 4, 40, 3001),  # 28 rows: 32-row tiles on tensor cores, D not a multiple of 32
        (16, 4, 64, 3001),  # 64 rows: the 64-row tiles
        (17, 4, 64, 3001),  # 68 rows: logits written, then the row top-k
        (3, 2, 60, 2000),  # D not a multiple of 8: the written-logits path at few rows
    ],
)
@pytest.mark.parametrize("k", [1, 8, 64, 65])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_cuda_heads_paths_match_cpu(n, h, d, v, k, dtype):
    hidden, weight, bias, lm_head, nw = heads_inputs(n, h, d, v, dtype, seed=31)
    check_heads_against_cpu(hidden, weight, bias, lm_head, k, nw)


@pytest.mark.parametrize(
    "n, d, v",
    [
        (3, 64, 1000),  # streamed
        (64, 40, 3001),  # 64 rows, streamed
        (70, 64, 3001),  # 70 rows: logits written, then the row top-k
        (3, 60, 2000),  # D not a multiple of 8: likewise
    ],
)
@pytest.mark.parametrize("k", [1, 8, 65])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("norm", [True, False])
def test_cuda_heads_without_weight_match_cpu(n, d, v, k, dtype, norm):
    hidden, _, _, lm_head, nw = heads_inputs(n, 1, d, v, dtype, seed=33, norm=norm)
    check_heads_against_cpu(hidden, None, None, lm_head, k, nw)
    vocab_ids = torch.randperm(9000, generator=torch.Generator().manual_seed(6))[:v]
    check_heads_against_cpu(hidden, None, None, lm_head, k, nw, vocab_ids)


def test_cuda_heads_vocab_ids_and_strided_lm_head():
    hidden, weight, bias, lm_head, nw = heads_inputs(2, 3, 64, 2500, BF16, seed=41)
    vocab_ids = torch.randperm(9000, generator=torch.Generator().manual_seed(5))[:2500]
    check_heads_against_cpu(hidden, weight, bias, lm_head, 10, nw, vocab_ids)
    # Rows 16-byte aligned but 80 elements apart (a slice of a wider table): still streamed.
    wide = randn(2500, 80, dtype=BF16, seed=42, scale=0.5)
    check_heads_against_cpu(hidden, weight, bias, wide[:, :64], 10, nw)
    # Rows not contiguous (a transposed view): the written-logits path.
    check_heads_against_cpu(hidden, weight, bias, lm_head.T.contiguous().T, 10, nw)
    # No bias, no norm.
    check_heads_against_cpu(hidden, weight, None, lm_head, 3, None)


def test_cuda_heads_nan_and_ties_match_cpu():
    # NaN logits rank first (ties toward the lower id) and make the log-normalizer NaN; equal rows of
    # lm_head give equal logits, ranked by id.
    hidden, weight, bias, lm_head, nw = heads_inputs(2, 2, 64, 700, F32, seed=51)
    lm_head[300] = float("nan")
    lm_head[12] = float("nan")
    lm_head[500] = lm_head[40]
    lm_head[650] = lm_head[40]
    args = (hidden, weight, bias, lm_head, 6, nw)
    lp, ids = ops.fused_mtp_heads(*to_cuda(args))
    cpu_lp, cpu_ids = ops.fused_mtp_heads(*args)
    assert torch.equal(ids[..., :2].cpu(), cpu_ids[..., :2])
    assert (ids[..., :2].cpu() == torch.tensor([12, 300])).all()
    assert torch.isnan(lp).all() and torch.isnan(cpu_lp).all()
    tied = torch.zeros(700, 64, dtype=F32)
    tied[[5, 200, 699]] = 1.0
    args = (hidden, weight, bias, tied, 5, nw)
    lp, ids = ops.fused_mtp_heads(*to_cuda(args))
    cpu_lp, cpu_ids = ops.fused_mtp_heads(*args)
    compare((lp, ids), (cpu_lp, cpu_ids), "ties")


@pytest.mark.parametrize(
    "b, t, d, v",
    [(1, 10, 64, 3000), (2, 16, 128, 5001), (4, 16, 64, 3000), (5, 16, 64, 3000), (2, 10, 60, 999)],
)
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_cuda_verify_from_hidden_paths_match_cpu(b, t, d, v, dtype):
    # B x T = 10, 32, 64 rows: streamed; 80 rows, or D not a multiple of 8: logits written.
    par = torch.tensor([-1] + [max(0, (i - 1) // 2) for i in range(1, t)])
    hidden = randn(b, t, d, dtype=dtype, seed=61)
    lm_head = randn(v, d, dtype=dtype, seed=62)
    nw = (1 + randn(d, seed=63, scale=0.1)).to(dtype)
    logits = ref.final_norm(hidden, nw) @ lm_head.float().T
    targets = ref.target_tokens(logits)
    draft = targets.gather(1, par.clamp(min=0).expand(b, t))
    draft[:, 1::3] = 0  # some branches rejected
    for norm in (nw, None):
        args = (draft, par, hidden, lm_head, norm)
        # 16-bit lm_head: tensor cores (about 2^-17 relative per term) may break a near-tie of the
        # float32 logits the other way than the CPU does.
        logits = ref64(lambda h, w, nw=norm: ref.final_norm(h, nw) @ w.float().T, hidden, lm_head)
        assert_equal_up_to_near_ties(ops.verify_tree_from_hidden(*to_cuda(args)),
                                     ops.verify_tree_from_hidden(*args), draft, par, logits, 1e-3)


def test_cuda_verify_from_hidden_nan_rows():
    b, t, d, v = 2, 6, 64, 900
    par = chain_tree(t)
    hidden = randn(b, t, d, dtype=F32, seed=71)
    lm_head = randn(v, d, dtype=F32, seed=72)
    lm_head[[700, 33]] = float("nan")  # every row's argmax: the lower NaN id
    draft = torch.full((b, t), 33)
    args = (draft, par, hidden, lm_head)
    out = ops.verify_tree_from_hidden(*to_cuda(args))
    compare(out, ops.verify_tree_from_hidden(*args), "verify_tree_from_hidden NaN")
    assert int(out[0][0]) == t - 1


def explained_by_rounding(logits, temperature, top_k, top_p, u, token, delta=1e-5):
    """Whether the reference samples `token` from one row when u or top_p moves by at most delta."""
    for du in (-delta, 0.0, delta):
        for dp in ((-delta, 0.0, delta) if top_p < 1 else (0.0,)):
            uu = torch.tensor(min(max(float(u) + du, 0.0), 1 - 1e-12))
            got = ref64(ref.target_tokens, logits, temperature, top_k, min(top_p + dp, 1.0), uu)
            if int(got) == int(token):
                return True
    return False


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 20, 1.0), (1.0, 20, 0.8), (1.2, 0, 0.9), (1.0, 100, 0.95),
     (0.5, 64, 1.0)],
)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_sampling_matches_cpu_up_to_cdf_rounding(temperature, top_k, top_p, dtype):
    rows, v = 512, 4099
    logits = randn(rows, v, dtype=dtype, seed=11, scale=2.5)
    u = rand(rows, seed=12)
    # Every node is a root here (T = 1), so target tokens come back as tokens[:, 0].
    draft = torch.zeros(rows, 1, dtype=I64)
    parents = torch.tensor([-1])
    args = (draft, parents, logits.unsqueeze(1), temperature, top_k, top_p, u.unsqueeze(1))
    cpu = ops.verify_tree(*args)[1][:, 0]
    gpu = ops.verify_tree(*to_cuda(args))[1][:, 0].cpu()
    differ = (cpu != gpu).nonzero().flatten().tolist()
    for r in differ:
        assert explained_by_rounding(logits[r], temperature, top_k, top_p, u[r], gpu[r]), (
            f"row {r}: CUDA sampled {int(gpu[r])}, CPU {int(cpu[r])}, u = {float(u[r])}"
        )
    print(f"{len(differ)} of {rows} sampled tokens differ, all within rounding of a CDF boundary")
    assert len(differ) <= max(2, rows // 100)


# ------------------------------------------------------------------------------------------------
# Large shapes: V = 262144, B = 64, and more than 2^31 elements
# ------------------------------------------------------------------------------------------------

BIG_V = 262144


def test_large_softmax_topk_and_verify():
    x = randn(64, BIG_V, dtype=BF16, seed=21, scale=4.0)
    for k in (1, 64):
        probs, ids = ops.softmax_topk(x.cuda(), k)
        cpu_probs, cpu_ids = ops.softmax_topk(x, k)
        assert torch.equal(ids.cpu(), cpu_ids)
        assert_close(probs.cpu(), cpu_probs, TOL[BF16].prob)
    b, t = 64, 4
    logits = randn(b, t, BIG_V, dtype=BF16, seed=22, scale=4.0)
    par = chain_tree(t)
    targets = ref.target_tokens(logits)
    draft = torch.cat([torch.full((b, 1), -1), targets[:, :-1]], 1)
    draft[::3, 2] = -5  # some rows stop early
    expected = ops.verify_tree(draft, par, logits)
    actual = ops.verify_tree(draft.cuda(), par.cuda(), logits.cuda())
    compare(actual, expected, "verify_tree")


@pytest.mark.parametrize("v, k", [(786432, 64), (96 * 8192 - 5, 64), (120 * 8192, 50)])
def test_merge_near_the_48kb_shared_memory_line(v, k):
    """The top-k merge holds chunks x k candidates (8 bytes each) in dynamic shared memory: at
    96 x 64 = 6144 they fill exactly 48 KB, which with the kernel's static share needs the
    opt-in above 48 KB."""
    x = randn(2, v, dtype=BF16, seed=28, scale=4.0)
    probs, ids = ops.softmax_topk(x.cuda(), k)
    cpu_probs, cpu_ids = ops.softmax_topk(x, k)
    assert torch.equal(ids.cpu(), cpu_ids)
    assert_close(probs.cpu(), cpu_probs, TOL[BF16].prob)


@pytest.mark.parametrize("v, k", [(49152, 32), (49152, 16), (128256, 12), (151936, 15)])
def test_fused_heads_merge_near_the_48kb_line(v, k):
    """The same line reached through the decode-size unembedding, whose chunk count follows the
    number of multiprocessors (these sizes put the merge at 47.5-48 KB on a 132-SM H200)."""
    hidden = randn(1, 64, seed=29)
    weight = randn(4, 64, 64, seed=30, scale=0.1)
    lm_head = randn(v, 64, dtype=BF16, seed=31)
    lp, ids = ops.fused_mtp_heads(hidden.cuda(), weight.cuda(), None, lm_head.cuda(), k)
    cpu_lp, cpu_ids = ops.fused_mtp_heads(hidden, weight, None, lm_head, k)
    full = torch.log_softmax(ref.head_features(hidden, weight, None).double()
                             @ lm_head.double().T, -1).float()
    assert_topk_equivalent(lp.cpu(), ids.cpu(), cpu_lp, cpu_ids, full, TOL[F32].logprob)


def test_large_marginalize():
    x, w = randn(64, 4, BIG_V, dtype=BF16, seed=23, scale=3.0), rand(64, 4, seed=24)
    out = ops.marginalize(x.cuda(), w.cuda())
    assert_close(out.cpu(), ops.marginalize(x, w), TOL[BF16].prob)
    for m in (8, 32):  # the one-read path, then the two passes
        probs, ids = ops.topk_marginalize(x.cuda(), w.cuda(), m)
        cpu_probs, cpu_ids = ops.topk_marginalize(x, w, m)
        assert_topk_equivalent(
            probs.cpu(), ids.cpu(), cpu_probs, cpu_ids, ops.marginalize(x, w), TOL[BF16].prob
        )


def test_large_fused_mtp_heads():
    n, h, d = 16, 4, 64  # N x H = 64 rows
    hidden = randn(n, d, dtype=BF16, seed=25)
    weight = randn(h, d, d, dtype=BF16, seed=26, scale=d**-0.5)
    lm_head = randn(BIG_V, d, dtype=BF16, seed=27, scale=0.5)
    lp, ids = ops.fused_mtp_heads(hidden.cuda(), weight.cuda(), None, lm_head.cuda(), 8)
    cpu_lp, cpu_ids = ops.fused_mtp_heads(hidden, weight, None, lm_head, 8)
    z = ref.head_features(hidden, weight, None).double()
    full = torch.log_softmax(z @ lm_head.double().T, -1).float()
    assert_topk_equivalent(lp.cpu(), ids.cpu(), cpu_lp, cpu_ids, full, TOL[BF16].logprob)


def test_unembedding_past_2_31_elements():
    # lm_head [262144, 8200]: 2^31 + 5M elements; the winners sit in its last rows.
    v, d = BIG_V, 8200
    lm_head = torch.zeros(v, d, dtype=BF16)
    lm_head[-64:] = randn(64, d, dtype=BF16, seed=81)
    lm_head[100] = randn(d, dtype=BF16, seed=82)
    hidden = randn(2, 8, d, dtype=BF16, seed=83)
    args = (torch.zeros(2, 8, dtype=I64), chain_tree(8), hidden, lm_head)
    compare(ops.verify_tree_from_hidden(*to_cuda(args)), ops.verify_tree_from_hidden(*args),
            "verify_tree_from_hidden")
    weight = randn(2, d, d, dtype=BF16, seed=84, scale=d**-0.5)
    args = (hidden[0, :4], weight, None, lm_head, 16)
    lp, ids = ops.fused_mtp_heads(*to_cuda(args))
    cpu_lp, cpu_ids = ops.fused_mtp_heads(*args)
    assert torch.equal(ids.cpu(), cpu_ids)
    assert_close(lp.cpu(), cpu_lp, TOL[BF16].logprob)
    assert (ids[..., 0] >= v - 64).any()
    del lm_head, weight
    torch.cuda.empty_cache()


def test_more_than_2_31_elements():
    rows = (1 << 31) // BIG_V + 8  # 8200 rows of 262144: 2^31 + 2M elements (4 GB in bfloat16)
    x = torch.randn(rows, BIG_V, device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    x = x.to(BF16)
    x[-1, BIG_V - 3] = 100.0  # the last rows' winners sit past element 2^31
    x[-2, 7] = 100.0
    probs, ids = ops.softmax_topk(x, 4)
    for r in (0, rows // 2, rows - 2, rows - 1):
        ref_probs, ref_ids = ref64(ref.softmax_topk, x[r].cpu(), 4)
        assert torch.equal(ids[r].cpu(), ref_ids), f"row {r}"
        assert_close(probs[r].cpu(), ref_probs, TOL[BF16].prob)
    assert int(ids[-1, 0]) == BIG_V - 3 and int(ids[-2, 0]) == 7
    del x
    torch.cuda.empty_cache()
