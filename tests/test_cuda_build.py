"""The CUDA build on a machine without a GPU: every op has a CUDA kernel registered, and calling one
with CUDA tensors fails with a clear error instead of crashing or silently running elsewhere.

Runs in CI against a CUDA build of torch (scripts/build_cuda.sh); skipped with a reason where the
extension was built without CUDA kernels or where a GPU is present (tests/test_cuda_kernels.py
covers that case).
"""

from __future__ import annotations

import re

import pytest
import torch

import mtp_ext  # noqa: F401  (registers the ops)

OPS = list(mtp_ext.ops.__all__)  # every public op needs a CUDA kernel


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mtp_ext::{op}", "CUDA")


BUILT_WITH_CUDA = has_cuda_kernel("softmax_topk")

pytestmark = [
    pytest.mark.skipif(
        not BUILT_WITH_CUDA,
        reason="the extension was built without CUDA kernels (CPU torch, or no CUDA toolkit)",
    ),
]

no_gpu = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU is present: tests/test_cuda_kernels.py runs the kernels"
)


def test_torch_is_a_cuda_build():
    assert torch.version.cuda is not None


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert has_cuda_kernel(op), f"mtp_ext::{op} has no CUDA kernel registered"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtp_ext::{op}", "CPU")


# What torch says when there is no GPU or no driver.
NO_GPU = re.compile(r"CUDA|NVIDIA driver|GPU", re.IGNORECASE)


@no_gpu
def test_calling_a_cuda_kernel_without_a_gpu_raises_a_clear_error():
    with pytest.raises(RuntimeError) as info:
        logits = torch.zeros(2, 10, device="cuda")
        torch.ops.mtp_ext.softmax_topk(logits, 3)
    assert NO_GPU.search(str(info.value)), f"unclear error: {info.value}"


@no_gpu
def test_every_op_fails_cleanly_on_cuda_inputs_without_a_gpu():
    calls = {
        "softmax_topk": lambda d: torch.ops.mtp_ext.softmax_topk(torch.zeros(2, 10, device=d), 3),
        "marginalize": lambda d: torch.ops.mtp_ext.marginalize(
            torch.zeros(2, 3, 10, device=d), torch.ones(2, 3, device=d)
        ),
        "tree_attention_mask": lambda d: torch.ops.mtp_ext.tree_attention_mask(
            torch.tensor([-1, 0, 1], device=d), 2
        ),
        "compact_kv": lambda d: torch.ops.mtp_ext.compact_kv(
            torch.zeros(1, 2, 8, 4, device=d),
            torch.zeros(1, 3, dtype=torch.long, device=d),
            torch.zeros(1, dtype=torch.long, device=d),
            2,
        ),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError) as info:
            call("cuda")
        assert NO_GPU.search(str(info.value)), f"{name}: unclear error: {info.value}"
        call("cpu")  # the same call on the CPU works


def test_cpu_kernels_still_work_in_the_cuda_build():
    probs, ids = torch.ops.mtp_ext.softmax_topk(torch.tensor([[1.0, 3.0, 2.0]]), 2)
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(probs, torch.softmax(torch.tensor([1.0, 3.0, 2.0]), -1)[[1, 2]].unsqueeze(0))
