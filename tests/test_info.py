"""``mtp-ext info``: versions, the CUDA device and which cores its 16-bit weights use, and the
backends of every op."""

from __future__ import annotations

import torch

from mtp_ext import ops
from mtp_ext.cli import info


def test_info_lists_every_op_with_its_backends():
    text = info.info_text()
    assert text.startswith("mtp_ext ")
    for name in ops.__all__:
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        assert "CPU" in line and "Meta" in line


def test_cuda_device_line_says_which_cores_run_16_bit_weights(monkeypatch):
    if not torch.cuda.is_available():
        assert info.cuda_device_text() == "CUDA device available: False"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    cases = [((9, 0), "tensor"), ((8, 0), "tensor"), ((10, 0), "tensor"), ((7, 5), "CUDA")]
    for capability, kind in cases:
        cores = f"{kind} cores"
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        line = info.cuda_device_text()
        assert line.startswith(
            f"CUDA device: NVIDIA H200, compute capability {capability[0]}.{capability[1]}:"
        )
        assert f"run on {cores}" in line
