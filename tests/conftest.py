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
# The linear kernel's per-machine choice (mtp_ext.linear_choice) would time every tiny test model's
# shapes on first use: the suite routes as before the choice (small-row kernel for 2..64 rows),
# and tests/test_linear_choice.py tests the choice with injected and measured costs.
os.environ.setdefault("MTP_EXT_LINEAR_KERNEL", "ours")

import mtp_ext  # noqa: F401  (registers torch.ops.mtp_ext before any test is collected)


def pytest_addoption(parser):
    parser.addoption(
        "--cuda-emulator",
        action="store_true",
        help="run the mtp_ext ops on CPU tensors through the CUDA kernels under the CPU emulator "
        "(tests/cuda_emulator.py) instead of the CPU kernels: the CPU tests then check the CUDA code",
    )


_EMULATOR_ROUTES = []


def pytest_configure(config):
    if config.getoption("--cuda-emulator"):
        import helpers
        from cuda_emulator import route_cpu_ops_to_emulator

        _EMULATOR_ROUTES.append(route_cpu_ops_to_emulator())
        helpers.CUDA_CODE_ON_CPU = True


def pytest_collection_modifyitems(config, items):
    """Under --cuda-emulator, tests marked emulator_slow are skipped unless -m names them."""
    if not config.getoption("--cuda-emulator") or "emulator_slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="too slow under the CUDA emulator (run with -m emulator_slow)")
    for item in items:
        if "emulator_slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    if config.getoption("--cuda-emulator"):
        return "mtp_ext ops on CPU tensors: the CUDA kernels under the CPU emulator"
    return None


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
