"""The CUDA kernels on the CPU, under the emulator of ``csrc/emulator`` (see tests/cuda_emulator.py).

Two parts:

* the emulator itself: warp and block reductions give the right values, and the faults a GPU would
  hang on, trap on or silently get wrong (a barrier not every thread reaches, a shuffle waiting on
  an exited lane, masks that leave out the caller or are read outside, a misaligned vector load,
  dynamic shared memory over 48 KB without the opt-in) are reported; the order of the threads' turns changes what a racy kernel
  reads, so running under several orders exposes missing barriers;
* every op's CUDA path (launcher, kernels, fallbacks) against the CPU kernel on the same inputs:
  integers exactly, floats within the float32 tolerance, for every storage dtype and under the
  three scheduling orders.

The whole CPU test files run on the CUDA path with ``pytest --cuda-emulator`` (scripts/test.sh runs
them that way too).
"""

from __future__ import annotations

import ctypes
import random

import pytest
import torch
from cuda_emulator import (
    BUILD,
    NAME,
    counter,
    launch_log,
    load,
    topk_marginalize_second_pass_barriers,
)
from helpers import (
    TOL,
    assert_same_outputs,
    heads_inputs,
    medusa_tree,
    rand,
    randn,
    unaligned_paths_mixture,
    verify_inputs,
)

from mtp_ext import ops

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
SCHEDULES = ["forward", "reverse", "random:7"]


@pytest.fixture(scope="module")
def emu():
    return load()


