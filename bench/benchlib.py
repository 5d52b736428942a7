"""Shared pieces of the benchmark suites: shape selection, compiled references, correctness checks.

Every benchmark row is one *implementation* of one op at one shape, and all rows of a shape share
one pytest-benchmark group, so the table compares them side by side:

* ``kernel``    - the C++ op, ``mtp_ext.ops.<op>``;
* ``reference`` - the plain-PyTorch definition, ``mtp_ext.reference.<op>``;
* ``compiled``  - ``torch.compile(mtp_ext.reference.<op>)`` (default backend, no fullgraph, static
  shapes); compiled and warmed up outside the timed region;
* ``baseline``  - plain torch written for speed where that is the fair comparison (e.g. softmax
  + ``torch.topk``, which does not guarantee the tie order the op promises).

Before timing, every row checks its output once against the reference (see ``run``).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

IMPLS = ("kernel", "reference", "compiled", "baseline")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def small_mode() -> bool:
    """True when ``MTP_EXT_BENCH_SMALL=1`` (or ``--bench-small``): tiny shapes for CI."""
    return _flag("MTP_EXT_BENCH_SMALL")


def compile_enabled() -> bool:
    """False when ``MTP_EXT_BENCH_NO_COMPILE=1``: the ``compiled`` rows are skipped."""
    return not _flag("MTP_EXT_BENCH_NO_COMPILE")


def shapes(full: list, small: list) -> list:
    return small if small_mode() else full


def import_mtp_ext():
    """Import the extension, retrying a few times (it may be rebuilt in place while we start)."""
    last = None
    for _ in range(10):
        try:
            import mtp_ext  # noqa: F401
            from mtp_ext import ops, reference

            return ops, reference
        except (ImportError, OSError) as exc:  # a half-written _C*.so during a rebuild
            last = exc
            time.sleep(3)
    raise last


ops, reference = import_mtp_ext()


@functools.cache
def compiled(fn):
    """``torch.compile(fn)``: one wrapper per reference function, specialized per shape."""
    return torch.compile(fn, dynamic=False)


def cases(shape_list: list, impls=IMPLS) -> list:
    """``(shape, impl)`` pairs, shape-major, so the rows of one group run back to back."""
    return [pytest.param(s, i, id=f"{_shape_id(s)}-{i}") for s in shape_list for i in impls]


def _shape_id(shape: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items())


def group_name(op: str, shape: dict) -> str:
    return op + " " + " ".join(f"{k}={v}" for k, v in shape.items())


def run(benchmark, *, op: str, shape: dict, impl: str, fn, args, check, variant: str = ""):
    """Warm up ``fn(*args)`` (compiling it for ``compiled``), check its output, then time it.

    ``args`` is a tuple, or a callable returning a fresh tuple for each call (for in-place ops).
    ``check(out)`` raises (an ``AssertionError``) when the output disagrees with the reference.
    ``variant`` tells rows of the same op apart in the group name (e.g. greedy / sampling).
    """
    get_args = args if callable(args) else (lambda: args)
    name = op + (f"[{variant}]" if variant else "")
    benchmark.group = group_name(name, shape)
    benchmark.extra_info.update(op=op, variant=variant, impl=impl, **shape)
    if impl == "compiled":
        if not compile_enabled():
            pytest.skip("MTP_EXT_BENCH_NO_COMPILE=1")
        start = time.perf_counter()
        try:
            out = fn(*get_args())  # compile + first run, outside the timed region
        except Exception as exc:  # noqa: BLE001  (report, do not fail the suite)
            pytest.skip(f"torch.compile(reference.{op}) failed: {type(exc).__name__}: {exc}")
        benchmark.extra_info["compile_s"] = round(time.perf_counter() - start, 3)
        out = fn(*get_args())  # second call: any recompilation happens here, not in the timing
    else:
        out = fn(*get_args())
    check(out)
    benchmark.extra_info["checked"] = True
    benchmark(fn, *get_args())


# ---------------------------------------------------------------------------------------------
# Correctness checks
# ---------------------------------------------------------------------------------------------


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: differs from the reference at {bad} (first 5)")


def assert_close(actual, expected, what: str, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_topk_equivalent(
    values: torch.Tensor,
    ids: torch.Tensor,
    ref_values: torch.Tensor,
    full_scores: torch.Tensor,
    what: str,
    rtol: float = 1e-4,
    atol: float = 1e-6,
) -> None:
    """A top-k that is right up to the order of (near-)ties.

    The values match the reference's top-k values; every returned id is distinct, in range, and
    its reference score equals the value returned for it. So any id that differs from the
    reference's can only be an equally good (within tolerance) choice.
    """
    assert values.shape == ref_values.shape, f"{what}: shape {tuple(values.shape)} != {tuple(ref_values.shape)}"
    assert ids.dtype == torch.long, f"{what}: ids dtype {ids.dtype}"
    v = full_scores.shape[-1]
    assert bool(((ids >= 0) & (ids < v)).all()), f"{what}: ids out of [0, {v})"
    sorted_ids = ids.sort(-1).values
    assert not bool((sorted_ids[..., 1:] == sorted_ids[..., :-1]).any()), f"{what}: repeated ids"
    assert_close(values, ref_values, f"{what} (values)", rtol, atol)
    assert_close(full_scores.gather(-1, ids), values, f"{what} (score of each returned id)", rtol, atol)
