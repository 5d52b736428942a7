"""pytest configuration of the benchmark suites (see bench/README.md).

* Collects ``bench_*.py`` even when another configuration file is in charge (e.g. ``python -m
  pytest tests bench`` from the repository root, where pyproject.toml's settings apply).
* ``--bench-small`` (or ``MTP_EXT_BENCH_SMALL=1``) swaps in tiny shapes and, unless
  ``--benchmark-min-rounds`` / ``--benchmark-max-time`` are given, short timing settings.
* ``torch.compile`` may keep one specialized graph per shape and argument of every reference.
"""

from __future__ import annotations

import fnmatch
import logging
import os

import pytest

SMALL_MIN_ROUNDS = 3
SMALL_MAX_TIME = "0.05"


def pytest_addoption(parser):
    group = parser.getgroup("mtp_ext benchmarks")
    group.addoption(
        "--bench-small",
        action="store_true",
        default=False,
        help="tiny shapes (V ~ 1000, B <= 4) for CI; same as MTP_EXT_BENCH_SMALL=1",
    )
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) for the run; same as MTP_EXT_BENCH_THREADS=N "
        "(on a shared or busy machine, 1 avoids waits at parallel barriers)",
    )
    group.addoption(
        "--bench-no-compile",
        action="store_true",
        default=False,
        help="skip the torch.compile(reference) rows; same as MTP_EXT_BENCH_NO_COMPILE=1",
    )


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads these options.
    if config.getoption("--bench-small"):
        os.environ["MTP_EXT_BENCH_SMALL"] = "1"
    if config.getoption("--bench-no-compile"):
        os.environ["MTP_EXT_BENCH_NO_COMPILE"] = "1"

    import benchlib  # after the environment is final: it decides the shapes at import

    if benchlib.small_mode() and hasattr(config.option, "benchmark_min_rounds"):
        from pytest_benchmark.utils import parse_seconds

        if config.option.benchmark_min_rounds == 5:  # pytest-benchmark's default
            config.option.benchmark_min_rounds = SMALL_MIN_ROUNDS
        if config.option.benchmark_max_time == parse_seconds("1.0"):  # default
            config.option.benchmark_max_time = parse_seconds(SMALL_MAX_TIME)

    import torch

    threads = config.getoption("--bench-threads") or int(os.environ.get("MTP_EXT_BENCH_THREADS", 0))
    if threads:
        torch.set_num_threads(threads)
    dynamo = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, name):
            setattr(dynamo, name, 256)
    # The tree references graph-break on purpose (Python walks); do not log each break.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py when python_files (of whichever ini is in charge) does not."""
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's python plugin collects it
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None  # collected by the python plugin already
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_benchmark_update_machine_info(config, machine_info):
    import benchlib
    import torch

    machine_info["mtp_ext_bench"] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "small_mode": benchlib.small_mode(),
        "compile": benchlib.compile_enabled(),
    }


def pytest_report_header(config):
    import benchlib
    import torch

    mode = "small (CI shapes)" if benchlib.small_mode() else "full (model shapes)"
    return [f"mtp_ext bench: {mode}; torch {torch.__version__}, {torch.get_num_threads()} threads"]