@pytest.fixture(scope="module")
def selftest(emu):
    lib = ctypes.CDLL(str(BUILD / f"{NAME}.so"))
    fn = lib.cuda_emu_selftest
    fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_int]
    fn.restype = ctypes.c_int

    def run(name: str, ints: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        ints = torch.zeros(512, dtype=torch.int32) if ints is None else ints
        message = ctypes.create_string_buffer(1024)
        fn(name.encode(), ctypes.cast(ints.data_ptr(), ctypes.POINTER(ctypes.c_int)), message, 1024)
        return ints, message.value.decode()

    return run


@pytest.fixture(params=SCHEDULES)
def schedule(request, monkeypatch):
    monkeypatch.setenv("CUDA_EMU_SCHEDULE", request.param)
    return request.param


# ------------------------------------------------------------------------------------------------
# The emulator
# ------------------------------------------------------------------------------------------------


def test_reductions_ballot_match_and_shuffle_up(selftest, schedule):
    ints = torch.zeros(512, dtype=torch.int32)
    values = torch.randint(
        0, 1000, (128,), generator=torch.Generator().manual_seed(1), dtype=torch.int32
    )
    ints[:128] = values
    out, message = selftest("reductions", ints)
    assert message == ""
    res = out[128:]
    assert int(res[0]) == int(values.sum())
    odd = (values % 2 != 0).view(4, 32)
    for w in range(4):
        expected = sum(1 << i for i in range(32) if odd[w, i])
        assert int(res[1 + w]) & 0xFFFFFFFF == expected
    mod3 = (values % 3).view(4, 32)
    for t in range(128):
        w, lane = divmod(t, 32)
        expected = sum(1 << i for i in range(32) if mod3[w, i] == mod3[w, lane])
        assert int(res[64 + t]) & 0xFFFFFFFF == expected
    shifted = values.view(4, 32).clone()
    shifted[:, 3:] = values.view(4, 32)[:, :-3]
    assert torch.equal(res[192:320], shifted.flatten())


@pytest.mark.parametrize(
    "case, expected",
    [
        ("deadlock", "deadlock"),
        ("exited_lane", "has exited"),
        ("mask", "leaves out the calling lane"),
        ("outside_mask", "outside the mask"),
        ("misaligned", "misaligned load of 16 bytes"),
        ("smem_over_48k", "launch: invalid argument"),
        ("static_plus_dynamic_over_48k", "the launch fails on a GPU"),
        ("over_launch_bounds", "__launch_bounds__(64)"),
        ("block_too_large", "launch: invalid configuration"),
        ("wmma_half_warp", "has exited"),
        ("wmma_misaligned", "not 32-byte aligned"),
        ("async_copy_misaligned", "not aligned to its size"),
        ("async_copy_to_global", "outside the block's shared memory"),
        ("spin_wait", "spin-wait"),
    ],
)
def test_faults_are_reported(selftest, case, expected):
    _, message = selftest(case)
    assert expected in message, message


def test_launch_within_its_bounds_runs(selftest):
    out, message = selftest("within_launch_bounds")
    assert message == ""
    assert torch.all(out[:64] == 1)


def test_opt_in_allows_more_than_48k(selftest):
    out, message = selftest("smem_opt_in")
    assert message == ""
    assert torch.all(out[:32] == -1)  # poisoned: 0xffffffff until written


def test_static_shared_memory_counts_and_the_opt_in_lifts_the_limit(selftest):
    out, message = selftest("static_plus_dynamic_opt_in")
    assert message == ""
    assert int(out[1]) == 2048  # cudaFuncGetAttributes reports the kernel's static 2 KB
    assert int(out[0]) == 3


def test_static_shared_memory_is_poisoned_at_every_block(selftest):
    out, message = selftest("stale_static")
    assert message == ""
    assert torch.all(out[:2] == -1)  # block 1 does not see block 0's 42


def test_block_order_follows_the_schedule(selftest, monkeypatch):
    for order, expected in [("forward", [0, 1, 2, 3]), ("reverse", [3, 2, 1, 0])]:
        monkeypatch.setenv("CUDA_EMU_SCHEDULE", order)
        out, message = selftest("block_order")
        assert message == ""
        assert out[1:5].tolist() == expected
    monkeypatch.setenv("CUDA_EMU_SCHEDULE", "random:7")
    out, _ = selftest("block_order")
    assert sorted(out[1:5].tolist()) == [0, 1, 2, 3]


def test_dynamic_shared_memory_starts_poisoned(selftest):
    out, message = selftest("dynamic")
    assert message == ""
    assert torch.all(out[:32] == -1)


def test_wmma_product_matches_a_float32_matmul(selftest, schedule):
    a = randn(16, 16, dtype=BF16, seed=21)
    b = randn(16, 16, dtype=BF16, seed=22)
    ints = torch.zeros(512, dtype=torch.int32)
    ab = ints.view(torch.bfloat16)
    ab[:256] = a.flatten()
    ab[256:512] = b.t().flatten()  # column-major b
    out, message = selftest("wmma", ints)
    assert message == ""
    expected = a.float() @ b.float() + 1
    torch.testing.assert_close(out[256:].view(torch.float32).view(16, 16), expected)


def test_async_copies_land_at_the_wait(selftest, schedule):
    values = torch.arange(1, 129, dtype=torch.int32)
    ints = torch.zeros(512, dtype=torch.int32)
    ints[:128] = values
    out, message = selftest("async_copy", ints)
    assert message == ""
    expected = values.view(32, 4).clone()
    expected[1::2, 2:] = 0  # odd threads zero-fill their last 8 bytes
    assert torch.equal(out[128:256].view(32, 4), expected.flip(0))
    # Without the wait, shared memory still holds its poison when it is read (every thread reads
    # another thread's slice, and its own copies have not landed either).
    ints[128:] = 0
    out, message = selftest("async_copy_without_wait", ints)
    assert message == ""
    assert torch.all(out[128:256] == -1)


def test_to_f16_rounds_as_torch_does(selftest):
    gen = torch.Generator().manual_seed(3)
    values = torch.cat(
        [
            torch.randn(200, generator=gen) * torch.logspace(-9, 5, 200),
            torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, -7e4, 6e-8, 2.98e-8, 2.99e-8]),
            torch.tensor([float("inf"), float("-inf"), 2.0**-24, 2.0**-25, 3 * 2.0**-26]),
            (torch.rand(298, generator=gen) - 0.5) * 2.0**-12,
        ]
    )
    ints = values.view(torch.int32).clone()
    out, message = selftest("to_f16", ints)
    assert message == ""
    expected = values.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    assert torch.equal(out, expected)
    nan, _ = selftest("to_f16", torch.full((512,), 0x7FC00001, dtype=torch.int32))
    assert torch.all((nan & 0x7C00) == 0x7C00) and torch.all((nan & 0x3FF) != 0)


