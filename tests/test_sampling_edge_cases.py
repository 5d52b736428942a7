"""Sampling at the edges of its contract: uniforms outside ``[0, 1)``, temperatures whose reciprocal
is not a finite float32, and rows whose logits hold ``+inf``, only ``-inf`` or NaN.

Each case runs three ways that must agree: the op (``ops``: the CPU kernel, or the CUDA kernels
under ``--cuda-emulator``), the CUDA kernels under the CPU emulator (``torch.ops.mtp_ext_emu``) and
:mod:`mtp_ext.reference`. Every sampling path of the CUDA launcher is covered: the plain scan (no
filtering), the top-k candidates (``top_k <= 64``) and the full ranking (larger ``top_k``, or
``top_p < 1`` over more than 64 tokens).
"""

from __future__ import annotations

import pytest
import torch
from cuda_emulator import load
from helpers import DTYPES, TOL, assert_close, randn, ref64

from mtp_ext import ops
from mtp_ext import reference as ref

NAN, INF = float("nan"), float("inf")
F32_MAX = torch.finfo(torch.float32).max
MIN_TEMPERATURE = 1.0 / F32_MAX  # the smallest temperature whose reciprocal is a finite float32
BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1

V = 100
# (top_k, top_p) for each sampling path of the CUDA launcher at V = 100.
PATHS = {
    "scan": (0, 1.0),
    "candidates": (5, 1.0),
    "candidates_top_p": (5, 0.7),
    "ranking": (80, 1.0),
    "ranking_top_p": (0, 0.7),
}
BAD_UNIFORMS = [1.0, 2.0, -0.5, NAN, INF, -INF]


@pytest.fixture(scope="module")
def emu():
    return load()


def tree(rows: int, t: int = 1):
    """Draft tokens that never match (-1) and a chain of t nodes: tokens[:, 0] is the root's
    target."""
    return torch.full((rows, t), -1, dtype=torch.long), torch.tensor([-1] + list(range(t - 1)))


def targets3(emu, logits, temperature, top_k, top_p, uniforms):
    """The root targets [B] of the op, the emulated CUDA kernels and the reference; asserts they
    agree and that every id is in [0, V)."""
    draft, parents = tree(logits.shape[0], logits.shape[1])
    args = (draft, parents, logits, temperature, top_k, top_p, uniforms)
    got = ops.verify_tree(*args)[1][:, 0]
    cuda = emu.verify_tree(*args)[1][:, 0]
    expected = ref64(ref.verify_tree, *args)[1][:, 0]
    assert torch.equal(got, expected), f"op {got.tolist()} != reference {expected.tolist()}"
    assert torch.equal(cuda, expected), f"CUDA {cuda.tolist()} != reference {expected.tolist()}"
    v = logits.shape[-1]
    assert bool(((got >= 0) & (got < v)).all())
    return got


# ------------------------------------------------------------------------------------------------
# Uniforms: [0, 1)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("u", BAD_UNIFORMS)
def test_uniforms_outside_unit_interval_raise(emu, u, dtype):
    logits = randn(2, 3, V, seed=1)
    draft, parents = tree(2, 3)
    uniforms = torch.full((2, 3), 0.5)
    uniforms[1, 2] = u
    uniforms = uniforms.to(dtype)
    for verify in (ops.verify_tree, emu.verify_tree, ref.verify_tree):
        with pytest.raises(ValueError, match=r"uniforms .*\[0, 1\).*\[1, 2\]"):
            verify(draft, parents, logits, 1.0, 0, 1.0, uniforms)


def test_uniforms_are_not_read_when_greedy(emu):
    logits = randn(2, 3, V, seed=2)
    draft, parents = tree(2, 3)
    uniforms = torch.full((2, 3), 2.0)
    greedy = ref.verify_tree(draft, parents, logits)
    for verify in (ops.verify_tree, emu.verify_tree, ref.verify_tree):
        for got, exp in zip(verify(draft, parents, logits, 0.0, 0, 1.0, uniforms), greedy):
            assert torch.equal(got, exp)


def edge_mass_rows(rows: int) -> torch.Tensor:
    """[rows, 1, V] logits whose first and last tokens are -inf (no mass), so that picking either
    shows an inverse CDF run past its ends."""
    x = randn(rows, 1, V, seed=3)
    x[..., 0] = -INF
    x[..., V - 1] = -INF
    return x


@pytest.mark.parametrize("path", PATHS)
def test_uniforms_clamped_on_cuda_without_value_checks(emu, monkeypatch, path):
    """The CUDA launcher checks uniforms only with MTP_EXT_CUDA_VALUE_CHECKS=1 (a device read);
    without it, a uniform outside [0, 1) is clamped into it (NaN as 0) and never picks a token of
    no mass or out of range."""
    top_k, top_p = PATHS[path]
    monkeypatch.setenv("MTP_EXT_CUDA_VALUE_CHECKS", "0")
    logits = edge_mass_rows(len(BAD_UNIFORMS))
    draft, parents = tree(len(BAD_UNIFORMS))
    bad = torch.tensor(BAD_UNIFORMS).unsqueeze(1)
    clamped = torch.tensor([BELOW_ONE, BELOW_ONE, 0.0, 0.0, BELOW_ONE, 0.0]).unsqueeze(1)
    got = emu.verify_tree(draft, parents, logits, 1.0, top_k, top_p, bad)[1][:, 0]
    expected = ref64(ref.verify_tree, draft, parents, logits, 1.0, top_k, top_p, clamped)[1][:, 0]
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    assert bool(((got > 0) & (got < V - 1)).all())


# ------------------------------------------------------------------------------------------------
# Temperature: 1 / temperature must be a finite float32
# ------------------------------------------------------------------------------------------------

