"""small_batch_linear against mtp_ext.reference.small_batch_linear (in float64, see helpers.ref64).

The result is ``x @ weight.T + bias`` summed in float32 and returned in ``x``'s dtype: float32
results must be within the float32 summation error of the exact value, float16 / bfloat16 results
within one rounding of that dtype (TOL[...].linear; float32 x with a 16-bit weight on the CUDA
kernels: helpers.linear_tol). Inputs are scaled so that outputs are O(1).
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_close, devices, gen, linear_tol, randn, ref64

from mtp_ext import ops
from mtp_ext import reference as ref

MS = [1, 2, 3, 7, 8, 64, 65, 100]  # below, at and above the kernel's 4-row tile and 64-row target
KS = [1, 5, 37, 576]
NS = [1, 7, 49, 1000]


def make_inputs(m, k, n, device, x_dtype=torch.float32, w_dtype=torch.float32, bias=True, seed=0):
    x = randn(m, k, dtype=x_dtype, device=device, seed=seed)
    weight = randn(n, k, dtype=w_dtype, device=device, seed=seed + 1, scale=max(k, 1) ** -0.5)
    b = randn(n, dtype=w_dtype, device=device, seed=seed + 2, scale=0.5) if bias else None
    return x, weight, b


def check(x, weight, bias=None):
    """The kernel's result has the reference's shape, dtype and device, and is close to it."""
    y = ops.small_batch_linear(x, weight, bias)
    cpu_bias = None if bias is None else bias.cpu()
    expected = ref64(ref.small_batch_linear, x.cpu(), weight.cpu(), cpu_bias)
    assert y.shape == (x.shape[0], weight.shape[0])
    assert y.dtype == x.dtype and y.device == x.device
    tol = linear_tol(x.dtype, weight.dtype, x.device)
    assert_close(y.cpu().float(), expected, tol, "small_batch_linear")
    return y


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("m", MS)
def test_shapes(device, m, bias):
    for k in KS:
        for n in NS:
            check(*make_inputs(m, k, n, device, bias=bias, seed=m + k + n))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", DTYPES)
def test_dtypes(device, x_dtype, w_dtype, bias):
    for m, k, n in [(3, 37, 49), (8, 5, 7), (65, 576, 1000)]:
        check(*make_inputs(m, k, n, device, x_dtype, w_dtype, bias=bias, seed=m))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_known_answer_exact(device, dtype):
    # Small integers: every product and partial sum is exact in float32 and the result (|y| <= 153)
    # is exact in every dtype, so any summation order gives exactly the integer matmul.
    g = gen(1)
    m, k, n = 7, 37, 49
    xi = torch.randint(-2, 3, (m, k), generator=g)
    wi = torch.randint(-2, 3, (n, k), generator=g)
    bi = torch.randint(-5, 6, (n,), generator=g)
    expected = xi @ wi.T + bi
    y = ops.small_batch_linear(*(t.to(dtype=dtype, device=device) for t in (xi, wi, bi)))
    assert y.dtype == dtype
    assert torch.equal(y.cpu(), expected.to(dtype))
    y = ops.small_batch_linear(xi.to(dtype=dtype, device=device), wi.to(dtype=dtype, device=device))
    assert torch.equal(y.cpu(), (xi @ wi.T).to(dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous(device, dtype):
    m, k, n = 7, 37, 49
    x = randn(k, m, dtype=dtype, device=device, seed=3).t()  # transposed views
    weight = randn(k, n, dtype=dtype, device=device, seed=4, scale=k**-0.5).t()
    bias = randn(2 * n, dtype=dtype, device=device, seed=5)[::2]
    for t in (x, weight, bias):
        assert not t.is_contiguous()
    check(x, weight, bias)
    # Strided along K, and a row slice with an offset.
    x2 = randn(m + 1, 2 * k, dtype=dtype, device=device, seed=6)[1:, ::2]
    w2 = randn(n, 3 * k, dtype=dtype, device=device, seed=7, scale=k**-0.5)[:, k : 2 * k]
    for t in (x2, w2):
        assert not t.is_contiguous()
    check(x2, w2, bias)
    check(x2, weight)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty(device, dtype):
    # M = 0 and N = 0: empty results of the right shape and dtype.
    for m, k, n in [(0, 5, 7), (3, 5, 0), (0, 0, 0), (0, 5, 0)]:
        x, weight, bias = make_inputs(m, k, n, device, dtype, dtype, seed=8)
        for b in (bias, None):
            y = ops.small_batch_linear(x, weight, b)
            assert y.shape == (m, n) and y.dtype == dtype and y.device == x.device
    # K = 0: an empty sum, so the result is the bias (or zeros) broadcast over the rows.
    x, weight, bias = make_inputs(4, 0, 7, device, dtype, dtype, seed=9)
    y = ops.small_batch_linear(x, weight, bias)
    assert y.shape == (4, 7) and y.dtype == dtype
    assert torch.equal(y.cpu(), bias.cpu().expand(4, 7))
    y = ops.small_batch_linear(x, weight, None)
    assert y.shape == (4, 7) and y.dtype == dtype
    assert torch.equal(y.cpu(), torch.zeros(4, 7, dtype=dtype))


@pytest.mark.parametrize("device", devices())
def test_inputs_untouched_and_output_fresh(device):
    x, weight, bias = make_inputs(5, 37, 49, device, seed=10)
    copies = [t.clone() for t in (x, weight, bias)]
    y = ops.small_batch_linear(x, weight, bias)
    for t, c in zip((x, weight, bias), copies):
        assert torch.equal(t, c)
    y2 = ops.small_batch_linear(x, weight, bias)
    assert y.data_ptr() != y2.data_ptr() and torch.equal(y, y2)


@pytest.mark.parametrize("device", devices())
def test_non_finite_stays_in_its_row(device):
    # The kernel computes tiles of several rows at once: a NaN or inf in one row of x must give
    # exactly what the reference gives (NaN / inf in that row only), never leak into other rows.
    m, k, n = 7, 37, 49
    x, weight, bias = make_inputs(m, k, n, device, seed=11)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[5, 36] = float("-inf")
    y = ops.small_batch_linear(x, weight, bias)
    expected = ref.small_batch_linear(x.cpu(), weight.cpu(), bias.cpu())
    assert_close(y.cpu(), expected, linear_tol(x.dtype, weight.dtype, device), equal_nan=True)
    finite_rows = [0, 3, 4, 6]
    assert bool(torch.isfinite(y[finite_rows]).all())
    assert bool(torch.isnan(y[1]).all())
    assert bool(torch.isinf(y[2]).all()) and bool(torch.isinf(y[5]).all())


@pytest.mark.parametrize("bias", [True, False])
def test_backward_matches_reference(bias):
    x = torch.randn(5, 7, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(3, 7).requires_grad_()
    b = torch.randn(3).requires_grad_() if bias else None
    grad = torch.randn(5, 3)
    ops.small_batch_linear(x, w, b).backward(grad)
    got = [x.grad, w.grad] + ([b.grad] if bias else [])
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if bias else None
    torch.nn.functional.linear(x2, w2, b2).backward(grad)
    want = [x2.grad, w2.grad] + ([b2.grad] if bias else [])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
