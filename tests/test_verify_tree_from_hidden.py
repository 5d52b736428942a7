"""verify_tree_from_hidden against mtp_ext.reference.verify_tree_from_hidden (in float64).

The op is greedy verify_tree on ``final_norm(hidden) @ lm_head.T``. The kernel computes those logits
with its own float32 dot products, so two logits within rounding of each other may rank either
way: integer outputs must equal the reference's exactly, except in rows where the kernel's walk is
a valid walk for targets that are near ties (within NEAR_TIE of the row's best reference logit).
The data is well separated so that such rows are rare.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DTYPES,
    TREES,
    assert_equal_up_to_near_ties,
    devices,
    randn,
    random_case,
    ref64,
)
from test_verify_tree import KNOWN, logits_for_targets

from mtp_ext import ops
from mtp_ext import reference as ref

NEAR_TIE = 1e-4


def ref_logits(hidden, lm_head, norm_weight=None, eps=1e-6):
    """The logits the reference verifies: ``final_norm(hidden) @ lm_head.T``, [B, T, V]."""
    return ref.final_norm(hidden, norm_weight, eps) @ lm_head.float().T


def make_case(b, t, v, d, dtype, seed, batched_parents, norm=True):
    """Random hidden states (rows of very different scales), lm_head and norm weight, and a random
    tree whose drafts equal the parent's reference target with probability 0.7 (deep walks)."""
    row_scale = torch.exp(randn(b, t, 1, seed=seed, scale=1.0))
    hidden = (randn(b, t, d, seed=seed + 1) * row_scale).to(dtype)
    # Normed features have RMS ~1: logits of std ~4, so the top-2 gaps are far above rounding.
    lm_head = randn(v, d, dtype=dtype, seed=seed + 2, scale=4 * d**-0.5)
    nw = (1 + randn(d, seed=seed + 3, scale=0.3)).to(dtype) if norm else None
    logits = ref64(ref_logits, hidden, lm_head, nw)
    targets = ref.target_tokens(logits)
    draft, parents, _ = random_case(b, t, v, dtype, seed + 4, batched_parents, targets)
    return draft, parents, hidden, lm_head, nw, logits


def check(draft, parents, hidden, lm_head, nw, logits, device, eps=1e-6):
    args = [draft, parents, hidden, lm_head, nw]
    out = ops.verify_tree_from_hidden(*(None if a is None else a.to(device) for a in args), eps)
    for o in out:
        assert o.device.type == torch.device(device).type
    expected = ref64(ref.verify_tree_from_hidden, *args, eps)
    assert_equal_up_to_near_ties(out, expected, draft, parents, logits, NEAR_TIE)
    return expected


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched_parents", [False, True], ids=["parents_t", "parents_bt"])
@pytest.mark.parametrize("v", [1, 7, 1000])
def test_random(device, v, batched_parents, dtype, norm):
    case = make_case(16, 12, v, 64, dtype, seed=v, batched_parents=batched_parents, norm=norm)
    expected = check(*case, device)
    assert int(expected[0].max()) >= 2  # the case exercises deep walks


@pytest.mark.parametrize("device", devices())
def test_large_vocab(device):
    case = make_case(2, 8, 49152, 64, torch.bfloat16, seed=3, batched_parents=True)
    expected = check(*case, device)
    assert int(expected[0].max()) >= 2


@pytest.mark.parametrize("device", devices())
def test_equals_verify_tree_on_the_model_logits(device):
    # The contract in its own words: verify_tree on the logits the model would have produced.
    draft, parents, hidden, lm_head, nw, _ = make_case(8, 10, 300, 32, torch.float32, 7, True)
    logits = ref_logits(hidden, lm_head, nw)  # float32, as the model computes them
    expected = ops.verify_tree(draft.to(device), parents.to(device), logits.to(device))
    out = ops.verify_tree_from_hidden(
        draft.to(device), parents.to(device), hidden.to(device), lm_head.to(device), nw.to(device)
    )
    assert_equal_up_to_near_ties(
        out, [e.cpu() for e in expected], draft, parents, logits.double(), NEAR_TIE
    )


