"""Argument safety of the ops: sizes and offsets that would overflow int64, tensors on different
devices (a meta tensor among CPU tensors included), draft vocabularies with negative ids, token ids
outside the vocabulary, and which checks the CUDA launchers make without
MTP_EXT_CUDA_VALUE_CHECKS. Every call either follows the op's contract or raises an error naming
the argument; none reads or writes outside its tensors."""

from __future__ import annotations

import re

import helpers
import pytest
import torch
from helpers import CUDA_AVAILABLE, devices, randn
from test_bad_input import CASES, chain

from mtp_ext import ops

I64 = torch.int64
INT64_MAX = 2**63 - 1


def runs_cuda_code(device) -> bool:
    """Whether an op on ``device`` runs the CUDA launchers (a GPU, or the CPU emulator)."""
    return str(device).startswith("cuda") or helpers.CUDA_CODE_ON_CPU


def names(message: str, *words: str) -> bool:
    return all(re.search(rf"\b{re.escape(w)}\b", message) for w in words)


# ------------------------------------------------------------------------------------------------
# Sizes and offsets that overflow int64
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("prefix_len", [2**63 - 3, 2**63 - 2, INT64_MAX, 2**62 + 1, 6, 7])
def test_compact_kv_prefix_len_past_the_cache_raises(device, prefix_len):
    """prefix_len + T > S, also where the sum wraps around in int64: nothing is written before or
    after the cache."""
    big = torch.arange(80.0, device=device)
    cache = big[64:72].view(1, 1, 8, 1)
    before = big.clone()
    with pytest.raises(ValueError) as info:
        ops.compact_kv(cache, torch.tensor([[0, 2, -1]], device=device),
                       torch.tensor([1], device=device), prefix_len)
    assert names(str(info.value), "prefix_len"), str(info.value)
    assert torch.equal(big, before), "compact_kv wrote into memory around the cache"


@pytest.mark.parametrize("device", devices())
def test_compact_kv_last_fitting_prefix_len(device):
    """prefix_len = S - T, the largest that fits, still moves the path's entries."""
    cache = torch.arange(8.0, device=device).view(1, 1, 8, 1)
    ops.compact_kv(cache, torch.tensor([[0, 2, -1]], device=device),
                   torch.tensor([1], device=device), 5)
    assert cache.flatten().tolist() == [0, 1, 2, 3, 4, 5, 7, 7]


@pytest.mark.parametrize("device", devices())
def test_compact_kv_overlapping_cache_raises(device):
    """A cache whose entries share memory (an expanded tensor) cannot be compacted in place."""
    cache = torch.zeros(1, 1, 1, 4, device=device).expand(2, 3, 8, 4)
    with pytest.raises(ValueError) as info:
        ops.compact_kv(cache, torch.tensor([[0, 2, -1]] * 2, device=device),
                       torch.tensor([1, 1], device=device), 2)
    assert names(str(info.value), "cache"), str(info.value)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("prefix_len", [2**63 - 3, INT64_MAX, 2**62, 2**50])
def test_tree_attention_mask_huge_prefix_len_names_it(device, prefix_len):
    """A mask too large to exist: the error names prefix_len and the size the mask would need."""
    with pytest.raises((ValueError, RuntimeError)) as info:
        ops.tree_attention_mask(chain(3).to(device), prefix_len)
    message = str(info.value)
    assert names(message, "prefix_len", str(prefix_len)), message
    assert "bytes" in message, message


