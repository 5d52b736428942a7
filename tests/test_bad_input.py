"""Bad input: every check a user can trigger raises ValueError (values, shapes) or TypeError
(dtypes) with a message naming the argument; NaN / inf never crash and ids stay in [0, V)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import (
    CUDA_AVAILABLE,
    DTYPES,
    TOL,
    assert_close,
    assert_ids_valid,
    devices,
    rand,
    randn,
    ref64,
)

from mtp_ext import ops
from mtp_ext import reference as ref

F32, F64, I64, I32 = torch.float32, torch.float64, torch.int64, torch.int32


def z(*shape, dtype=F32):
    return torch.zeros(*shape, dtype=dtype)


def chain(t):
    return torch.tensor([-1] + list(range(t - 1)))


def softmax_topk(logits=None, k=3, temperature=1.0):
    return lambda dev: ops.softmax_topk(
        (z(2, 10) if logits is None else logits).to(dev), k, temperature
    )


def marginalize(next_logits=None, weights=None, renormalize=True):
    nl = z(2, 3, 10) if next_logits is None else next_logits
    w = torch.ones(2, 3) if weights is None else weights
    return lambda dev: ops.marginalize(nl.to(dev), w.to(dev), renormalize)


def topk_marginalize(next_logits=None, weights=None, m=3):
    nl = z(2, 3, 10) if next_logits is None else next_logits
    w = torch.ones(2, 3) if weights is None else weights
    return lambda dev: ops.topk_marginalize(nl.to(dev), w.to(dev), m)


def heads(
    hidden=None, weight=..., bias=..., lm_head=None, k=3, norm_weight=..., eps=1e-6, vocab_ids=None
):
    n, h, d, v = 2, 3, 4, 10
    args = {
        "hidden": z(n, d) if hidden is None else hidden,
        "weight": z(h, d, d) if weight is ... else weight,
        "bias": z(h, d) if bias is ... else bias,
        "lm_head": z(v, d) if lm_head is None else lm_head,
        "norm_weight": torch.ones(d) if norm_weight is ... else norm_weight,
    }
    return lambda dev: ops.fused_mtp_heads(
        args["hidden"].to(dev),
        None if args["weight"] is None else args["weight"].to(dev),
        None if args["bias"] is None else args["bias"].to(dev),
        args["lm_head"].to(dev),
        k,
        None if args["norm_weight"] is None else args["norm_weight"].to(dev),
        eps,
        None if vocab_ids is None else vocab_ids.to(dev),
    )


def verify(
    draft=None, parents=None, logits=None, temperature=0.0, top_k=0, top_p=1.0, uniforms=...
):
    b, t, v = 2, 4, 10
    d = torch.zeros(b, t, dtype=I64) if draft is None else draft
    p = chain(t) if parents is None else parents
    x = z(b, t, v) if logits is None else logits
    u = (z(b, t) if temperature > 0 else None) if uniforms is ... else uniforms
    return lambda dev: ops.verify_tree(
        d.to(dev), p.to(dev), x.to(dev), temperature, top_k, top_p, None if u is None else u.to(dev)
    )


def from_hidden(draft=None, parents=None, hidden=None, lm_head=None, norm_weight=..., eps=1e-6):
    b, t, d, v = 2, 4, 8, 10
    dr = torch.zeros(b, t, dtype=I64) if draft is None else draft
    p = chain(t) if parents is None else parents
    h = z(b, t, d) if hidden is None else hidden
    w = z(v, d) if lm_head is None else lm_head
    nw = torch.ones(d) if norm_weight is ... else norm_weight
    return lambda dev: ops.verify_tree_from_hidden(
        dr.to(dev), p.to(dev), h.to(dev), w.to(dev), None if nw is None else nw.to(dev), eps
    )


def linear(x=None, weight=None, bias=...):
    m, k, n = 3, 5, 7
    xx = z(m, k) if x is None else x
    w = z(n, k) if weight is None else weight
    bb = z(n) if bias is ... else bias
    return lambda dev: ops.small_batch_linear(
        xx.to(dev), w.to(dev), None if bb is None else bb.to(dev)
    )


def mask(parents=None, prefix_len=2, dtype=F32):
    p = chain(4) if parents is None else parents
    return lambda dev: ops.tree_attention_mask(p.to(dev), prefix_len, dtype)


def compact(cache=None, path=None, num=None, prefix_len=2):
    c = z(2, 3, 8, 4) if cache is None else cache
    pa = torch.tensor([[0, 1, 2, -1], [0, 2, -1, -1]]) if path is None else path
    n = torch.tensor([2, 1]) if num is None else num
    return lambda dev: ops.compact_kv(c.to(dev), pa.to(dev), n.to(dev), prefix_len)


# (id, call, exception, words the message must contain)
CASES = [
    # softmax_topk
    ("topk_int_logits", softmax_topk(logits=z(2, 10, dtype=I64)), TypeError, "logits"),
    ("topk_f64_logits", softmax_topk(logits=z(2, 10, dtype=F64)), TypeError, "logits"),
    ("topk_0d_logits", softmax_topk(logits=torch.tensor(1.0), k=1), ValueError, "logits"),
    ("topk_k0", softmax_topk(k=0), ValueError, "k"),
    ("topk_k_neg", softmax_topk(k=-2), ValueError, "k"),
    ("topk_k_gt_v", softmax_topk(k=11), ValueError, "k"),
    ("topk_temp0", softmax_topk(temperature=0.0), ValueError, "temperature"),
    ("topk_temp_neg", softmax_topk(temperature=-1.0), ValueError, "temperature"),
    # marginalize
    ("marg_2d_logits", marginalize(next_logits=z(2, 10)), ValueError, "next_logits"),
    ("marg_4d_logits", marginalize(next_logits=z(2, 3, 10, 1)), ValueError, "next_logits"),
    ("marg_1d_weights", marginalize(weights=torch.ones(3)), ValueError, "weights"),
    ("marg_weights_l", marginalize(weights=torch.ones(2, 4)), ValueError, "weights"),
    ("marg_weights_b", marginalize(weights=torch.ones(3, 3)), ValueError, "weights"),
    ("marg_int_logits", marginalize(next_logits=z(2, 3, 10, dtype=I32)), TypeError, "next_logits"),
    ("marg_f64_logits", marginalize(next_logits=z(2, 3, 10, dtype=F64)), TypeError, "next_logits"),
    ("marg_int_weights", marginalize(weights=torch.ones(2, 3, dtype=I64)), TypeError, "weights"),
    (
        "marg_neg_weights",
        marginalize(weights=torch.tensor([[1.0, -0.5, 1.0], [1.0, 1.0, 1.0]])),
        ValueError,
        "weights",
    ),
    (
        "marg_nan_weights",
        marginalize(weights=torch.tensor([[1.0, 1.0, 1.0], [float("nan"), 1.0, 1.0]])),
        ValueError,
        "weights",
    ),
    (
        "marg_neg_weights_no_renorm",
        marginalize(weights=-torch.ones(2, 3), renormalize=False),
        ValueError,
        "weights",
    ),
    # topk_marginalize
    ("tmarg_m0", topk_marginalize(m=0), ValueError, "m"),
    ("tmarg_m_gt_v", topk_marginalize(m=11), ValueError, "m"),
    ("tmarg_2d_logits", topk_marginalize(next_logits=z(2, 10)), ValueError, "next_logits"),
    ("tmarg_weights_shape", topk_marginalize(weights=torch.ones(2, 2)), ValueError, "weights"),
    (
        "tmarg_f64_logits",
        topk_marginalize(next_logits=z(2, 3, 10, dtype=F64)),
        TypeError,
        "next_logits",
    ),
    (
        "tmarg_neg_weights",
        topk_marginalize(weights=torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, -1e-3]])),
        ValueError,
        "weights",
    ),
    # fused_mtp_heads
    ("heads_3d_hidden", heads(hidden=z(2, 4, 1)), ValueError, "hidden"),
    ("heads_2d_weight", heads(weight=z(4, 4)), ValueError, "weight"),
    ("heads_1d_lm_head", heads(lm_head=z(10)), ValueError, "lm_head"),
    ("heads_weight_d", heads(weight=z(3, 5, 4)), ValueError, "weight"),
    ("heads_weight_d_in", heads(weight=z(3, 4, 5)), ValueError, "weight"),
    ("heads_lm_head_d", heads(lm_head=z(10, 5)), ValueError, "lm_head"),
    ("heads_bias_h", heads(bias=z(2, 4)), ValueError, "bias"),
    ("heads_bias_d", heads(bias=z(3, 5)), ValueError, "bias"),
    ("heads_bias_1d", heads(bias=z(4)), ValueError, "bias"),
    ("heads_norm_d", heads(norm_weight=torch.ones(5)), ValueError, "norm_weight"),
    ("heads_norm_2d", heads(norm_weight=torch.ones(1, 4)), ValueError, "norm_weight"),
    ("heads_k0", heads(k=0), ValueError, "k"),
    ("heads_k_gt_v", heads(k=11), ValueError, "k"),
    ("heads_int_hidden", heads(hidden=z(2, 4, dtype=I64)), TypeError, "hidden"),
    ("heads_f64_weight", heads(weight=z(3, 4, 4, dtype=F64)), TypeError, "weight"),
    ("heads_f64_lm_head", heads(lm_head=z(10, 4, dtype=F64)), TypeError, "lm_head"),
    ("heads_int_bias", heads(bias=z(3, 4, dtype=I32)), TypeError, "bias"),
    ("heads_f64_norm", heads(norm_weight=torch.ones(4, dtype=F64)), TypeError, "norm_weight"),
    ("heads_neg_eps", heads(eps=-1e-6), ValueError, "eps"),
    ("heads_bias_without_weight", heads(weight=None), ValueError, "bias"),
    ("heads_bias_1d_without_weight", heads(weight=None, bias=z(4)), ValueError, "bias"),
    (
        "heads_no_weight_norm_d",
        heads(weight=None, bias=None, norm_weight=torch.ones(5)),
        ValueError,
        "norm_weight",
    ),
    ("heads_no_weight_k_gt_v", heads(weight=None, bias=None, k=11), ValueError, "k"),
    ("heads_vocab_ids_short", heads(vocab_ids=torch.arange(9)), ValueError, "vocab_ids"),
    ("heads_vocab_ids_long", heads(vocab_ids=torch.arange(11)), ValueError, "vocab_ids"),
    ("heads_vocab_ids_2d", heads(vocab_ids=torch.arange(10).view(1, 10)), ValueError, "vocab_ids"),
    ("heads_vocab_ids_0d", heads(vocab_ids=torch.tensor(3)), ValueError, "vocab_ids"),
    ("heads_vocab_ids_int32", heads(vocab_ids=torch.arange(10, dtype=I32)), TypeError, "vocab_ids"),
    ("heads_vocab_ids_float", heads(vocab_ids=torch.arange(10.0)), TypeError, "vocab_ids"),
    (
        "heads_vocab_ids_negative",
        heads(vocab_ids=torch.tensor([0, 1, 2, -3, 4, 5, 6, 7, 8, 9])),
        ValueError,
        "vocab_ids",
    ),
    # verify_tree
    ("vt_float_draft", verify(draft=z(2, 4)), TypeError, "draft_tokens"),
    ("vt_1d_draft", verify(draft=torch.zeros(4, dtype=I64)), ValueError, "draft_tokens"),
    (
        "vt_empty_tree",
        verify(
            draft=torch.zeros(2, 0, dtype=I64),
            parents=torch.zeros(0, dtype=I64),
            logits=z(2, 0, 10),
        ),
        ValueError,
        "draft_tokens",
    ),
    ("vt_int32_parents", verify(parents=chain(4).int()), TypeError, "parents"),
    ("vt_3d_parents", verify(parents=chain(4).expand(1, 2, 4)), ValueError, "parents"),
    ("vt_parents_t", verify(parents=chain(5)), ValueError, "parents"),
    ("vt_parents_b", verify(parents=chain(4).expand(3, 4)), ValueError, "parents"),
    ("vt_2d_logits", verify(logits=z(2, 10)), ValueError, "target_logits"),
    ("vt_logits_t", verify(logits=z(2, 5, 10)), ValueError, "target_logits"),
    ("vt_logits_b", verify(logits=z(1, 4, 10)), ValueError, "target_logits"),
    ("vt_logits_v0", verify(logits=z(2, 4, 0)), ValueError, "target_logits"),
    ("vt_int_logits", verify(logits=z(2, 4, 10, dtype=I64)), TypeError, "target_logits"),
    ("vt_f64_logits", verify(logits=z(2, 4, 10, dtype=F64)), TypeError, "target_logits"),
    ("vt_root_not_minus1", verify(parents=torch.tensor([0, 0, 1, 2])), ValueError, "parents"),
    ("vt_parent_ge_i", verify(parents=torch.tensor([-1, 0, 2, 1])), ValueError, "parents"),
    ("vt_parent_eq_i", verify(parents=torch.tensor([-1, 1, 1, 2])), ValueError, "parents"),
    ("vt_parent_neg", verify(parents=torch.tensor([-1, 0, -1, 2])), ValueError, "parents"),
    (
        "vt_parent_row1_bad",
        verify(parents=torch.tensor([[-1, 0, 1, 2], [-1, 0, 3, 1]])),
        ValueError,
        "parents",
    ),
    ("vt_temp_neg", verify(temperature=-0.5), ValueError, "temperature"),
    ("vt_top_p_0", verify(top_p=0.0), ValueError, "top_p"),
    ("vt_top_p_gt1", verify(top_p=1.5), ValueError, "top_p"),
    ("vt_top_p_neg", verify(temperature=1.0, top_p=-0.1), ValueError, "top_p"),
    ("vt_top_k_neg", verify(top_k=-1), ValueError, "top_k"),
    ("vt_uniforms_missing", verify(temperature=1.0, uniforms=None), ValueError, "uniforms"),
    ("vt_uniforms_shape", verify(temperature=1.0, uniforms=z(2, 5)), ValueError, "uniforms"),
    ("vt_uniforms_1d", verify(temperature=1.0, uniforms=z(8)), ValueError, "uniforms"),
    (
        "vt_uniforms_int",
        verify(temperature=1.0, uniforms=torch.zeros(2, 4, dtype=I64)),
        TypeError,
        "uniforms",
    ),
    # verify_tree_from_hidden
    ("vh_float_draft", from_hidden(draft=z(2, 4)), TypeError, "draft_tokens"),
    ("vh_int32_draft", from_hidden(draft=torch.zeros(2, 4, dtype=I32)), TypeError, "draft_tokens"),
    ("vh_1d_draft", from_hidden(draft=torch.zeros(4, dtype=I64)), ValueError, "draft_tokens"),
    (
        "vh_empty_tree",
        from_hidden(
            draft=torch.zeros(2, 0, dtype=I64), parents=torch.zeros(0, dtype=I64), hidden=z(2, 0, 8)
        ),
        ValueError,
        "draft_tokens",
    ),
    ("vh_int32_parents", from_hidden(parents=chain(4).int()), TypeError, "parents"),
    ("vh_3d_parents", from_hidden(parents=chain(4).expand(1, 2, 4)), ValueError, "parents"),
    ("vh_parents_t", from_hidden(parents=chain(5)), ValueError, "parents"),
    ("vh_parents_b", from_hidden(parents=chain(4).expand(3, 4)), ValueError, "parents"),
    ("vh_root_not_minus1", from_hidden(parents=torch.tensor([0, 0, 1, 2])), ValueError, "parents"),
    ("vh_parent_ge_i", from_hidden(parents=torch.tensor([-1, 0, 2, 1])), ValueError, "parents"),
    ("vh_parent_neg", from_hidden(parents=torch.tensor([-1, 0, -1, 2])), ValueError, "parents"),
    (
        "vh_parent_row1_bad",
        from_hidden(parents=torch.tensor([[-1, 0, 1, 2], [-1, 0, 3, 1]])),
        ValueError,
        "parents",
    ),
    ("vh_2d_hidden", from_hidden(hidden=z(2, 8)), ValueError, "hidden"),
    ("vh_4d_hidden", from_hidden(hidden=z(2, 4, 8, 1)), ValueError, "hidden"),
    ("vh_hidden_b", from_hidden(hidden=z(3, 4, 8)), ValueError, "hidden"),
    ("vh_hidden_t", from_hidden(hidden=z(2, 5, 8)), ValueError, "hidden"),
    ("vh_int_hidden", from_hidden(hidden=z(2, 4, 8, dtype=I64)), TypeError, "hidden"),
    ("vh_f64_hidden", from_hidden(hidden=z(2, 4, 8, dtype=F64)), TypeError, "hidden"),
    ("vh_1d_lm_head", from_hidden(lm_head=z(10)), ValueError, "lm_head"),
    ("vh_lm_head_d", from_hidden(lm_head=z(10, 7)), ValueError, "lm_head"),
    ("vh_lm_head_v0", from_hidden(lm_head=z(0, 8)), ValueError, "lm_head"),
    ("vh_f64_lm_head", from_hidden(lm_head=z(10, 8, dtype=F64)), TypeError, "lm_head"),
    ("vh_int_lm_head", from_hidden(lm_head=z(10, 8, dtype=I32)), TypeError, "lm_head"),
    ("vh_norm_d", from_hidden(norm_weight=torch.ones(7)), ValueError, "norm_weight"),
    ("vh_norm_2d", from_hidden(norm_weight=torch.ones(1, 8)), ValueError, "norm_weight"),
    ("vh_f64_norm", from_hidden(norm_weight=torch.ones(8, dtype=F64)), TypeError, "norm_weight"),
    ("vh_neg_eps", from_hidden(eps=-1e-6), ValueError, "eps"),
    # small_batch_linear
    ("lin_1d_x", linear(x=z(5)), ValueError, "x"),
    ("lin_3d_x", linear(x=z(1, 3, 5)), ValueError, "x"),
    ("lin_1d_weight", linear(weight=z(5)), ValueError, "weight"),
    ("lin_3d_weight", linear(weight=z(1, 7, 5)), ValueError, "weight"),
    ("lin_weight_k", linear(weight=z(7, 4)), ValueError, "weight"),
    ("lin_weight_transposed", linear(weight=z(5, 7)), ValueError, "weight"),
    ("lin_bias_n", linear(bias=z(6)), ValueError, "bias"),
    ("lin_bias_k", linear(bias=z(5)), ValueError, "bias"),
    ("lin_bias_2d", linear(bias=z(1, 7)), ValueError, "bias"),
    ("lin_int_x", linear(x=z(3, 5, dtype=I64)), TypeError, "x"),
    ("lin_f64_x", linear(x=z(3, 5, dtype=F64)), TypeError, "x"),
    ("lin_int_weight", linear(weight=z(7, 5, dtype=I32)), TypeError, "weight"),
    ("lin_f64_weight", linear(weight=z(7, 5, dtype=F64)), TypeError, "weight"),
    ("lin_bool_weight", linear(weight=z(7, 5, dtype=torch.bool)), TypeError, "weight"),
    ("lin_int_bias", linear(bias=z(7, dtype=I32)), TypeError, "bias"),
    ("lin_f64_bias", linear(bias=z(7, dtype=F64)), TypeError, "bias"),
    # tree_attention_mask
    ("mask_float_parents", mask(parents=chain(4).float()), TypeError, "parents"),
    ("mask_3d_parents", mask(parents=chain(4).expand(1, 1, 4)), ValueError, "parents"),
    ("mask_root_not_minus1", mask(parents=torch.tensor([1, 0, 1])), ValueError, "parents"),
    ("mask_parent_ge_i", mask(parents=torch.tensor([-1, 0, 3, 1])), ValueError, "parents"),
    (
        "mask_parent_neg",
        mask(parents=torch.tensor([[-1, 0, 1], [-1, -1, 0]])),
        ValueError,
        "parents",
    ),
    ("mask_neg_prefix", mask(prefix_len=-1), ValueError, "prefix_len"),
    ("mask_prefix_overflow", mask(prefix_len=2**63 - 3), ValueError, "prefix_len"),
    ("mask_int_dtype", mask(dtype=torch.int32), TypeError, "dtype"),
    # compact_kv
    ("kv_3d_cache", compact(cache=z(2, 8, 4)), ValueError, "cache"),
    ("kv_1d_path", compact(path=torch.tensor([0, 1, 2, -1])), ValueError, "path"),
    (
        "kv_int32_path",
        compact(path=torch.tensor([[0, 1, 2, -1], [0, 2, -1, -1]], dtype=I32)),
        TypeError,
        "path",
    ),
    ("kv_path_b", compact(path=torch.zeros(3, 4, dtype=I64)), ValueError, "path"),
    ("kv_2d_num", compact(num=torch.tensor([[2, 1]])), ValueError, "num_accepted"),
    ("kv_num_b", compact(num=torch.tensor([2, 1, 0])), ValueError, "num_accepted"),
    ("kv_float_num", compact(num=torch.tensor([2.0, 1.0])), TypeError, "num_accepted"),
    ("kv_num_neg", compact(num=torch.tensor([-1, 1])), ValueError, "num_accepted"),
    ("kv_num_ge_t", compact(num=torch.tensor([2, 4])), ValueError, "num_accepted"),
    (
        "kv_path_ge_t",
        compact(path=torch.tensor([[0, 1, 4, -1], [0, 2, -1, -1]])),
        ValueError,
        "path",
    ),
    (
        "kv_path_lt_j",
        compact(path=torch.tensor([[0, 1, 1, -1], [0, 2, -1, -1]])),
        ValueError,
        "path",
    ),
    (
        "kv_path_neg",
        compact(path=torch.tensor([[0, 1, 2, -1], [0, -1, -1, -1]])),
        ValueError,
        "path",
    ),
    ("kv_neg_prefix", compact(prefix_len=-1), ValueError, "prefix_len"),
    ("kv_tree_too_long", compact(prefix_len=5), ValueError, "prefix_len"),
    ("kv_prefix_overflow", compact(prefix_len=2**63 - 3), ValueError, "prefix_len"),
    ("kv_head_dim_strided", compact(cache=z(2, 3, 8, 8)[..., ::2]), ValueError, "cache"),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("call, exc, word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(device, call, exc, word):
    with pytest.raises(exc) as info:
        call(device)
    message = str(info.value)
    assert re.search(rf"\b{re.escape(word)}\b", message), (
        f"message does not name {word!r}: {message}"
    )


def test_good_defaults_of_the_cases_run():
    """The valid inputs each case starts from must not raise: each case fails for its one change."""
    for valid in (
        softmax_topk(),
        marginalize(),
        topk_marginalize(),
        heads(),
        heads(vocab_ids=torch.arange(10)),
        heads(weight=None, bias=None),
        verify(),
        from_hidden(),
        from_hidden(norm_weight=None),
        linear(),
        linear(bias=None),
        verify(temperature=1.0),
        mask(),
        compact(),
    ):
        valid("cpu")


# ------------------------------------------------------------------------------------------------
# NaN and inf never crash; ids stay in range
# ------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def special_rows(v: int, dtype) -> torch.Tensor:
    """[6, v] rows: one NaN, one +inf, one -inf, all NaN, all -inf, and NaN + inf + -inf mixed."""
    x = randn(6, v, seed=1)
    x[0, v // 2] = NAN
    x[1, v // 3] = INF
    x[2, v // 4] = -INF
    x[3] = NAN
    x[4] = -INF
    x[5, 0], x[5, v - 1], x[5, v // 2] = -INF, NAN, INF
    return x.to(dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("v", [7, 1000])
def test_softmax_topk_non_finite(device, dtype, v):
    x = special_rows(v, dtype).to(device)
    for k in (1, 3, v):
        probs, ids = ops.softmax_topk(x, k)
        assert probs.shape == (6, k)
        assert_ids_valid(ids, v)
        # The contract ranks NaN above every number: the reference's ranking, exactly.
        ref_probs, ref_ids = ref64(ref.softmax_topk, x.cpu(), k)
        assert torch.equal(ids.cpu(), ref_ids)
        assert_close(probs.cpu(), ref_probs, TOL[dtype].prob, equal_nan=True)
    # A row whose only NaN is at position j ranks j first (NaN ranks above every number).
    _, ids = ops.softmax_topk(x[0:1], 1)
    assert ids.item() == v // 2


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_marginalize_non_finite(device, dtype):
    v = 300
    logits = special_rows(v, dtype).reshape(2, 3, v).to(device)
    weights = rand(2, 3, device=device, seed=2)
    out = ops.marginalize(logits, weights)
    assert out.shape == (2, v) and out.dtype == torch.float32
    assert_close(
        out.cpu(),
        ref64(ref.marginalize, logits.cpu(), weights.cpu()),
        TOL[dtype].prob,
        equal_nan=True,
    )
    for m in (1, 5, v):
        probs, ids = ops.topk_marginalize(logits, weights, m)
        assert probs.shape == (2, m)
        assert_ids_valid(ids, v)
        assert torch.equal(
            ids.cpu(), ref64(ref.topk_marginalize, logits.cpu(), weights.cpu(), m)[1]
        )


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_mtp_heads_non_finite(device, dtype):
    n, h, d, v = 4, 2, 8, 100
    hidden = randn(n, d, seed=3)
    hidden[0, 1] = NAN
    hidden[1] = NAN
    hidden[2, 0] = INF
    hidden[3, 0] = -INF
    weight = randn(h, d, d, seed=4, scale=0.3)
    lm_head = randn(v, d, seed=5)
    lm_head[7, 3] = NAN
    for k in (1, 4, v):
        for norm in (None, torch.ones(d)):
            args = [t.to(dtype=dtype, device=device) for t in (hidden, weight, lm_head)]
            nw = None if norm is None else norm.to(dtype=dtype, device=device)
            lp, ids = ops.fused_mtp_heads(args[0], args[1], None, args[2], k, nw)
            assert lp.shape == (n, h, k)
            assert_ids_valid(ids, v)
            # Row 1 is all NaN: every logit ties (NaN == NaN in the ranking), so ids 0..k-1.
            assert ids[1].cpu().tolist() == [list(range(k))] * h


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_mtp_heads_without_weight_non_finite(device, dtype):
    n, d, v = 4, 8, 100
    hidden = randn(n, d, seed=3)
    hidden[0, 1] = NAN
    hidden[1] = NAN
    hidden[2, 0] = INF
    hidden[3, 0] = -INF
    lm_head = randn(v, d, seed=5)
    lm_head[7, 3] = NAN
    for k in (1, 4, v):
        for norm in (None, torch.ones(d)):
            x, table = (t.to(dtype=dtype, device=device) for t in (hidden, lm_head))
            nw = None if norm is None else norm.to(dtype=dtype, device=device)
            lp, ids = ops.fused_mtp_heads(x, None, None, table, k, nw)
            assert lp.shape == (n, 1, k)
            assert_ids_valid(ids, v)
            # Row 1 is all NaN: every logit ties (NaN == NaN in the ranking), so ids 0..k-1.
            assert ids[1].cpu().tolist() == [list(range(k))]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8), (1.2, 5, 0.5)],
)
def test_verify_tree_non_finite(device, dtype, temperature, top_k, top_p):
    b, t, v = 6, 5, 40
    logits = special_rows(v * t, dtype).reshape(b, t, v).to(device)
    # Draft tokens that would match wherever the target lands on a low id, padding elsewhere.
    draft = torch.tensor([-1, 0, 1, 2, 3]).expand(b, t).contiguous().to(device)
    parents = torch.tensor([-1, 0, 0, 1, 2], device=device)
    uniforms = rand(b, t, seed=6, device=device) if temperature > 0 else None
    num, tokens, path = ops.verify_tree(draft, parents, logits, temperature, top_k, top_p, uniforms)
    num, tokens, path = num.cpu(), tokens.cpu(), path.cpu()
    expected = ref64(
        ref.verify_tree,
        draft.cpu(),
        parents.cpu(),
        logits.cpu(),
        temperature,
        top_k,
        top_p,
        None if uniforms is None else uniforms.cpu(),
    )
    for got, exp in zip((num, tokens, path), expected):
        assert torch.equal(got, exp)
    assert bool(((num >= 0) & (num < t)).all())
    for r in range(b):
        n = int(num[r])
        assert all(0 <= tok < v for tok in tokens[r, : n + 1].tolist()), tokens[r]
        assert (tokens[r, n + 1 :] == -1).all() and (path[r, n + 1 :] == -1).all()
        assert path[r, 0] == 0 and all(0 < p < t for p in path[r, 1 : n + 1].tolist())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="same device"):
        ops.marginalize(torch.zeros(2, 3, 10, device="cuda"), torch.ones(2, 3))
    with pytest.raises(ValueError, match="same device"):
        ops.verify_tree(
            torch.zeros(2, 4, dtype=I64, device="cuda"),
            chain(4),
            torch.zeros(2, 4, 10, device="cuda"),
        )
    with pytest.raises(ValueError, match="same device"):
        ops.compact_kv(
            torch.zeros(2, 3, 8, 4, device="cuda"),
            torch.zeros(2, 4, dtype=I64),
            torch.zeros(2, dtype=I64),
            0,
        )
    with pytest.raises(ValueError, match="same device"):
        ops.small_batch_linear(torch.zeros(2, 4, device="cuda"), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same device"):
        ops.small_batch_linear(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(3, device="cuda"))
    with pytest.raises(ValueError, match="same device"):
        ops.verify_tree_from_hidden(
            torch.zeros(2, 4, dtype=I64, device="cuda"),
            chain(4).cuda(),
            torch.zeros(2, 4, 8, device="cuda"),
            torch.zeros(10, 8),
        )
    with pytest.raises(ValueError, match="same device"):
        ops.fused_mtp_heads(
            torch.zeros(2, 4, device="cuda"),
            torch.zeros(3, 4, 4, device="cuda"),
            None,
            torch.zeros(10, 4, device="cuda"),
            3,
            None,
            1e-6,
            torch.arange(10),
        )