@pytest.mark.parametrize("device", devices())
def test_norm_weight_is_applied(device):
    # A norm weight far from uniform changes the targets (the RMS factor alone cannot: it scales a
    # row by a positive number), so a kernel that ignored norm_weight would fail one of the checks.
    draft, parents, hidden, lm_head, _, _ = make_case(16, 12, 50, 16, torch.float32, 8, True)
    nw = randn(16, seed=9, scale=2.0)
    with_norm = ref64(ref_logits, hidden, lm_head, nw)
    without = ref64(ref_logits, hidden, lm_head)
    assert not torch.equal(ref.target_tokens(with_norm), ref.target_tokens(without))
    check(draft, parents, hidden, lm_head, nw, with_norm, device)
    check(draft, parents, hidden, lm_head, None, without, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", KNOWN, ids=lambda c: c[0])
def test_known_answers(device, dtype, case):
    # lm_head = identity: the logits are the (normed) hidden states themselves.
    tree, draft, targets, num, tokens, path = case
    hidden = logits_for_targets(targets, dtype=dtype)
    v = hidden.shape[-1]
    for nw in (None, torch.full((v,), 0.5, dtype=dtype)):
        out = ops.verify_tree_from_hidden(
            torch.tensor([draft], device=device),
            torch.tensor(TREES[tree], device=device),
            hidden.to(device),
            torch.eye(v, dtype=dtype, device=device),
            None if nw is None else nw.to(device),
        )
        assert [o.cpu().tolist() for o in out] == [[num], [tokens], [path]]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lo, hi", [(10, 20), (47, 48), (10, 990), (530, 999)])
def test_exact_ties_go_to_lower_id(device, dtype, lo, hi):
    # Rows lo and hi of lm_head are equal and dominate: the logits tie exactly (same inputs, same
    # arithmetic) and the target is lo, within a block, across blocks and across threads' slices.
    v, d = 1000, 32
    hidden = randn(1, 3, d, seed=10).to(dtype)
    lm_head = randn(v, d, seed=11, scale=0.1)
    lm_head[lo] = lm_head[hi] = 3 * hidden[0, 0].float() / hidden[0, 0].float().norm()
    lm_head = lm_head.to(dtype)
    draft = torch.tensor([[-1, hi, lo]])  # node 1 holds hi, node 2 holds lo: only node 2 matches
    parents = torch.tensor([-1, 0, 0])
    num, tokens, path = ops.verify_tree_from_hidden(
        draft.to(device), parents.to(device), hidden.to(device), lm_head.to(device)
    )
    assert num.tolist() == [1] and path[0, :2].tolist() == [0, 2] and tokens[0, 0] == lo
    expected = ref64(ref.verify_tree_from_hidden, draft, parents, hidden, lm_head)
    for got, exp in zip((num, tokens, path), expected):
        assert torch.equal(got.cpu(), exp)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
def test_non_finite(device, norm):
    # NaN ranks above every number: a NaN logit is the target, and a row of NaN logits (a NaN in the
    # hidden state, or an inf through the norm: inf * 0) has target 0, the lowest id.
    b, t, v, d = 3, 4, 200, 16
    hidden = randn(b, t, d, seed=12)
    hidden[1, 2, 5] = float("nan")
    hidden[2, 1, 0] = float("inf")
    lm_head = randn(v, d, seed=13)
    lm_head[77, 3] = float("nan")
    nw = torch.ones(d) if norm else None
    draft = torch.tensor([[-1, 77, 77, 0]]).expand(b, t).contiguous()
    parents = torch.tensor([-1, 0, 1, 2])
    args = [draft, parents, hidden, lm_head, nw]
    out = ops.verify_tree_from_hidden(*(None if a is None else a.to(device) for a in args))
    expected = ref64(ref.verify_tree_from_hidden, draft, parents, hidden, lm_head, nw)
    for got, exp in zip(out, expected):
        assert torch.equal(got.cpu(), exp)
    # Row 0: y = 77 at every node (the NaN logit), nodes 1 and 2 accepted, node 3 holds 0.
    # Row 1: node 2's hidden has a NaN, so y_2 = 0 and node 3 is accepted too.
    # Row 2: node 1's hidden has an inf: normed, every logit is NaN and y_1 = 0 (stop after node 1);
    # not normed, the logits are +-inf except the NaN of id 77, so y_1 = 77 as in row 0.
    assert out[0].tolist() == [2, 3, 1 if norm else 2]


@pytest.mark.parametrize("device", devices())
def test_non_contiguous(device):
    b, t, v, d = 6, 8, 301, 24
    draft, parents, hidden, lm_head, nw, logits = make_case(b, t, v, d, torch.float32, 14, True)
    hidden_nc = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    lm_head_nc = lm_head.t().contiguous().t()
    big = torch.zeros(2 * d)
    big[1::2] = nw
    nw_nc = big[1::2]
    big_draft = torch.zeros(b, 2 * t, dtype=torch.long)
    big_draft[:, ::2] = draft
    draft_nc = big_draft[:, ::2]
    parents_nc = parents.t().contiguous().t()
    for x in (hidden_nc, lm_head_nc, nw_nc, draft_nc, parents_nc):
        assert not x.is_contiguous()
    check(draft_nc, parents_nc, hidden_nc, lm_head_nc, nw_nc, logits, device)


@pytest.mark.parametrize("device", devices())
def test_empty_batch_and_root_only(device):
    lm_head = randn(11, 8, device=device, seed=15)
    num, tokens, path = ops.verify_tree_from_hidden(
        torch.zeros(0, 5, dtype=torch.long, device=device),
        torch.tensor(TREES["chain"], device=device),
        torch.zeros(0, 5, 8, device=device),
        lm_head,
    )
    assert num.shape == (0,) and tokens.shape == (0, 5) and path.shape == (0, 5)
    # T = 1: nothing to accept; the token is the argmax at the root.
    hidden = randn(4, 1, 8, seed=16)
    draft = torch.full((4, 1), -1, device=device)
    num, tokens, path = ops.verify_tree_from_hidden(
        draft, torch.tensor([-1], device=device), hidden.to(device), lm_head
    )
    assert num.tolist() == [0] * 4 and path.tolist() == [[0]] * 4
    assert tokens[:, 0].cpu().tolist() == (hidden[:, 0] @ lm_head.cpu().T).argmax(-1).tolist()