def test_schedule_order_exposes_a_missing_barrier(selftest, monkeypatch):
    seen = {}
    for order in SCHEDULES:
        monkeypatch.setenv("CUDA_EMU_SCHEDULE", order)
        out, message = selftest("race")
        assert message == ""
        seen[order] = out[:64].clone()
    assert torch.all(seen["forward"] == 1)  # thread 0 ran first: everybody sees its write
    assert int(seen["reverse"][63]) == 0 and int(seen["reverse"][0]) == 1


@pytest.fixture(scope="module")
def launches(emu):
    return counter("launches")


def test_routing_runs_the_cuda_path_until_destroyed(emu, launches):
    from cuda_emulator import route_cpu_ops_to_emulator

    x = randn(2, 300, seed=1)
    before = launches()
    ops.softmax_topk(x, 3)
    assert launches() == before  # torch.ops.mtp_ext keeps the CPU kernels while loaded
    emu.softmax_topk(x, 3)
    assert launches() == before + 2  # partial + merge
    lib = route_cpu_ops_to_emulator()
    try:
        routed = ops.softmax_topk(x, 3)
        assert launches() == before + 4
    finally:
        lib._destroy()
    cpu = ops.softmax_topk(x, 3)
    assert launches() == before + 4  # the CPU kernel is back
    assert torch.equal(routed[1], cpu[1])


# ------------------------------------------------------------------------------------------------
# Every op's CUDA path against the CPU kernel
# ------------------------------------------------------------------------------------------------


def compare(actual, expected, what, tol=TOL[F32].prob):
    assert_same_outputs(actual, expected, what, tol)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("v, k", [(1, 1), (37, 5), (8191, 1), (8193, 64), (20000, 7), (3001, 65)])
def test_softmax_topk(emu, schedule, dtype, v, k):
    x = randn(3, v, dtype=dtype, seed=v + k, scale=3.0)
    x[0, : min(v, 40)] = x[0, 0]  # ties toward the lower id
    compare(emu.softmax_topk(x, k, 0.7), torch.ops.mtp_ext.softmax_topk(x, k, 0.7), "softmax_topk")


def test_softmax_topk_strided_nan_and_inf(emu, schedule):
    x = randn(4, 9000, dtype=BF16, seed=3, scale=3.0)
    x[1, 17] = float("nan")
    x[2, :] = float("-inf")
    x[3, 5] = float("inf")
    view = x[:, ::2]
    compare(emu.softmax_topk(view, 6), torch.ops.mtp_ext.softmax_topk(view, 6), "softmax_topk")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_marginalize_and_topk(emu, schedule, dtype, renormalize):
    x = randn(2, 5, 9000, dtype=dtype, seed=4, scale=3.0)
    w = rand(2, 5, seed=5)
    compare(
        emu.marginalize(x, w, renormalize),
        torch.ops.mtp_ext.marginalize(x, w, renormalize),
        "marginalize",
    )
    for m in (1, 10, 64, 200):
        compare(
            emu.topk_marginalize(x, w, m, renormalize),
            torch.ops.mtp_ext.topk_marginalize(x, w, m, renormalize),
            f"topk_marginalize m={m}",
        )


def marginalize_launches(emu, x, w, renormalize=True):
    """marginalize on the emulator, checked against the CPU kernel; returns its launches'
    ``(blocks, barriers)``."""
    out, log = launch_log(lambda: emu.marginalize(x, w, renormalize))
    compare(out, torch.ops.mtp_ext.marginalize(x, w, renormalize), "marginalize")
    return log


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("sms", ["132", "1"])
def test_marginalize_streams_in_one_launch(emu, schedule, monkeypatch, dtype, sms):
    """One launch reads the logits once. With 132 multiprocessors the rows are cut into 20 chunks
    and each of 160 blocks takes one item (a chunk's statistics or its marginal): the rows'
    statistics are merged and published across blocks. With one, 3 chunks of 8192 and 3 blocks
    that take 8 items each, in the interleaved order (a chunk's marginal 4 claims after its
    statistics)."""
    monkeypatch.setenv("CUDA_EMU_SMS", sms)
    x = randn(4, 3, 20000, dtype=dtype, seed=41, scale=3.0)
    x[2, 1, 5:900] = -float("inf")
    w = rand(4, 3, seed=42)
    w[3, 1] = 0.0
    for renormalize in (True, False):
        log = marginalize_launches(emu, x, w, renormalize)
        assert len(log) == 1 and log[0][0] == (160 if sms == "132" else 3)