TOO_SMALL_OR_LARGE = [2.9e-39, 1e-39, 1e-45, 5e-324, 3.5e38, 1e300, INF, NAN]


def softmax_topk_calls(emu):
    logits = randn(2, V, seed=4)
    return [
        lambda t, f=f: f(logits, 3, t)
        for f in (ops.softmax_topk, emu.softmax_topk, ref.softmax_topk)
    ]


def verify_tree_calls(emu):
    logits = randn(2, 3, V, seed=5)
    draft, parents = tree(2, 3)
    u = torch.full((2, 3), 0.5)
    return [
        lambda t, f=f: f(draft, parents, logits, t, 0, 1.0, u)
        for f in (ops.verify_tree, emu.verify_tree, ref.verify_tree)
    ]


@pytest.mark.parametrize("temperature", TOO_SMALL_OR_LARGE)
@pytest.mark.parametrize("op", ["softmax_topk", "verify_tree"])
def test_temperature_whose_reciprocal_is_not_a_finite_float32_raises(emu, op, temperature):
    calls = softmax_topk_calls(emu) if op == "softmax_topk" else verify_tree_calls(emu)
    for call in calls:
        with pytest.raises(ValueError, match=r"temperature .*2\.93874e-39.*3\.40282e\+38"):
            call(temperature)


def test_smallest_temperature_is_the_argmax(emu):
    """At the smallest temperature the softmax is one-hot at the argmax (no NaN), and sampling gives
    the greedy token whatever the uniform."""
    logits = randn(4, 2, V, seed=6, scale=3.0)
    logits[0, 0, 7] = logits[0, 0].max() + 1e-3  # a close runner-up
    greedy = ref.target_tokens(logits)
    for softmax_topk in (ops.softmax_topk, emu.softmax_topk, ref.softmax_topk):
        probs, ids = softmax_topk(logits, 2, MIN_TEMPERATURE)
        assert torch.equal(ids[..., 0], greedy)
        assert torch.equal(probs, torch.tensor([1.0, 0.0]).expand(4, 2, 2)), probs
    for path, (top_k, top_p) in PATHS.items():
        for u in (0.0, 0.5, 0.999):
            uniforms = torch.full((4, 2), u)
            got = targets3(emu, logits, MIN_TEMPERATURE, top_k, top_p, uniforms)
            assert torch.equal(got, greedy[:, 0]), path


# ------------------------------------------------------------------------------------------------
# +inf, -inf and NaN logits under sampling
# ------------------------------------------------------------------------------------------------


def special_logits(dtype) -> tuple[torch.Tensor, list]:
    """[8, 1, V] logits of ``dtype`` and, per row, the law of its sampled token: ``("inf", ids)``
    (the +inf ids share the mass equally) or ``("argmax", id)`` (no distribution: the greedy
    token)."""
    x = randn(8, 1, V, seed=7, scale=2.0)
    x[0, 0, 41] = INF  # one +inf
    x[1, 0, [12, 57, 90]] = INF  # three +inf
    x[2, 0, [3, 98]] = INF  # two +inf beside -inf and a NaN-free rest
    x[2, 0, [0, 50, 99]] = -INF
    x[3] = -INF  # all -inf
    x[4, 0, 33] = NAN  # a NaN among numbers
    x[5] = NAN  # all NaN
    x[6] = -INF  # -inf and NaN
    x[6, 0, [20, 70]] = NAN
    x[7, 0, 60] = NAN  # NaN and +inf
    x[7, 0, 10] = INF
    laws = [
        ("inf", [41]),
        ("inf", [12, 57, 90]),
        ("inf", [3, 98]),
        ("argmax", 0),
        ("argmax", 33),
        ("argmax", 0),
        ("argmax", 20),
        ("argmax", 60),
    ]
    return x.to(dtype), laws


def expected_token(law, u: float, top_k: int, top_p: float) -> int:
    kind, ids = law
    if kind == "argmax":
        return ids
    kept = ids[: top_k or len(ids)]
    if top_p < 1.0:  # each +inf token holds 1 / len(kept) of the kept mass
        kept = kept[: next(j for j in range(1, len(kept) + 1) if j / len(kept) >= top_p)]
    return kept[min(int(u * len(kept)), len(kept) - 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_inf_and_nan_rows_under_sampling(emu, path, dtype):
    top_k, top_p = PATHS[path]
    x, laws = special_logits(dtype)
    greedy = ref.target_tokens(x)[:, 0]
    for u in (0.0, 0.2, 0.45, 0.55, 0.7, 0.9, BELOW_ONE):
        uniforms = torch.full((x.shape[0], 1), u)
        got = targets3(emu, x, 0.8, top_k, top_p, uniforms)
        expected = [expected_token(law, u, top_k, top_p) for law in laws]
        assert got.tolist() == expected, f"u = {u}: {got.tolist()} != {expected}"
    # The rows without a distribution give the greedy token, as the greedy path does.
    for r, (kind, _) in enumerate(laws):
        if kind == "argmax":
            assert got[r] == greedy[r]


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (2, 1.0), (0, 0.5)])
def test_filtered_probs_of_special_rows(top_k, top_p):
    """The reference's sampling law: +inf tokens share the mass, a row without a distribution is
    one-hot on its greedy token."""
    x, laws = special_logits(torch.float32)
    probs = ref.filtered_probs(x, 0.8, top_k, top_p)[:, 0]
    for r, law in enumerate(laws):
        expected = torch.zeros(V)
        if law[0] == "argmax":
            expected[law[1]] = 1.0
        else:
            for u in torch.linspace(0, 1, 97)[:-1].tolist():
                expected[expected_token(law, u, top_k, top_p)] = 1.0
            expected /= expected.sum()
        assert_close(probs[r], expected, TOL[torch.float32].prob, f"row {r}")
