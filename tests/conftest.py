"""Pytest setup shared by every test file; the helpers themselves live in ``helpers.py``."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test file
# The CUDA launchers skip the argument checks that must read device data (a host sync) unless this
# is set; the bad-input tests expect those checks on every device.
os.environ.setdefault("MTP_EXT_CUDA_VALUE_CHECKS", "1")

import mtp_ext  # noqa: F401  (registers torch.ops.mtp_ext before any test is collected)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests draw inputs from explicit generators; this only pins any incidental global draw."""
    torch.manual_seed(0)
    yield


def pytest_make_parametrize_id(config, val, argname):
    """Readable test ids for dtypes ("float16" rather than "dtype1")."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None