def test_marginalize_streamed_layouts(emu, schedule):
    """Strided and unaligned paths, a NaN path with zero weight, a row of zero weights."""
    x, w = unaligned_paths_mixture()
    assert len(marginalize_launches(emu, x, w)) == 1
    y = randn(3, 9000, 4, seed=44, scale=2.0).transpose(1, 2)  # [3, 4, 9000], stride 4 along V
    wy = rand(3, 4, seed=45)
    y[1, 2] = float("nan")
    wy[1, 2] = 0.0
    wy[2] = 0.0
    for renormalize in (True, False):
        assert len(marginalize_launches(emu, y, wy, renormalize)) == 1


def test_marginalize_without_room_in_l2_reads_twice(emu, monkeypatch):
    """When a chunk's lag does not fit half the L2, the statistics pass, the plan and the marginal
    run as three launches, with the same results."""
    x = randn(2, 5, 9000, dtype=BF16, seed=46, scale=3.0)
    w = rand(2, 5, seed=47)
    monkeypatch.setenv("CUDA_EMU_L2_BYTES", "65536")
    assert len(marginalize_launches(emu, x, w)) == 3


def marginal_second_pass_work(emu, x, w, m):
    """topk_marginalize on the emulator: its outputs, checked against the CPU kernel, and the
    barriers its second pass released (0 when every batch row was answered from one read)."""
    out, work = topk_marginalize_second_pass_barriers(emu, x, w, m)
    compare(out, torch.ops.mtp_ext.topk_marginalize(x, w, m, True), f"topk_marginalize m={m}")
    return out, work


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_topk_marginalize_answers_rows_from_one_read(emu, schedule, dtype, m):
    x = randn(3, 6, 5000, dtype=dtype, seed=21 + m, scale=4.0)
    w = rand(3, 6, seed=22)
    _, work = marginal_second_pass_work(emu, x, w, m)
    assert work == 0
    # A flat row ties at the m-th place: it takes the second pass, the others do not.
    x[1] = 0.25
    out, work = marginal_second_pass_work(emu, x, w, m)
    assert work > 0
    assert torch.equal(out[1][1], torch.arange(m))


def test_topk_marginalize_bound_covers_the_warps_fifth_token(emu):
    # Path 0's five best tokens lie in one warp's share of a chunk: the warp keeps four as
    # candidates and its fifth bounds the rest of its share. Token 700 (another warp) is a
    # candidate but only sixth: answering from the candidates would put it fifth.
    x = randn(1, 3, 5000, dtype=F32, seed=23, scale=0.5) - 4.0
    x[0, 0, 100:105] = torch.tensor([9.0, 8.9, 8.8, 8.7, 8.6])
    x[0, 0, 700] = 8.5
    w = torch.tensor([[1.0, 0.2, 0.2]])
    out, work = marginal_second_pass_work(emu, x, w, 5)
    assert out[1][0].tolist() == [100, 101, 102, 103, 104]
    assert work > 0


def test_topk_marginalize_bound_groups_are_the_same_tokens_on_every_path(emu):
    # The paths' rows are read differently; a bound group must still be the same tokens on both.
    x, w = unaligned_paths_mixture()
    out, _ = marginal_second_pass_work(emu, x, w, 4)
    assert out[1][0].tolist() == [478, 303, 203, 302]