# Calls whose output has more elements than int64 counts: zero-size inputs (D = 0, L = 0, K = 0)
# whose other dims are huge.
OUTPUT_OVERFLOW = [
    (
        "marginalize",
        lambda dev: ops.marginalize(torch.zeros(2**40, 0, 2**40, device=dev),
                                    torch.zeros(2**40, 0, device=dev)),
        ["next_logits"],
    ),
    (
        "topk_marginalize",
        lambda dev: ops.topk_marginalize(torch.zeros(2**40, 0, 2**40, device=dev),
                                         torch.zeros(2**40, 0, device=dev), 2**40),
        ["next_logits", "m"],
    ),
    (
        "fused_mtp_heads",
        lambda dev: ops.fused_mtp_heads(torch.zeros(2**40, 0, device=dev),
                                        torch.zeros(2**30, 0, 0, device=dev), None,
                                        torch.zeros(10, 0, device=dev), 1),
        ["hidden", "weight", "k"],
    ),
    (
        "small_batch_linear",
        lambda dev: ops.small_batch_linear(torch.zeros(2**40, 0, device=dev),
                                           torch.zeros(2**40, 0, device=dev)),
        ["x", "weight"],
    ),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("call, words", [c[1:] for c in OUTPUT_OVERFLOW],
                         ids=[c[0] for c in OUTPUT_OVERFLOW])
def test_output_too_large_for_int64_names_the_arguments(device, call, words):
    with pytest.raises(ValueError) as info:
        call(device)
    assert names(str(info.value), *words), str(info.value)


@pytest.mark.parametrize("device", devices())
def test_cuda_vocabulary_limit_names_the_argument(device):
    """The CUDA kernels count tokens in int32: a vocabulary of 2^31 or more is refused by name
    (an expanded tensor: no memory behind it)."""
    if not runs_cuda_code(device):
        pytest.skip("a limit of the CUDA kernels")
    logits = torch.zeros(1, 1, device=device).expand(2, 2**31)
    with pytest.raises(ValueError) as info:
        ops.softmax_topk(logits, 1)
    assert names(str(info.value), "logits", "2^31"), str(info.value)
    with pytest.raises(ValueError) as info:
        ops.verify_tree(torch.zeros(2, 1, dtype=I64, device=device), chain(1).to(device),
                        logits.unsqueeze(1))
    assert names(str(info.value), "target_logits", "2^31"), str(info.value)


@pytest.mark.emulator_slow
@pytest.mark.parametrize("device", devices())
def test_fused_mtp_heads_more_heads_than_a_grid_dimension(device):
    """65536 heads, one more than a CUDA grid's z dimension holds: the heads' products must not be
    one launch with a block per head in z."""
    hidden, lm_head = randn(1, 8, seed=1), randn(10, 8, seed=2)
    weight = randn(2**16, 8, 8, seed=3, scale=0.3)
    logprobs, ids = ops.fused_mtp_heads(hidden.to(device), weight.to(device), None,
                                        lm_head.to(device), 2)
    x = hidden[:, None, :]
    z = x + torch.nn.functional.silu(torch.einsum("nd,hed->nhe", hidden, weight))
    want = torch.log_softmax(z @ lm_head.T, -1).topk(2, dim=-1)
    assert torch.equal(ids.cpu(), want.indices)
    torch.testing.assert_close(logprobs.cpu(), want.values, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Draft vocabularies: vocab_ids
# ------------------------------------------------------------------------------------------------


def _heads_with_vocab_ids(vocab_ids: torch.Tensor, device):
    """One head whose best row of lm_head is row 3."""
    lm_head = torch.zeros(10, 4)
    lm_head[3] = 1.0
    return ops.fused_mtp_heads(torch.ones(2, 4, device=device), None, None, lm_head.to(device),
                               2, None, 1e-6, vocab_ids.to(device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bad", [-1, -3, -(2**63)])
def test_fused_mtp_heads_negative_vocab_ids_raise(device, bad):
    vocab_ids = torch.arange(100, 110)
    vocab_ids[3] = bad
    with pytest.raises(ValueError) as info:
        _heads_with_vocab_ids(vocab_ids, device)
    message = str(info.value)
    assert names(message, "vocab_ids") and f"= {bad}" in message, message


@pytest.mark.parametrize("device", devices())
def test_fused_mtp_heads_vocab_ids_map_rows_to_full_ids(device):
    """Any non-negative ids, in any order, above the table's row count included."""
    vocab_ids = torch.tensor([7, 2**40, 5, 123456, 0, 9, 8, 6, 4, 3])
    _, ids = _heads_with_vocab_ids(vocab_ids, device)
    assert ids[:, 0, 0].tolist() == [123456, 123456]


# ------------------------------------------------------------------------------------------------
# Tensors on different devices
# ------------------------------------------------------------------------------------------------


def _op_calls():
    """Every op with valid CPU arguments: name -> (call(**tensors), tensors by argument name)."""
    b, t, v, d = 2, 4, 10, 8
    f32 = randn(b, 3, v)
    return {
        "softmax_topk": (lambda logits: ops.softmax_topk(logits, 3), {"logits": randn(b, v)}),
        "marginalize": (
            lambda next_logits, weights: ops.marginalize(next_logits, weights),
            {"next_logits": f32, "weights": torch.ones(b, 3)},
        ),
        "topk_marginalize": (
            lambda next_logits, weights: ops.topk_marginalize(next_logits, weights, 3),
            {"next_logits": f32, "weights": torch.ones(b, 3)},
        ),
        "fused_mtp_heads": (
            lambda hidden, weight, bias, lm_head, norm_weight, vocab_ids: ops.fused_mtp_heads(
                hidden, weight, bias, lm_head, 3, norm_weight, 1e-6, vocab_ids
            ),
            {
                "hidden": randn(b, d),
                "weight": randn(2, d, d),
                "bias": randn(2, d),
                "lm_head": randn(v, d),
                "norm_weight": torch.ones(d),
                "vocab_ids": torch.arange(v),
            },
        ),
        "verify_tree": (
            lambda draft_tokens, parents, target_logits, uniforms: ops.verify_tree(
                draft_tokens, parents, target_logits, 1.0, 0, 1.0, uniforms
            ),
            {
                "draft_tokens": torch.zeros(b, t, dtype=I64),
                "parents": chain(t),
                "target_logits": randn(b, t, v),
                "uniforms": torch.full((b, t), 0.5),
            },
        ),
        "verify_tree_from_hidden": (
            lambda draft_tokens, parents, hidden, lm_head, norm_weight: ops.verify_tree_from_hidden(
                draft_tokens, parents, hidden, lm_head, norm_weight
            ),
            {
                "draft_tokens": torch.zeros(b, t, dtype=I64),
                "parents": chain(t),
                "hidden": randn(b, t, d),
                "lm_head": randn(v, d),
                "norm_weight": torch.ones(d),
            },
        ),
        "small_batch_linear": (
            lambda x, weight, bias: ops.small_batch_linear(x, weight, bias),
            {"x": randn(3, d), "weight": randn(5, d), "bias": randn(5)},
        ),
        "tree_attention_mask": (
            lambda parents: ops.tree_attention_mask(parents, 2),
            {"parents": chain(t)},
        ),
        "compact_kv": (
            lambda cache, path, num_accepted: ops.compact_kv(cache, path, num_accepted, 2),
            {
                "cache": torch.zeros(b, 3, 8, 4),
                "path": torch.tensor([[0, 1, 2, -1], [0, 2, -1, -1]]),
                "num_accepted": torch.tensor([2, 1]),
            },
        ),
    }


OP_CALLS = _op_calls()
MIXED = [(op, arg) for op, (_, tensors) in OP_CALLS.items() if len(tensors) > 1 for arg in tensors]


@pytest.mark.parametrize("op, arg", MIXED, ids=[f"{op}-{arg}" for op, arg in MIXED])
def test_one_meta_tensor_among_cpu_tensors_raises(op, arg):
    """The fakes run whenever a meta tensor is among the arguments: they must refuse mixed devices
    rather than return uninitialized CPU tensors."""
    call, tensors = OP_CALLS[op]
    args = {k: (x.to("meta") if k == arg else x.clone()) for k, x in tensors.items()}
    with pytest.raises(ValueError) as info:
        call(**args)
    message = str(info.value)
    assert names(message, arg, "meta", "cpu") and "same device" in message, message


@pytest.mark.parametrize("op", list(OP_CALLS))
def test_all_meta_tensors_give_meta_outputs(op):
    call, tensors = OP_CALLS[op]
    out = call(**{k: x.to("meta") for k, x in tensors.items()})
    for o in out if isinstance(out, tuple) else (out,):
        assert o.device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
@pytest.mark.parametrize("op, arg", MIXED, ids=[f"{op}-{arg}" for op, arg in MIXED])
def test_one_cpu_tensor_among_cuda_tensors_raises(op, arg):
    call, tensors = OP_CALLS[op]
    args = {k: (x.clone() if k == arg else x.cuda()) for k, x in tensors.items()}
    with pytest.raises(ValueError) as info:
        call(**args)
    message = str(info.value)
    assert names(message, arg, "cpu") and "same device" in message, message


# ------------------------------------------------------------------------------------------------
# What the CUDA launchers check without MTP_EXT_CUDA_VALUE_CHECKS
# ------------------------------------------------------------------------------------------------

# The cases of test_bad_input whose check reads tensor data: the CUDA launchers make them only
# with MTP_EXT_CUDA_VALUE_CHECKS=1 (a host synchronization); every other case is always checked.
VALUE_CASES = {
    "marg_neg_weights",
    "marg_nan_weights",
    "marg_neg_weights_no_renorm",
    "tmarg_neg_weights",
    "heads_vocab_ids_negative",
    "vt_root_not_minus1",
    "vt_parent_ge_i",
    "vt_parent_eq_i",
    "vt_parent_neg",
    "vt_parent_row1_bad",
    "vh_root_not_minus1",
    "vh_parent_ge_i",
    "vh_parent_neg",
    "vh_parent_row1_bad",
    "mask_root_not_minus1",
    "mask_parent_ge_i",
    "mask_parent_neg",
    "kv_num_neg",
    "kv_num_ge_t",
    "kv_path_ge_t",
    "kv_path_lt_j",
    "kv_path_neg",
}


def test_value_cases_exist():
    assert VALUE_CASES <= {c[0] for c in CASES}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_checks_without_value_checks_switch(device, case, monkeypatch):
    """With MTP_EXT_CUDA_VALUE_CHECKS=0 every shape, dtype, size and scalar check still raises on
    every device; the value checks are skipped on the CUDA code path only, which then returns
    without reading or writing outside its tensors."""
    monkeypatch.setenv("MTP_EXT_CUDA_VALUE_CHECKS", "0")
    name, call, exc, word = case
    if name in VALUE_CASES and runs_cuda_code(device):
        call(device)
        return
    with pytest.raises(exc) as info:
        call(device)
    assert names(str(info.value), word), str(info.value)


# ------------------------------------------------------------------------------------------------
# Token ids outside the vocabulary in draft_tokens
# ------------------------------------------------------------------------------------------------

V = 10
# Every node of the star's root has target 3. Only node 8 drafts 3; the others draft ids outside
# [0, V), some equal to 3 modulo V or modulo 2^32 (a kernel that wrapped or narrowed them would
# accept one), and -1, the padding.
OUT_OF_RANGE_DRAFT = [-1, 3 + V, 3 - V, 3 + 2**32, 3 - 2**32, INT64_MAX, -(2**63), -1, 3]


def _star_inputs(device):
    t = len(OUT_OF_RANGE_DRAFT)
    draft = torch.tensor([OUT_OF_RANGE_DRAFT, OUT_OF_RANGE_DRAFT[:-1] + [V]], device=device)
    parents = torch.tensor([-1] + [0] * (t - 1), device=device)
    logits = torch.zeros(2, t, V)
    logits[..., 3] = 30.0
    return draft, parents, logits.to(device)


def _expect_star(out, t):
    num, tokens, path = (o.cpu().tolist() for o in out)
    pad = [-1] * (t - 2)
    assert num == [1, 0]
    assert tokens == [[3, 3] + pad, [3, -1] + pad]
    assert path == [[0, t - 1] + pad, [0, -1] + pad]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_verify_tree_out_of_range_draft_tokens_never_match(device, temperature):
    draft, parents, logits = _star_inputs(device)
    u = torch.full(draft.shape, 0.5, device=device) if temperature > 0 else None
    _expect_star(ops.verify_tree(draft, parents, logits, temperature, 0, 1.0, u), draft.shape[1])


@pytest.mark.parametrize("device", devices())
def test_verify_tree_from_hidden_out_of_range_draft_tokens_never_match(device):
    draft, parents, _ = _star_inputs(device)
    lm_head = torch.zeros(V, 8)
    lm_head[3] = 1.0
    hidden = torch.ones(2, draft.shape[1], 8, device=device)
    _expect_star(ops.verify_tree_from_hidden(draft, parents, hidden, lm_head.to(device)),
                 draft.shape[1])
