"""softmax_topk against mtp_ext.reference.softmax_topk (evaluated in float64, see helpers.ref64).

The ranking is by the raw logits (converted exactly to float32), so ids must equal the reference's
exactly, ties included (toward the lower id); probabilities are compared with the tolerance table.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, TOL, assert_close, assert_ids_valid, devices, randn, ref64

from mtp_ext import ops
from mtp_ext import reference as ref


def check(logits: torch.Tensor, k: int, temperature: float = 1.0):
    probs, ids = ops.softmax_topk(logits, k, temperature)
    ref_probs, ref_ids = ref64(ref.softmax_topk, logits, k, temperature)
    assert probs.shape == ref_probs.shape and probs.dtype == torch.float32
    assert ids.device == logits.device and probs.device == logits.device
    assert torch.equal(ids, ref_ids), "ids differ from the reference"
    assert_close(probs, ref_probs, TOL[logits.dtype].prob)
    return probs, ids


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 1000])
@pytest.mark.parametrize("k_kind", ["one", "some", "all"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.5])
def test_random(device, dtype, vocab, k_kind, temperature):
    k = {"one": 1, "some": min(5, vocab), "all": vocab}[k_kind]
    logits = randn(6, vocab, dtype=dtype, device=device, seed=vocab, scale=3.0)
    check(logits, k, temperature)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "vocab, dtype, rows, k",
    [
        (49152, torch.float32, 2, 1),
        (49152, torch.float32, 1, 49152),
        (49152, torch.bfloat16, 1, 64),
        (151936, torch.float32, 2, 50),
        (151936, torch.float16, 1, 1),
    ],
)
def test_large_vocab(device, vocab, dtype, rows, k):
    logits = randn(rows, vocab, dtype=dtype, device=device, seed=1, scale=4.0)
    check(logits, k)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("lead", [(), (4,), (2, 3), (0,), (2, 0), (0, 3)])
def test_leading_dims(device, lead):
    logits = randn(*lead, 37, device=device, seed=2)
    probs, ids = check(logits, 5)
    assert probs.shape == (*lead, 5) and ids.shape == (*lead, 5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "layout", ["transposed", "strided_rows", "sliced_cols", "expanded", "3d_permuted"]
)
def test_non_contiguous(device, dtype, layout):
    base = randn(64, 1031, dtype=dtype, device=device, seed=3, scale=2.0)
    logits = {
        "transposed": base[:, :50].t(),  # [50, 64], stride 1 along rows, 1031 along V
        "strided_rows": base[::3],  # every third row
        "sliced_cols": base[5:9, 3::2],  # offset, stride 2 along V
        "expanded": base[0:1].expand(4, 1031),  # stride 0 along the batch
        "3d_permuted": base.reshape(8, 8, 1031).permute(1, 0, 2),
    }[layout]
    assert not logits.is_contiguous()
    check(logits, 7, 0.8)
    check(logits, logits.shape[-1])


@pytest.mark.parametrize("device", devices())
def test_ties_go_to_lower_id_known_answer(device):
    logits = torch.tensor(
        [[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float16
    )
    probs, ids = ops.softmax_topk(logits.to(device), 3)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    p = torch.softmax(logits.float(), -1)
    assert_close(probs.cpu(), p.gather(-1, ids.cpu()), TOL[torch.float16].prob)
    assert probs[0, 0] == probs[0, 1] == probs[0, 2]  # equal logits give equal probabilities


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1000, 9000])
def test_many_exact_ties(device, dtype, vocab):
    # Integers in [-4, 4]: every value is shared by ~vocab/9 ids, across block and chunk boundaries.
    g = torch.Generator().manual_seed(4)
    logits = torch.randint(-4, 5, (3, vocab), generator=g).to(dtype=dtype, device=device)
    _, ids = check(logits, vocab)
    # Known answer for the ranking: value descending, then id ascending.
    x = logits.float().cpu()
    expected = sorted(range(vocab), key=lambda i: (-x[0, i].item(), i))
    assert ids[0].tolist() == expected
    check(logits, 100)


@pytest.mark.parametrize("device", devices())
def test_constant_row_across_blocks(device):
    logits = torch.full((2, 5000), 0.25, device=device)
    probs, ids = check(logits, 600)
    assert ids.cpu().tolist() == [list(range(600))] * 2
    assert_close(probs.cpu(), torch.full((2, 600), 1 / 5000), TOL[torch.float32].prob)


@pytest.mark.parametrize("device", devices())
def test_k_equals_v_is_full_softmax(device):
    logits = randn(3, 257, device=device, seed=5, scale=2.0)
    probs, ids = ops.softmax_topk(logits, 257, 0.7)
    assert_ids_valid(ids, 257)
    full = torch.softmax(logits.double().cpu() / 0.7, -1)
    assert_close(probs.cpu().double(), full.gather(-1, ids.cpu()), (1e-5, 1e-6))
    assert_close(probs.sum(-1).cpu(), torch.ones(3), (1e-5, 1e-5))
    assert bool((probs[:, :-1] >= probs[:, 1:]).all()), "probabilities must be descending"


@pytest.mark.parametrize("device", devices())
def test_extreme_but_finite_logits(device):
    logits = torch.tensor([[-1e30, 0.0, 1e30, -3e38, 3e38], [-100.0, -200.0, -90.0, -95.0, -300.0]])
    check(logits.to(device), 5)
    check(logits.to(device), 2, 0.05)  # (x / T overflows float32; the kernel must not)


@pytest.mark.slow
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32000, 49152, 128256, 151936, 262144])
def test_real_vocab_sizes_all_dtypes(device, dtype, vocab):
    logits = randn(4, vocab, dtype=dtype, device=device, seed=vocab, scale=4.0)
    for k in (1, 64, vocab):
        check(logits, k)
        check(logits[:, : vocab - 13], k - (13 if k == vocab else 0), 0.7)  # odd V, strided rows