def random_mixture(rng: random.Random, seed: int):
    """A topk_marginalize input drawn from the layouts, dtypes, sizes and special values the
    one-read path must handle: (x [B, L, V], weights [B, L], m, renormalize)."""
    b, paths = rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 3, 7, 16])
    v = rng.choice([1, 5, 17, 300, 1024, 1025, 4999, 9000])
    m, dtype = rng.randint(1, min(16, v)), rng.choice([F32, F16, BF16])
    g = torch.Generator().manual_seed(seed)
    scale = rng.choice([0.1, 1.0, 3.0, 8.0])
    layout = rng.choice(["contiguous", "strided", "sliced"])
    if layout == "contiguous":
        x = (torch.randn(b, paths, v, generator=g) * scale).to(dtype)
    elif layout == "strided":
        x = (torch.randn(b, paths, 2 * v, generator=g) * scale).to(dtype)[:, :, ::2]
    else:
        x = (torch.randn(b, paths + 1, v + 3, generator=g) * scale).to(dtype)[:, 1:, 2 : v + 2]
    special = rng.choice(["none", "nan", "inf", "-inf", "ties", "zero weights", "rounded"])
    if special == "nan":
        x[0, 0, rng.randrange(v)] = float("nan")
    elif special == "inf":
        x[0, paths - 1, rng.randrange(v)] = float("inf")
    elif special == "-inf":
        x[0] = float("-inf")
        x[0, 0, 0] = 1.0
    elif special == "ties":
        x[-1, :, : min(v, 40)] = 2.0
    elif special == "rounded":
        x.copy_((x * 2).round() / 2)
    w = torch.rand(b, paths, generator=g)
    if special == "zero weights":
        w[0] = 0
    return x, w, m, rng.random() < 0.8


def test_topk_marginalize_random_inputs_match_the_cpu_kernel(emu):
    rng = random.Random(5)
    for seed in range(100):
        x, w, m, renormalize = random_mixture(rng, seed)
        compare(
            emu.topk_marginalize(x, w, m, renormalize),
            torch.ops.mtp_ext.topk_marginalize(x, w, m, renormalize),
            f"topk_marginalize case {seed}: {tuple(x.shape)} {x.dtype} strides {x.stride()} m={m}",
        )


def test_topk_marginalize_exact_ties_at_the_mth_place(emu):
    # Three tokens tie exactly; the candidates list them path by path (900, 100, 50), not by id.
    # Ties go to the lower id: the second pass answers.
    x = torch.full((1, 3, 3000), float("-inf"))
    x[0, 0, 900] = x[0, 1, 100] = x[0, 2, 50] = 5.0
    w = torch.ones(1, 3)
    for m, expected in [(1, [50]), (2, [50, 100])]:
        out, work = marginal_second_pass_work(emu, x, w, m)
        assert out[1][0].tolist() == expected
        assert work > 0


def test_topk_marginalize_bound_covers_tokens_past_each_paths_candidates(emu):
    # Token 300 is second on both paths (so no path keeps it for m = 1) but first in the marginal.
    x = randn(1, 2, 5000, dtype=F32, seed=24, scale=0.5)
    x[0, 0, 10], x[0, 0, 300] = 10.0, 9.9
    x[0, 1, 600], x[0, 1, 300] = 10.0, 9.9
    w = torch.tensor([[1.0, 1.0]])
    out, work = marginal_second_pass_work(emu, x, w, 1)
    assert out[1][0].tolist() == [300]
    assert work > 0


def heads_args(dtype, n, h, d, v, k, hidden_scale=1.0, lm_scale=0.4, norm=True):
    hidden, weight, bias, lm_head, nw = heads_inputs(
        n, h, d, v, dtype, 1, hidden_scale, lm_scale, norm
    )
    return (hidden, weight, bias, lm_head, k, nw, 1e-6, None)


