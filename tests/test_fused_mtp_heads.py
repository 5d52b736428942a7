"""fused_mtp_heads against mtp_ext.reference.fused_mtp_heads (in float64, see helpers.ref64).

The kernel computes the logits with its own float32 dot products, so near-tied logits may swap:
ids are compared with the ties-tolerant rule of helpers.assert_topk_equivalent, against the full
reference log-softmax.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, TOL, assert_topk_equivalent, devices, gen, randn, ref64

from mtp_ext import ops
from mtp_ext import reference as ref


def make_inputs(n, h, d, v, dtype, device, seed=0, bias=True, norm=True, hidden_scale=1.0):
    hidden = randn(n, d, dtype=dtype, device=device, seed=seed, scale=hidden_scale)
    weight = randn(h, d, d, dtype=dtype, device=device, seed=seed + 1, scale=d**-0.5)
    b = randn(h, d, dtype=dtype, device=device, seed=seed + 2, scale=0.1) if bias else None
    lm_head = randn(v, d, dtype=dtype, device=device, seed=seed + 3, scale=3 * d**-0.5)
    nw = (1 + randn(d, seed=seed + 4, scale=0.1)).to(dtype=dtype, device=device) if norm else None
    return hidden, weight, b, lm_head, nw


def full_logprobs(hidden, weight, bias, lm_head, norm_weight, eps):
    """Reference log-softmax over the whole vocabulary: [N, H, V]."""
    z = ref.head_features(hidden, weight, bias, norm_weight, eps)
    return torch.log_softmax(z @ lm_head.float().T, dim=-1)


def num_heads(weight):
    return 1 if weight is None else weight.shape[0]


def check(hidden, weight, bias, lm_head, k, norm_weight=None, eps=1e-6, dtype=None):
    lp, ids = ops.fused_mtp_heads(hidden, weight, bias, lm_head, k, norm_weight, eps)
    ref_lp, ref_ids = ref64(ref.fused_mtp_heads, hidden, weight, bias, lm_head, k, norm_weight, eps)
    assert lp.shape == ref_lp.shape == (hidden.shape[0], num_heads(weight), k)
    assert lp.dtype == torch.float32 and lp.device == hidden.device
    full = ref64(full_logprobs, hidden, weight, bias, lm_head, norm_weight, eps)
    assert_topk_equivalent(lp, ids, ref_lp, ref_ids, full, TOL[dtype or hidden.dtype].logprob)
    return lp, ids


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [1, 7, 1000])
@pytest.mark.parametrize("k_kind", ["one", "some", "all"])
@pytest.mark.parametrize("bias, norm", [(True, True), (False, False), (True, False), (False, True)])
def test_random(device, dtype, v, k_kind, bias, norm):
    k = {"one": 1, "some": min(5, v), "all": v}[k_kind]
    hidden, weight, b, lm_head, nw = make_inputs(
        5, 3, 37, v, dtype, device, seed=v, bias=bias, norm=norm
    )
    check(hidden, weight, b, lm_head, k, nw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "n, h, d, v, k, dtype",
    [(2, 3, 64, 49152, 10, torch.float32), (1, 2, 32, 151936, 1, torch.bfloat16)],
)
def test_large_vocab(device, n, h, d, v, k, dtype):
    hidden, weight, b, lm_head, nw = make_inputs(n, h, d, v, dtype, device, seed=5)
    check(hidden, weight, b, lm_head, k, nw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(device, dtype):
    n, h, d, v = 4, 2, 24, 301
    hidden = randn(d, n, dtype=dtype, device=device, seed=10).t()
    weight = randn(h, d, d, dtype=dtype, device=device, seed=11, scale=d**-0.5).transpose(1, 2)
    bias = randn(h, 2 * d, dtype=dtype, device=device, seed=12, scale=0.1)[:, ::2]
    lm_head = randn(2 * v, d, dtype=dtype, device=device, seed=13, scale=0.6)[::2]
    norm_weight = randn(2 * d, dtype=dtype, device=device, seed=14)[1::2]
    for t in (hidden, weight, bias, lm_head, norm_weight):
        assert not t.is_contiguous()
    check(hidden, weight, bias, lm_head, 9, norm_weight)
    lm_head_t = randn(d, v, dtype=dtype, device=device, seed=15, scale=0.6).t()
    check(hidden, weight, None, lm_head_t, v)


@pytest.mark.parametrize("device", devices())
def test_mixed_input_dtypes(device):
    hidden, weight, b, lm_head, nw = make_inputs(3, 2, 16, 200, torch.float32, device, seed=20)
    check(
        hidden.half(), weight, b.bfloat16(), lm_head.bfloat16(), 7, nw.half(), dtype=torch.bfloat16
    )


@pytest.mark.parametrize("device", devices())
def test_eps_is_used(device):
    # Small hidden states: eps = 0.5 dominates the RMS, so a kernel ignoring eps fails.
    hidden, weight, b, lm_head, nw = make_inputs(
        3, 2, 16, 100, torch.float32, device, seed=21, hidden_scale=0.05
    )
    lp_small, _ = check(hidden, weight, b, lm_head, 5, nw, eps=1e-6)
    lp_big, _ = check(hidden, weight, b, lm_head, 5, nw, eps=0.5)
    assert not torch.allclose(lp_small, lp_big, atol=1e-3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("zero_weight", [True, False])
def test_single_head_known_answer(device, zero_weight):
    # weight = 0, bias = 0: z = x + SiLU(0) = x, so the logits are hidden @ lm_head.T; without
    # weight the one head's z is x too.
    d, v = 8, 50
    hidden = randn(4, d, device=device, seed=22)
    lm_head = randn(v, d, device=device, seed=23)
    weight = torch.zeros(1, d, d, device=device) if zero_weight else None
    lp, ids = ops.fused_mtp_heads(hidden, weight, None, lm_head, 4)
    logits = hidden.cpu().double() @ lm_head.cpu().double().T
    expected = torch.log_softmax(logits, -1).sort(dim=-1, descending=True, stable=True)
    assert ids[:, 0].cpu().tolist() == expected.indices[:, :4].tolist()
    torch.testing.assert_close(
        lp[:, 0].cpu().double(), expected.values[:, :4], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n, h", [(0, 3), (2, 0), (0, 0)])
def test_empty(device, n, h):
    hidden, weight, b, lm_head, nw = make_inputs(n, h, 8, 20, torch.float32, device, seed=24)
    lp, ids = ops.fused_mtp_heads(hidden, weight, b, lm_head, 4, nw)
    ref_lp, ref_ids = ref.fused_mtp_heads(hidden, weight, b, lm_head, 4, nw)
    assert lp.shape == ref_lp.shape == (n, h, 4) and ids.shape == ref_ids.shape
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_vocab_size_all_dtypes(device, dtype):
    hidden, weight, b, lm_head, nw = make_inputs(4, 4, 256, 128256, dtype, device, seed=30)
    for k in (1, 10, 128256):
        check(hidden, weight, b, lm_head, k, nw)


# ------------------------------------------------------------------------------------------------
# Draft vocabulary (vocab_ids)
# ------------------------------------------------------------------------------------------------


def draft_vocab(v_full, s, seed, device):
    """``s`` distinct full-vocabulary ids in no particular order (as a frequency ranking gives)."""
    return torch.randperm(v_full, generator=gen(seed))[:s].to(device)


def check_vocab_ids(hidden, weight, bias, lm_head, k, norm_weight, vocab_ids, v_full, dtype=None):
    """Against the reference with the same vocab_ids; the near-tie rule reads the reference
    log-softmax over the draft rows, scattered to their full ids (-inf at every other id, so an id
    outside vocab_ids fails)."""
    sub = lm_head[vocab_ids]
    lp, ids = ops.fused_mtp_heads(hidden, weight, bias, sub, k, norm_weight, 1e-6, vocab_ids)
    ref_lp, ref_ids = ref64(
        ref.fused_mtp_heads, hidden, weight, bias, sub, k, norm_weight, 1e-6, vocab_ids.cpu()
    )
    assert lp.shape == ref_lp.shape == (hidden.shape[0], num_heads(weight), k)
    assert ids.dtype == torch.int64 and ids.device == hidden.device
    rows = ref64(full_logprobs, hidden, weight, bias, sub, norm_weight, 1e-6)
    full = torch.full((*rows.shape[:-1], v_full), float("-inf"))
    full.scatter_(-1, vocab_ids.cpu().expand_as(rows), rows)
    assert_topk_equivalent(lp, ids, ref_lp, ref_ids, full, TOL[dtype or hidden.dtype].logprob)
    # The ids are exactly vocab_ids[row] of the same kernel run on the rows alone, same values.
    lp_rows, row_ids = ops.fused_mtp_heads(hidden, weight, bias, sub, k, norm_weight, 1e-6)
    assert torch.equal(lp, lp_rows)
    assert torch.equal(ids, vocab_ids[row_ids])
    return lp, ids


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [1, 7, 1000])
@pytest.mark.parametrize("k_kind", ["one", "some", "all"])
def test_vocab_ids(device, dtype, s, k_kind):
    v_full = 1500
    k = {"one": 1, "some": min(5, s), "all": s}[k_kind]
    hidden, weight, b, lm_head, nw = make_inputs(5, 3, 37, v_full, dtype, device, seed=s)
    _, ids = check_vocab_ids(
        hidden, weight, b, lm_head, k, nw, draft_vocab(v_full, s, s, device), v_full
    )
    if s == 1000:
        assert int(ids.max()) >= s  # full ids, not row numbers


@pytest.mark.parametrize("device", devices())
def test_vocab_ids_real_sizes(device):
    # A 32768-token draft vocabulary of a 151936-token model, ids up to the last one.
    v_full, s = 151936, 32768
    hidden, weight, b, lm_head, nw = make_inputs(2, 2, 32, v_full, torch.bfloat16, device, seed=40)
    last = torch.tensor([v_full - 1], device=device)
    vocab_ids = torch.cat([draft_vocab(v_full - 1, s - 1, 41, device), last])
    check_vocab_ids(hidden, weight, b, lm_head, 10, nw, vocab_ids, v_full)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias, norm", [(True, True), (False, False)])
def test_vocab_ids_arange_is_no_vocab_ids(device, bias, norm):
    v = 1000
    hidden, weight, b, lm_head, nw = make_inputs(4, 3, 37, v, torch.float32, device, 42, bias, norm)
    for k in (1, 10, v):
        plain = ops.fused_mtp_heads(hidden, weight, b, lm_head, k, nw)
        mapped = ops.fused_mtp_heads(
            hidden, weight, b, lm_head, k, nw, 1e-6, torch.arange(v, device=device)
        )
        for x, y in zip(plain, mapped):
            assert torch.equal(x, y)


@pytest.mark.parametrize("device", devices())
def test_vocab_ids_non_contiguous_and_mixed_dtypes(device):
    v_full, s = 700, 300
    hidden, weight, b, lm_head, nw = make_inputs(3, 2, 16, v_full, torch.float32, device, seed=43)
    big = torch.zeros(2 * s, dtype=torch.long, device=device)
    big[1::2] = draft_vocab(v_full, s, 44, device)
    vocab_ids = big[1::2]
    assert not vocab_ids.is_contiguous()
    hidden, b, lm_head, nw = hidden.half(), b.bfloat16(), lm_head.bfloat16(), nw.half()
    check_vocab_ids(hidden, weight, b, lm_head, 7, nw, vocab_ids, v_full, dtype=torch.bfloat16)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("n, h", [(0, 3), (2, 0)])
def test_vocab_ids_empty(device, n, h):
    hidden, weight, b, lm_head, nw = make_inputs(n, h, 8, 20, torch.float32, device, seed=45)
    vocab_ids = draft_vocab(50, 20, 46, device)
    lp, ids = ops.fused_mtp_heads(hidden, weight, b, lm_head, 4, nw, 1e-6, vocab_ids)
    assert lp.shape == ids.shape == (n, h, 4) and ids.dtype == torch.int64


# ------------------------------------------------------------------------------------------------
# One head without a residual block (weight=None): the final norm, the unembedding and the top-k
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "n, d, v",
    [
        (5, 37, 1000),  # a depth that is not a multiple of 8
        (3, 40, 7),
        (1, 64, 3001),
        (70, 24, 513),  # more rows than the streamed unembedding serves on CUDA
    ],
)
@pytest.mark.parametrize("k_kind", ["one", "some", "all"])
@pytest.mark.parametrize("norm", [True, False])
def test_without_weight(device, dtype, n, d, v, k_kind, norm):
    k = {"one": 1, "some": min(5, v), "all": v}[k_kind]
    hidden, _, _, lm_head, nw = make_inputs(n, 1, d, v, dtype, device, seed=n + v, norm=norm)
    lp, ids = check(hidden, None, None, lm_head, k, nw)
    assert lp.shape == ids.shape == (n, 1, k)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [True, False])
def test_without_weight_is_a_zero_residual_block(device, dtype, norm):
    # x + SiLU(x . 0) = x: a [1, D, D] zero weight gives the same head, bit for bit.
    hidden, _, _, lm_head, nw = make_inputs(6, 1, 48, 900, dtype, device, seed=50, norm=norm)
    zero = torch.zeros(1, 48, 48, dtype=dtype, device=device)
    for k in (1, 8):
        without = ops.fused_mtp_heads(hidden, None, None, lm_head, k, nw)
        zeroed = ops.fused_mtp_heads(hidden, zero, None, lm_head, k, nw)
        for x, y in zip(without, zeroed):
            assert torch.equal(x, y)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_without_weight_non_contiguous(device, dtype):
    n, d, v = 4, 24, 301
    hidden = randn(d, n, dtype=dtype, device=device, seed=53).t()
    lm_head = randn(2 * v, d, dtype=dtype, device=device, seed=54, scale=0.6)[::2]
    norm_weight = randn(2 * d, dtype=dtype, device=device, seed=55)[1::2]
    for t in (hidden, lm_head, norm_weight):
        assert not t.is_contiguous()
    check(hidden, None, None, lm_head, 9, norm_weight)
    check(hidden, None, None, lm_head, v)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s, k", [(7, 7), (1000, 5), (1000, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_without_weight_vocab_ids(device, dtype, s, k, norm):
    v_full = 1500
    hidden, _, _, lm_head, nw = make_inputs(5, 1, 37, v_full, dtype, device, seed=s, norm=norm)
    check_vocab_ids(hidden, None, None, lm_head, k, nw, draft_vocab(v_full, s, s, device), v_full)


@pytest.mark.parametrize("device", devices())
def test_without_weight_mixed_input_dtypes(device):
    hidden, _, _, lm_head, nw = make_inputs(3, 1, 16, 200, torch.float32, device, seed=56)
    check(hidden.half(), None, None, lm_head.bfloat16(), 7, nw.half(), dtype=torch.bfloat16)


@pytest.mark.parametrize("device", devices())
def test_without_weight_empty(device):
    hidden, _, _, lm_head, nw = make_inputs(0, 1, 8, 20, torch.float32, device, seed=57)
    for vocab_ids in (None, draft_vocab(50, 20, 58, device)):
        lp, ids = ops.fused_mtp_heads(hidden, None, None, lm_head, 4, nw, 1e-6, vocab_ids)
        ref_lp, _ = ref.fused_mtp_heads(hidden, None, None, lm_head, 4, nw)
        assert lp.shape == ids.shape == ref_lp.shape == (0, 1, 4)
        assert lp.dtype == torch.float32 and ids.dtype == torch.int64
