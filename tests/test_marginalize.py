"""marginalize and topk_marginalize against the references (in float64, see helpers.ref64), and
against exact marginals.

The kernels sum the L weighted softmaxes in their own float32 order, so topk_marginalize's ids are
compared with the ties-tolerant rule of helpers.assert_topk_equivalent.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    DTYPES,
    TOL,
    assert_close,
    assert_topk_equivalent,
    devices,
    gen,
    rand,
    randn,
    ref64,
)

from mtp_ext import ops
from mtp_ext import reference as ref


def make_inputs(b, l, v, dtype, device, seed=0, zero_rows=False):
    logits = randn(b, l, v, dtype=dtype, device=device, seed=seed, scale=3.0)
    weights = rand(b, l, device=device, seed=seed + 1)
    if zero_rows and b > 1:
        weights[1] = 0.0  # an all-zero row
    if l > 2:
        weights[:, 1] = 0.0  # a zero weight inside a row
    return logits, weights


def check_marginalize(logits, weights, renormalize):
    out = ops.marginalize(logits, weights, renormalize)
    expected = ref64(ref.marginalize, logits, weights, renormalize)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert out.device == logits.device
    assert_close(out, expected, TOL[logits.dtype].prob)
    return out


def check_topk(logits, weights, m, renormalize):
    probs, ids = ops.topk_marginalize(logits, weights, m, renormalize)
    ref_probs, ref_ids = ref64(ref.topk_marginalize, logits, weights, m, renormalize)
    full = ref64(ref.marginalize, logits, weights, renormalize)
    assert probs.device == logits.device and ids.device == logits.device
    assert_topk_equivalent(probs, ids, ref_probs, ref_ids, full, TOL[logits.dtype].prob)
    return probs, ids


SIZES = [(3, 4, 1), (3, 4, 7), (2, 5, 1000), (2, 3, 4099)]  # 4099: crosses the 2048-wide chunks


# ------------------------------------------------------------------------------------------------
# marginalize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, l, v", SIZES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_marginalize_random(device, dtype, b, l, v, renormalize):
    logits, weights = make_inputs(b, l, v, dtype, device, seed=v, zero_rows=True)
    check_marginalize(logits, weights, renormalize)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("weights_dtype", DTYPES)
def test_marginalize_weight_dtypes(device, weights_dtype):
    logits, weights = make_inputs(2, 3, 50, torch.float32, device, seed=7)
    check_marginalize(logits, weights.to(weights_dtype), True)
    check_marginalize(logits, weights.to(weights_dtype), False)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "b, l, v, dtype", [(1, 2, 151936, torch.float32), (1, 3, 49152, torch.bfloat16)]
)
def test_marginalize_large_vocab(device, b, l, v, dtype):
    logits, weights = make_inputs(b, l, v, dtype, device, seed=11)
    check_marginalize(logits, weights, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["v_strided", "sliced", "weights_transposed"])
def test_marginalize_non_contiguous(device, dtype, layout):
    b, l, v = 3, 4, 333
    if layout == "v_strided":
        logits = randn(b, v, l, dtype=dtype, device=device, seed=12).transpose(1, 2)
        weights = rand(b, l, device=device, seed=13)
    elif layout == "sliced":
        logits = randn(b + 2, l + 1, 2 * v, dtype=dtype, device=device, seed=14)[1:-1, 1:, ::2]
        weights = rand(b, 2 * l, device=device, seed=15)[:, ::2]
    else:
        logits = randn(b, l, v, dtype=dtype, device=device, seed=16)
        weights = rand(l, b, device=device, seed=17).t()
    assert not (logits.is_contiguous() and weights.is_contiguous())
    check_marginalize(logits, weights, True)
    check_topk(logits, weights, 10, False)


@pytest.mark.parametrize("device", devices())
def test_marginalize_empty(device):
    out = ops.marginalize(torch.zeros(0, 3, 9, device=device), torch.zeros(0, 3, device=device))
    assert out.shape == (0, 9) and out.dtype == torch.float32
    # L = 0: an empty mixture is all zeros.
    out = check_marginalize(
        torch.zeros(2, 0, 9, device=device), torch.zeros(2, 0, device=device), True
    )
    assert torch.equal(out.cpu(), torch.zeros(2, 9))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("renormalize", [True, False])
def test_marginalize_zero_weights_give_zeros(device, renormalize):
    logits = randn(2, 4, 100, device=device, seed=18)
    weights = torch.zeros(2, 4, device=device)
    weights[1, 2] = 0.5
    out = ops.marginalize(logits, weights, renormalize)
    assert torch.equal(out[0].cpu(), torch.zeros(100))
    scale = 1.0 if renormalize else 0.5
    assert_close(
        out[1].cpu(), scale * torch.softmax(logits[1, 2].float().cpu(), -1), TOL[torch.float32].prob
    )


# --- exact marginals of a tiny random "model", by brute force ----------------------------------


def tiny_model(v, dtype, seed):
    """Logits of a tiny model: next token [V], the token after [V, V], the one after [V, V, V]."""
    l1 = randn(v, dtype=dtype, seed=seed, scale=2.0)
    l2 = randn(v, v, dtype=dtype, seed=seed + 1, scale=2.0)
    l3 = randn(v, v, v, dtype=dtype, seed=seed + 2, scale=2.0)
    return l1, l2, l3


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_marginalize_equals_exact_marginal_t2(device, dtype, renormalize):
    v = 6
    l1, l2, _ = tiny_model(v, dtype, seed=20)
    p1 = torch.softmax(l1.double(), -1)
    p2 = torch.softmax(l2.double(), -1)
    # p(x_{t+2}) = sum_v p(x_{t+1} = v) p(x_{t+2} | v), every intermediate token enumerated.
    exact = torch.stack([sum(p1[a] * p2[a, c] for a in range(v)) for c in range(v)])
    assert_close(exact, p1 @ p2, (1e-12, 1e-12))  # the brute force agrees with the matrix form
    out = ops.marginalize(
        l2.unsqueeze(0).to(device), p1.float().unsqueeze(0).to(device), renormalize
    )
    assert_close(out[0].cpu().double(), exact, TOL[dtype].prob)
    # Scaled weights: renormalize undoes the scale, no renormalize keeps it.
    out = ops.marginalize(
        l2.unsqueeze(0).to(device), 3 * p1.float().unsqueeze(0).to(device), renormalize
    )
    assert_close(out[0].cpu().double(), exact * (1 if renormalize else 3), TOL[dtype].prob)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_marginalize_equals_exact_marginal_t3_paths(device, dtype):
    v = 5
    l1, l2, l3 = tiny_model(v, dtype, seed=30)
    p1 = torch.softmax(l1.double(), -1)
    p2 = torch.softmax(l2.double(), -1)
    p3 = torch.softmax(l3.double(), -1)
    exact = torch.zeros(v, dtype=torch.float64)
    for a, b_ in itertools.product(range(v), range(v)):
        exact += p1[a] * p2[a, b_] * p3[a, b_]
    # One path per pair of intermediate tokens, weighted by the product of its probabilities.
    weights = (p1[:, None] * p2).reshape(1, v * v).float()
    out = ops.marginalize(l3.reshape(1, v * v, v).to(device), weights.to(device), True)
    assert_close(out[0].cpu().double(), exact, TOL[dtype].prob)


@pytest.mark.parametrize("device", devices())
def test_marginalize_truncated_top_k_intermediates(device):
    v, k = 8, 3
    l1, l2, _ = tiny_model(v, torch.float32, seed=40)
    p1 = torch.softmax(l1.double(), -1)
    p2 = torch.softmax(l2.double(), -1)
    top = torch.sort(p1, descending=True).indices[:k]
    # Numerical marginalization over the top-k intermediate tokens, weights renormalized.
    approx = sum(p1[a] * p2[a] for a in top.tolist()) / p1[top].sum()
    out = ops.marginalize(
        l2[top].unsqueeze(0).to(device), p1[top].float().unsqueeze(0).to(device), True
    )
    assert_close(out[0].cpu().double(), approx, TOL[torch.float32].prob)


# ------------------------------------------------------------------------------------------------
# topk_marginalize
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, l, v", SIZES)
@pytest.mark.parametrize("m_kind", ["one", "some", "all"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_marginalize_random(device, dtype, b, l, v, m_kind, renormalize):
    m = {"one": 1, "some": min(5, v), "all": v}[m_kind]
    logits, weights = make_inputs(b, l, v, dtype, device, seed=v + 100, zero_rows=True)
    probs, ids = check_topk(logits, weights, m, renormalize)
    assert probs.shape == (b, m) and ids.shape == (b, m)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "b, l, v, m, dtype", [(1, 2, 151936, 8, torch.float32), (2, 3, 49152, 49152, torch.bfloat16)]
)
def test_topk_marginalize_large_vocab(device, b, l, v, m, dtype):
    logits, weights = make_inputs(b, l, v, dtype, device, seed=50)
    check_topk(logits, weights, m, True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_topk_marginalize_exact_ties_go_to_lower_id(device, dtype):
    # L = 1 and integer logits: equal logits give bit-identical mixture values, hence exact ties.
    g = gen(60)
    logits = torch.randint(-3, 4, (2, 1, 5000), generator=g).to(dtype=dtype, device=device)
    weights = torch.ones(2, 1, device=device)
    probs, ids = check_topk(logits, weights, 5000, True)
    probs, ids = probs.cpu(), ids.cpu()
    equal = probs[:, 1:] == probs[:, :-1]
    assert bool(equal.any())
    assert bool((ids[:, 1:] > ids[:, :-1])[equal].all()), "ties must go to the lower id"
    # Known answer: the top-3 of a row are its three lowest ids holding the maximum logit.
    top_ids = (logits[0, 0].float().cpu() == 3).nonzero()[:3, 0]
    assert ids[0, :3].tolist() == top_ids.tolist()


@pytest.mark.parametrize("device", devices())
def test_topk_marginalize_empty(device):
    probs, ids = ops.topk_marginalize(
        torch.zeros(0, 2, 9, device=device), torch.zeros(0, 2, device=device), 3
    )
    assert probs.shape == (0, 3) and ids.shape == (0, 3) and ids.dtype == torch.int64
    # L = 0 and all-zero weights: the marginal is all zeros, so the top-m are ids 0..m-1.
    for logits, weights in [
        (torch.zeros(2, 0, 9), torch.zeros(2, 0)),
        (randn(2, 3, 9, seed=61), torch.zeros(2, 3)),
    ]:
        probs, ids = check_topk(logits.to(device), weights.to(device), 4, True)
        assert torch.equal(probs.cpu(), torch.zeros(2, 4))
        assert ids.cpu().tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [32000, 151936])
def test_real_vocab_sizes_all_dtypes(device, dtype, v):
    logits, weights = make_inputs(2, 8, v, dtype, device, seed=70)
    for renormalize in (True, False):
        check_marginalize(logits, weights, renormalize)
        for m in (1, 64, v):
            check_topk(logits, weights, m, renormalize)