def on_both_capabilities(monkeypatch, launches, run, expected, what, tol) -> dict:
    """``run()`` on emulated devices of compute capability 9.0 and 7.5 (16-bit tables take the
    tensor-core kernels from 8.0 on, the CUDA-core kernels before), each compared with
    ``expected``; returns the launches each made."""
    count = {}
    for cc in ["9.0", "7.5"]:
        monkeypatch.setenv("CUDA_EMU_CC", cc)
        before = launches()
        out = run()
        count[cc] = launches() - before
        compare(out, expected, f"{what} on {cc}", tol)
    return count


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize(
    "n, h, d, v, k",
    [
        (1, 1, 8, 50, 1),
        (3, 4, 64, 3000, 5),
        (17, 4, 40, 1000, 64),  # 68 rows: the logits are computed, then ranked
        (5, 3, 36, 700, 9),  # depth 36: likewise
        (7, 4, 40, 1300, 17),  # 28 rows: 32-row tiles on tensor cores
        (16, 4, 72, 999, 64),  # 64 rows
    ],
)
def test_fused_mtp_heads(emu, schedule, monkeypatch, launches, dtype, n, h, d, v, k):
    args = heads_args(dtype, n, h, d, v, k)
    expected = torch.ops.mtp_ext.fused_mtp_heads(*args)
    count = on_both_capabilities(
        monkeypatch,
        launches,
        lambda: emu.fused_mtp_heads(*args),
        expected,
        "fused_mtp_heads",
        TOL[dtype].logprob,
    )
    # On tensor cores the heads' blocks and the unembedding make one launch more each (the split
    # of the rows).
    assert count["9.0"] - count["7.5"] == (2 if d % 8 == 0 and dtype != F32 else 0)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize(
    "n, d, v, k, norm",
    [
        (4, 64, 3000, 5, True),
        (5, 36, 700, 9, False),  # depth 36: the logits are computed, then ranked
        (70, 40, 1000, 3, True),  # 70 rows: likewise
    ],
)
def test_fused_mtp_heads_without_weight(
    emu, schedule, monkeypatch, launches, dtype, n, d, v, k, norm
):
    hidden, _, _, lm_head, nw = heads_inputs(n, 1, d, v, dtype, 1, norm=norm)
    args = (hidden, None, None, lm_head, k, nw, 1e-6, None)
    expected = torch.ops.mtp_ext.fused_mtp_heads(*args)

    def run(weight):
        return lambda: emu.fused_mtp_heads(hidden, weight, *args[2:])

    count = on_both_capabilities(
        monkeypatch, launches, run(None), expected, "without weight", TOL[dtype].logprob
    )
    zero = torch.zeros(1, d, d, dtype=dtype)
    zero_count = on_both_capabilities(
        monkeypatch, launches, run(zero), expected, "zero weight", TOL[dtype].logprob
    )
    # No product with a weight and no residual kernel: the final norm when norm_weight is given,
    # then the same unembedding launches as with a [1, D, D] zero weight.
    for cc in ["9.0", "7.5"]:
        product = 2 if cc == "9.0" and d % 8 == 0 and dtype != F32 else 1
        assert zero_count[cc] - count[cc] == product + 1 - int(norm), (cc, count, zero_count)


def test_tensor_core_grid_follows_the_shared_memory_per_sm(emu, monkeypatch):
    # 16-row tiles take 85 KB of shared memory: two blocks per SM on an H100 or H200 (228 KB),
    # one on an A100 (164 KB). The unembedding's grid is sized from that; the answer is not.
    args = heads_args(BF16, 4, 4, 64, 4096, 8)
    expected = torch.ops.mtp_ext.fused_mtp_heads(*args)
    monkeypatch.setenv("CUDA_EMU_SMS", "4")
    grids = {}
    for name, smem in [("H100", "233472"), ("A100", "167936")]:
        monkeypatch.setenv("CUDA_EMU_SMEM_PER_SM", smem)
        out, log = launch_log(lambda: emu.fused_mtp_heads(*args))
        compare(out, expected, f"fused_mtp_heads ({name})", TOL[BF16].logprob)
        grids[name] = [blocks for blocks, _ in log]
    changed = [(h, a) for h, a in zip(grids["H100"], grids["A100"]) if h != a]
    assert changed == [(8, 4)], grids  # 4 SMs x 2 blocks, then 4 SMs x 1


@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize(
    "hidden_scale, lm_scale, norm",
    [(1.0, 0.4, True), (1e-4, 1e3, False), (1.5e4, 5e-5, False)],
    ids=["unit", "tiny-z", "huge-z"],
)
def test_fused_mtp_heads_blocks_of_several_tiles_and_extreme_scales(
    emu, monkeypatch, dtype, hidden_scale, lm_scale, norm
):
    # Two SMs: each block streams several tiles (and its last one partly). z of about 1e-4 sits in
    # float16's subnormal range and 1.5e4 + SiLU(...) near its largest value: without the per-row
    # power-of-two scale the split of z into two float16 parts would lose or overflow them.
    monkeypatch.setenv("CUDA_EMU_SMS", "2")
    args = heads_args(dtype, 6, 5, 48, 2900, 8, hidden_scale, lm_scale, norm)
    ref = torch.ops.mtp_ext.fused_mtp_heads(*args)
    assert ref[0].isfinite().all() and ref[0][..., 0].max() > -7  # logits of order 1, not ties
    compare(emu.fused_mtp_heads(*args), ref, "fused_mtp_heads", TOL[dtype].logprob)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fused_mtp_heads_nan_and_ties(emu, schedule, dtype):
    # NaN rows of lm_head rank first (the lower id first) and make the log-normalizer NaN; equal
    # rows give equal logits on tensor cores too, ranked by id.
    args = list(heads_args(dtype, 2, 3, 64, 700, 6))
    lm_head = args[3]
    lm_head[[300, 12]] = float("nan")
    lm_head[[500, 650]] = lm_head[40].clone()
    lp, ids = emu.fused_mtp_heads(*args)
    cpu_lp, cpu_ids = torch.ops.mtp_ext.fused_mtp_heads(*args)
    assert torch.equal(ids, cpu_ids) and (ids[..., :2] == torch.tensor([12, 300])).all()
    assert lp.isnan().all() and cpu_lp.isnan().all()
    tied = torch.zeros(700, 64, dtype=dtype)
    tied[[5, 200, 699]] = 1.0
    args[3] = tied
    compare(emu.fused_mtp_heads(*args), torch.ops.mtp_ext.fused_mtp_heads(*args), "ties")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("rows", [1, 5, 64, 65])
def test_small_batch_linear(emu, dtype, rows):
    x = randn(rows, 72, dtype=dtype, seed=rows)
    w = randn(300, 72, dtype=dtype, seed=2, scale=0.1)
    b = randn(300, dtype=dtype, seed=3)
    compare(
        emu.small_batch_linear(x, w, b),
        torch.ops.mtp_ext.small_batch_linear(x, w, b),
        "small_batch_linear",
        TOL[dtype].linear,
    )


@pytest.mark.parametrize("wdtype", [F16, BF16])
@pytest.mark.parametrize("rows", [3, 20, 64, 100, 200])
def test_dense_product_on_tensor_cores_splits_the_depth(
    emu, schedule, monkeypatch, launches, wdtype, rows
):
    # Two tiles of 256 table rows are too few for the device: the depth (520, 17 stages) is split
    # in two across blocks and the parts summed by a second kernel (3 launches with the split of
    # the rows, against 1 on CUDA cores). Rows past 64 take several row tiles.
    x = randn(rows, 520, seed=rows)
    w = randn(300, 520, dtype=wdtype, seed=2, scale=0.05)
    b = randn(300, seed=3)
    expected = torch.ops.mtp_ext.small_batch_linear(x, w, b)
    # float32 out: the split rows' 2^-17 relative error per term over 520 terms
    count = on_both_capabilities(
        monkeypatch,
        launches,
        lambda: emu.small_batch_linear(x, w, b),
        expected,
        "small_batch_linear",
        (1e-4, 1e-4),
    )
    assert count["9.0"] - count["7.5"] == 2


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_fused_mtp_heads_deep_heads_on_tensor_cores(emu, monkeypatch, dtype):
    # D = 512: the heads' blocks (groups sharing the rows, split once) take two depth splits.
    monkeypatch.setenv("CUDA_EMU_SCHEDULE", "random:5")
    args = heads_args(dtype, 4, 3, 512, 700, 5)
    compare(
        emu.fused_mtp_heads(*args),
        torch.ops.mtp_ext.fused_mtp_heads(*args),
        "fused_mtp_heads",
        TOL[dtype].logprob,
    )


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 20, 0.8), (1.2, 0, 0.9), (1.0, 100, 1.0)],
)
def test_verify_tree(emu, schedule, temperature, top_k, top_p):
    draft, par, logits, u = verify_inputs(3)
    args = (draft, par, logits, temperature, top_k, top_p, None if temperature == 0 else u)
    compare(emu.verify_tree(*args), torch.ops.mtp_ext.verify_tree(*args), "verify_tree")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_verify_tree_from_hidden(emu, schedule, dtype):
    b, t, d, v = 2, 10, 48, 700
    draft, par, _, _ = verify_inputs(5, b=b, v=v)
    hidden = randn(b, t, d, dtype=dtype, seed=6)
    lm_head = randn(v, d, dtype=dtype, seed=7, scale=0.3)
    nw = (1 + randn(d, seed=8, scale=0.1)).to(dtype)
    args = (draft, par, hidden, lm_head, nw, 1e-6)
    compare(
        emu.verify_tree_from_hidden(*args),
        torch.ops.mtp_ext.verify_tree_from_hidden(*args),
        "verify_tree_from_hidden",
    )


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float64])
def test_tree_attention_mask(emu, dtype):
    parents = torch.stack([medusa_tree(), torch.tensor([-1] + list(range(9)))])
    compare(
        emu.tree_attention_mask(parents, 5, dtype),
        torch.ops.mtp_ext.tree_attention_mask(parents, 5, dtype),
        "mask",
    )


def test_compact_kv(emu, schedule):
    cache = randn(3, 4, 20, 16, dtype=BF16, seed=9)
    path = torch.tensor([[0, 2, 3, 4, 5, 5], [0, 3, 4, 4, 5, 5], [0, 1, 2, 3, 4, 5]])
    num = torch.tensor([4, 2, 0])
    a, b = cache.clone(), cache.clone()
    emu.compact_kv(a, path, num, 10)
    torch.ops.mtp_ext.compact_kv(b, path, num, 10)
    assert torch.equal(a, b)


@pytest.mark.parametrize("chunks", [95, 96])
def test_merge_at_the_48kb_line(emu, chunks):
    # chunks x 64 candidates x 8 bytes of dynamic shared memory: 47.5 KB is under 48 KB alone but
    # not with the merge kernel's static shared memory, so both need the opt-in (the emulator
    # fails a launch that lacks it).
    x = randn(1, chunks * 8192, dtype=BF16, seed=11, scale=3.0)
    compare(emu.softmax_topk(x, 64), torch.ops.mtp_ext.softmax_topk(x, 64), "softmax_topk")


def test_translate_rewrites_launches_and_dynamic_shared_memory():
    from cuda_emulator import translate

    src = (
        "__global__ void k(int* p) { extern __shared__ __align__(16) float dyn[]; }\n"
        "void go(cudaStream_t s) {\n"
        "  k<<<dim3(2, 3), 64, 0, s>>>(p);\n"
        "  other_kernel<T, 16><<<grid,\n      kThreads, smem, s>>>(a, b);\n"
        "}\n"
    )
    out = translate(src, "k.cu")
    assert "float* dyn = ::cuda_emu::dynamic_shared<float>();" in out
    assert "::cuda_emu::launch(k, ::cuda_emu::LaunchConfig(dim3(2, 3), 64, 0, s))(p);" in out
    assert (
        "::cuda_emu::launch(other_kernel<T, 16>, ::cuda_emu::LaunchConfig(grid,\n      kThreads, smem, s))(a, b);"
        in out
    )
    # Line numbers are kept: the original's lines follow the include and the #line directive.
    assert out.count("\n") == src.count("\n") + 2
    with pytest.raises(ValueError, match="cannot translate"):
        translate("void f() { (k)<<<1, 1>>>(); }")
    # __launch_bounds__ with and without a minimum of blocks per SM gets the run-time check.
    for bounds in ["kThreads", "kThreads, Shape<RB>::kMinBlocks"]:
        out = translate(f"__global__ void __launch_bounds__({bounds})\n    k2(int* p) {{ }}\n")
        assert "{ ::cuda_emu::check_launch_bounds(kThreads);" in out
