"""Which kernel multiplies a few rows by a weight on this CPU (``mtp_ext.linear_choice``).

:class:`~mtp_ext.cpu_linear.SmallBatchLinear` can send ``x[M, K] @ weight[N, K].T`` through torch's
``F.linear`` ("torch") or through :func:`mtp_ext.ops.small_batch_linear` ("ours"). Which is faster
depends on the CPU (an AMD EPYC without AMX: ours at nearly every row count; a Xeon with AMX /
AVX512-BF16: torch at some row counts, dtypes and shapes), so it is measured once per machine:

- **Measured**: for each weight shape ``(N, K)`` and dtype (float32, bfloat16, float16), the median
  time of both kernels at each row count of :data:`ROWS`, with the weights streamed from memory as
  in a model's forward pass: every timed rotation calls the kernel on enough distinct copies of
  the weight to exceed twice the L3 cache (at most :data:`MAX_COPIES` copies and
  :data:`MAX_BYTES` in all; one copy where the weight alone is larger), so that no call finds
  its weight in the cache. Before timing, both kernels' results must agree (``allclose`` with the
  dtype's tolerance); where ours disagrees or fails it is not a candidate there.
- **Chosen** (:func:`choose`, a pure function of the costs): ours at a grid row count only where
  it measured at least :data:`MARGIN` (3 %) faster than torch, so that noise does not flip the
  choice; torch otherwise. A row count between grid points takes the choice of the next grid
  point up; above :data:`MAX_ROWS` (64) rows always torch.
- **Cached**: in ``<cache folder>/linear_choice/<cpu_key>.json`` (:func:`mtp_ext.machine.cpu_key`:
  the CPU model, its ISA flags, the torch version and the thread count), one file per key holding
  every shape and dtype measured so far; a shape not in it is measured on first use and added. A
  damaged file is measured again; where the folder cannot be written, the table is kept for the
  process (one warning).
- **Forced**: the environment variable ``MTP_EXT_LINEAR_KERNEL=torch`` sends everything to torch,
  ``ours`` restores the routing used before this choice existed (ours for 2..``max_rows`` rows,
  torch for one row), ``auto`` (the default) uses the measurement.

Costs are a plain mapping ``{(kernel, N, K, dtype_name, rows): seconds}`` (:data:`CostKey`), so a
choice can be built from given costs (:meth:`LinearChoice.from_costs`) without timing anything.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import ops
from .data.cache import cache_dir, remove_stale_temps, warn_once, write_file
from .machine import cpu_facts, cpu_key, describe_cpu

__all__ = [
    "ROWS", "MAX_ROWS", "MARGIN", "KERNELS", "DTYPES", "ENV_VAR", "SMOLLM2_135M_SHAPES",
    "LinearChoice", "choose", "kernel_mode", "measure", "choice_for_model", "choice_for_shapes",
    "cached_choice", "cache_path", "describe",
]

# Row counts measured; a row count between two of them takes the choice of the next one up.
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
MAX_ROWS = ROWS[-1]
# Ours is chosen at a grid point only where it measured at least this much faster than torch.
MARGIN = 0.03
KERNELS = ("torch", "ours")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ENV_VAR = "MTP_EXT_LINEAR_KERNEL"
MODES = ("auto", "torch", "ours")
# The linear layers of SmolLM2-135M (N, K): q/o, k/v, gate/up, down, lm_head.
SMOLLM2_135M_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576))

# Measurement: the weight copies of one rotation exceed twice the L3 within these caps.
DEFAULT_L3_BYTES = 32 << 20
MAX_BYTES = 512 << 20
MAX_COPIES = 512
REPS = 3  # timed rotations per kernel and row count (median) ...
BIG_REPS = 2  # ... and for weights that exceed the L3 alone (a rotation is one or two calls)
# Past this many seconds on one shape and dtype (a machine busy with other work), the remaining row
# counts take one rotation per kernel.
ENTRY_BUDGET_S = 3.0
# allclose tolerances of ours against torch (outputs are O(1): x ~ N(0, 1), weight ~ N(0, 1/K)).
TOLERANCES = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 4e-3}
FORMAT = 1

CostKey = tuple  # (kernel: "torch" | "ours", N: int, K: int, dtype_name: str, rows: int)


def _dtype_name(dtype) -> str:
    """``"float32"`` for ``torch.float32`` or ``"float32"``."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def kernel_mode() -> str:
    """``$MTP_EXT_LINEAR_KERNEL`` (``auto`` when unset or empty): ``auto``, ``torch`` or ``ours``.
    Raises ValueError for any other value."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}: expected one of "
                         f"{', '.join(MODES)}")
    return mode


def choose(costs: Mapping[CostKey, float], margin: float = MARGIN) -> dict[tuple, str]:
    """The kernel of each measured grid point: ``{(N, K, dtype_name, rows): "ours" | "torch"}``.

    Ours wherever both kernels were measured there and ours took at most ``1 - margin`` times
    torch's time; torch everywhere else (also where ours has no cost: it failed or disagreed).
    Pure: no timing, no state.
    """
    out = {}
    for key, t_torch in costs.items():
        if key[0] != "torch":
            continue
        point = tuple(key[1:])
        t_ours = costs.get(("ours", *point))
        ours = t_ours is not None and t_torch is not None and t_ours <= (1.0 - margin) * t_torch
        out[point] = "ours" if ours else "torch"
    return out


class LinearChoice:
    """Which kernel runs ``x[rows, K] @ weight[N, K].T`` for each weight shape, dtype and row count.

    Built from costs (:meth:`from_costs`, or measured: :meth:`measured`, :func:`choice_for_model`,
    :func:`choice_for_shapes`) and a mode (``auto``: the costs decide; ``torch``; ``ours``: the
    routing before measured choices, ours for 2..``max_rows`` rows). In ``auto`` a shape and dtype
    without costs keeps that same routing, a dtype other than float32 / bfloat16 / float16 takes
    torch.
    """

    def __init__(self, costs: Mapping[CostKey, float] | None = None, mode: str = "auto",
                 margin: float = MARGIN, seconds: Mapping[tuple, float] | None = None):
        if mode not in MODES:
            raise ValueError(f"LinearChoice: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.margin = margin
        self._costs = {(str(c[0]), int(c[1]), int(c[2]), _dtype_name(c[3]), int(c[4])): v
                       for c, v in (costs or {}).items()}
        self._seconds = dict(seconds or {})
        self._choices = choose(self._costs, margin)
        grids: dict[tuple, list[int]] = {}
        for n, k, dt, rows in self._choices:
            grids.setdefault((n, k, dt), []).append(rows)
        self._grids = {shape: sorted(rows) for shape, rows in grids.items()}
        self._tables: dict[tuple, tuple[bool, ...]] = {}

    @classmethod
    def from_costs(cls, costs: Mapping[CostKey, float], mode: str | None = None,
                   margin: float = MARGIN) -> "LinearChoice":
        """A choice from given costs ``{(kernel, N, K, dtype_name, rows): seconds}``; ``mode``
        None reads ``$MTP_EXT_LINEAR_KERNEL``."""
        return cls(costs, kernel_mode() if mode is None else mode, margin)

    @classmethod
    def fixed(cls, kernel: str) -> "LinearChoice":
        """A choice that measures nothing: ``"torch"`` everywhere, or ``"ours"`` at 2..max_rows."""
        return cls({}, kernel)

    @classmethod
    def measured(cls, shapes: Iterable[tuple[int, int]], dtypes=("float32",), rows=ROWS,
                 mode: str | None = None) -> "LinearChoice":
        """Measures now (nothing cached) and chooses: see :func:`measure`."""
        entries = [_measure_entry(n, k, _dtype_name(dt), tuple(rows))
                   for n, k in shapes for dt in dtypes]
        return _choice_from_entries(entries, kernel_mode() if mode is None else mode)

    # -- queries --------------------------------------------------------------------------------

    def costs(self) -> dict[CostKey, float]:
        """A copy of the costs ``{(kernel, N, K, dtype_name, rows): seconds}``."""
        return dict(self._costs)

    def shapes(self) -> list[tuple[int, int, str]]:
        """``(N, K, dtype_name)`` of every measured shape, sorted."""
        return sorted(self._grids)

    def _legacy(self, rows: int, max_rows: int) -> bool:
        return 2 <= rows <= max_rows

    def use_ours(self, n: int, k: int, dtype, rows: int, max_rows: int = MAX_ROWS) -> bool:
        """Whether ``x[rows, K] @ weight[N, K].T`` with a ``dtype`` weight (``torch.dtype`` or its
        name) goes through ours; never above ``max_rows`` rows."""
        if self.mode == "torch" or rows < 1 or rows > max_rows:
            return False
        if self.mode == "ours":
            return self._legacy(rows, max_rows)
        dt = _dtype_name(dtype)
        if dt not in DTYPES:
            return False
        grid = self._grids.get((n, k, dt))
        if grid is None:  # not measured: the routing of before
            return self._legacy(rows, max_rows)
        if rows > MAX_ROWS or rows > grid[-1]:
            return False
        up = next(g for g in grid if g >= rows)
        return self._choices[(n, k, dt, up)] == "ours"

    def rows_table(self, n: int, k: int, dtype, max_rows: int = MAX_ROWS) -> tuple[bool, ...]:
        """``table[rows]`` = :meth:`use_ours` for ``rows`` in ``0..max_rows`` (``max_rows + 1``
        bools; index 0 is False): what a layer indexes per call."""
        key = (n, k, _dtype_name(dtype), max_rows)
        table = self._tables.get(key)
        if table is None:
            table = tuple(self.use_ours(n, k, dtype, r, max_rows) for r in range(max_rows + 1))
            self._tables[key] = table
        return table

    def table(self) -> list[dict]:
        """One dict per measured ``(N, K, dtype)``: ``n``, ``k``, ``dtype``, ``rows`` (the grid),
        ``torch_s`` and ``ours_s`` (median seconds per call; None where not measured),
        ``ratio`` (ours / torch), ``choice`` (per grid point), ``ours_rows`` (every row count
        ``1..64`` that goes through ours under this choice's mode) and ``seconds`` (how long its
        measurement took, where known)."""
        out = []
        for n, k, dt in self.shapes():
            grid = self._grids[(n, k, dt)]
            t = [self._costs.get(("torch", n, k, dt, r)) for r in grid]
            o = [self._costs.get(("ours", n, k, dt, r)) for r in grid]
            out.append({
                "n": n, "k": k, "dtype": dt, "rows": grid, "torch_s": t, "ours_s": o,
                "ratio": [b / a if a and b else None for a, b in zip(t, o)],
                "choice": [self._choices[(n, k, dt, r)] for r in grid],
                "ours_rows": [r for r in range(1, MAX_ROWS + 1) if self.use_ours(n, k, dt, r)],
                "seconds": self._seconds.get((n, k, dt)),
            })
        return out

    def __repr__(self) -> str:
        return f"LinearChoice(mode={self.mode!r}, shapes={len(self._grids)})"


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> int | None:
    """Bytes of a sysfs cache size such as ``"32768K"``."""
    text = str(text).strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(float(text.rstrip("KMGB")) * scale)
    except ValueError:
        return None


def l3_bytes() -> int:
    """The L3 size from :func:`mtp_ext.machine.cpu_facts` (32 MiB where unknown)."""
    size = _parse_size(cpu_facts().get("caches", {}).get("L3", ""))
    return size if size else DEFAULT_L3_BYTES


def _copies(nbytes: int, l3: int) -> int:
    """How many copies of a weight of ``nbytes`` one rotation streams."""
    want = math.ceil(2 * l3 / max(nbytes, 1)) if nbytes <= 2 * l3 else 1
    return max(1, min(want, MAX_COPIES, MAX_BYTES // max(nbytes, 1)))


def _agree(a: torch.Tensor, b: torch.Tensor, dt: str) -> bool:
    tol = TOLERANCES[dt]
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))


@torch.inference_mode()
def _measure_entry(n: int, k: int, dt: str, rows=ROWS, l3: int | None = None) -> dict:
    """Times both kernels for a weight ``[n, k]`` of dtype ``dt`` at each row count; returns the
    cache entry ``{n, k, dtype, rows, torch_s, ours_s, copies, seconds}`` (``ours_s[i]`` None
    where ours failed or disagreed with torch)."""
    start = time.perf_counter()
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(n * 7919 + k)
    base = (torch.randn(n, k, generator=gen) * max(k, 1) ** -0.5).to(dtype)
    nbytes = base.numel() * base.element_size()
    copies = _copies(nbytes, l3 or l3_bytes())
    weights = [base] + [base.clone() for _ in range(copies - 1)]
    reps = REPS if nbytes * 2 < (l3 or l3_bytes()) else BIG_REPS
    warm = base[: min(n, 256)]  # warms code paths and threads without touching the copies
    ours_fn = ops.small_batch_linear
    torch_s, ours_s = [], []
    bad = []
    for r in rows:
        x = torch.randn(r, k, generator=gen).to(dtype)
        expected = F.linear(x, base)
        try:
            ok = _agree(ours_fn(x, base), expected, dt)
        except RuntimeError:
            ok = False
        if not ok:
            bad.append(r)
        kernels = [("torch", F.linear)] + ([("ours", ours_fn)] if ok else [])
        times: dict[str, list[float]] = {name: [] for name, _ in kernels}
        for name, fn in kernels:
            fn(x, warm)
            fn(x, warm)
        for rep in range(reps):
            if rep and time.perf_counter() - start > ENTRY_BUDGET_S:
                break
            order = kernels if rep % 2 == 0 else kernels[::-1]
            for name, fn in order:
                t0 = time.perf_counter()
                for w in weights:
                    fn(x, w)
                times[name].append((time.perf_counter() - t0) / copies)
        torch_s.append(statistics.median(times["torch"]))
        ours_s.append(statistics.median(times["ours"]) if ok else None)
    if bad:
        warn_once(f"linear_choice:disagree:{n}x{k}:{dt}",
                  f"mtp_ext: small_batch_linear disagrees with F.linear (or fails) for a {dt} "
                  f"weight [{n}, {k}] at rows {bad}; torch is used there")
    return {"n": n, "k": k, "dtype": dt, "rows": list(rows), "torch_s": torch_s, "ours_s": ours_s,
            "copies": copies, "seconds": time.perf_counter() - start}


def measure(shapes: Iterable[tuple[int, int]], dtypes=("float32", "bfloat16"), rows=ROWS,
            progress: bool = False) -> dict[CostKey, float]:
    """Times ``F.linear`` and ``ops.small_batch_linear`` (uncached) for each weight shape
    ``(N, K)`` and dtype (``torch.dtype`` or name) at each row count: the median seconds per call
    with weights streamed from memory. Returns ``{(kernel, N, K, dtype_name, rows): seconds}``
    (no ``"ours"`` key where ours failed or disagreed with torch)."""
    costs: dict[CostKey, float] = {}
    for n, k in shapes:
        for dt in dtypes:
            entry = _measure_entry(int(n), int(k), _dtype_name(dt), tuple(rows))
            if progress:
                print(f"  {n}x{k} {entry['dtype']}: {entry['seconds']:.2f} s", file=sys.stderr)
            costs.update(_entry_costs(entry))
    return costs


# ------------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------------


def _entry_key(n: int, k: int, dt: str) -> str:
    return f"{n}x{k}:{dt}"


def _entry_costs(entry: dict) -> dict[CostKey, float]:
    n, k, dt = entry["n"], entry["k"], entry["dtype"]
    costs: dict[CostKey, float] = {}
    for r, t, o in zip(entry["rows"], entry["torch_s"], entry["ours_s"]):
        costs[("torch", n, k, dt, r)] = t
        if o is not None:
            costs[("ours", n, k, dt, r)] = o
    return costs


def _choice_from_entries(entries: Iterable[dict], mode: str) -> LinearChoice:
    costs: dict[CostKey, float] = {}
    seconds = {}
    for e in entries:
        costs.update(_entry_costs(e))
        seconds[(e["n"], e["k"], e["dtype"])] = e.get("seconds")
    return LinearChoice(costs, mode, seconds=seconds)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _valid_entry(key: str, e) -> bool:
    try:
        return (
            isinstance(e, dict) and isinstance(e["n"], int) and isinstance(e["k"], int)
            and e["n"] > 0 and e["k"] > 0 and e["dtype"] in DTYPES
            and key == _entry_key(e["n"], e["k"], e["dtype"]) and e["rows"] == list(ROWS)
            and len(e["torch_s"]) == len(ROWS) and len(e["ours_s"]) == len(ROWS)
            and all(_positive(t) for t in e["torch_s"])
            and all(o is None or _positive(o) for o in e["ours_s"])
        )
    except (KeyError, TypeError):
        return False


def cache_path(key: str | None = None) -> Path:
    """``<cache folder>/linear_choice/<key>.json``, ``key`` defaulting to this machine's
    :func:`~mtp_ext.machine.cpu_key`."""
    return cache_dir() / "linear_choice" / f"{key or cpu_key()}.json"


def _read(path: Path) -> dict[str, dict]:
    """The valid entries of the file at ``path``; {} where it is missing, unreadable or damaged
    (a damaged entry alone is dropped: it is measured again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {key: e for key, e in entries.items() if _valid_entry(key, e)}


# What this process knows per cache file path (read, measured, or kept because it could not be
# written): a second model or call measures nothing and reads nothing again.
_TABLES: dict[str, dict[str, dict]] = {}


def _save(path: Path, entries: dict[str, dict]) -> None:
    """Writes ``entries`` (merged over what another process saved meanwhile) at ``path``; where
    that fails they stay in this process's table, with one warning."""
    remove_stale_temps(path.parent)
    merged = {**_read(path), **entries}
    text = json.dumps({"format": FORMAT, "key": path.stem, "machine": describe_cpu(),
                       "facts": cpu_facts(), "margin": MARGIN, "entries": merged}, indent=1)
    try:
        write_file(path, lambda tmp: tmp.write_text(text))
    except OSError as err:
        warn_once(f"linear_choice:{path}", f"mtp_ext: the linear kernel choice could not be saved "
                  f"in {path.parent} ({err}); it is kept for this process only")


def _known(path: Path) -> dict[str, dict]:
    table = _TABLES.get(str(path))
    if table is None:
        table = _TABLES[str(path)] = _read(path)
    return table


def cached_choice(mode: str | None = None) -> LinearChoice | None:
    """This machine's choice as cached (file or this process), measuring nothing; None where
    nothing was measured yet."""
    entries = _known(cache_path())
    if not entries:
        return None
    return _choice_from_entries(entries.values(), kernel_mode() if mode is None else mode)


def choice_for_shapes(wanted: Iterable[tuple[int, int, object]], refresh: bool = False,
                      progress: bool = False, mode: str | None = None) -> LinearChoice:
    """This machine's choice covering every ``(N, K, dtype)`` of ``wanted`` (dtype a
    ``torch.dtype`` or name; dtypes other than float32 / bfloat16 / float16 are skipped): read
    from the cache, the missing ones (all of them with ``refresh``) measured and added. Under a
    forced ``mode`` (None: ``$MTP_EXT_LINEAR_KERNEL``), ``torch`` or ``ours``, nothing is
    measured."""
    mode = kernel_mode() if mode is None else mode
    if mode != "auto":
        return LinearChoice.fixed(mode)
    path = cache_path()
    known = _known(path)
    todo = sorted({(int(n), int(k), _dtype_name(dt)) for n, k, dt in wanted
                   if _dtype_name(dt) in DTYPES})
    if not refresh:
        todo = [s for s in todo if _entry_key(*s) not in known]
    if todo:
        start = time.perf_counter()
        print(f"mtp_ext: timing the linear kernels for {len(todo)} weight shape(s) and dtype(s) "
              f"(once per machine; cached in {path.parent})", file=sys.stderr, flush=True)
        for n, k, dt in todo:
            entry = _measure_entry(n, k, dt)
            known[_entry_key(n, k, dt)] = entry
            if progress:
                print(f"  {n}x{k} {dt}: {entry['seconds']:.2f} s", file=sys.stderr, flush=True)
        if progress:
            print(f"  total {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        _save(path, known)
    return _choice_from_entries(known.values(), mode)


def choice_for_model(model: nn.Module, refresh: bool = False) -> LinearChoice:
    """The choice for the ``nn.Linear`` layers of ``model`` whose weights are on the CPU, at
    their dtypes: cached per machine, shapes not seen before measured once (about 6 to 7 s for
    SmolLM2-135M at 2 threads) and added."""
    wanted = {(m.out_features, m.in_features, m.weight.dtype) for m in model.modules()
              if isinstance(m, nn.Linear) and m.weight.device.type == "cpu"}
    return choice_for_shapes(wanted, refresh)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _ranges(rows: list[int]) -> str:
    """``[1, 2, 3, 7, 8]`` -> ``"1-3, 7-8"``; ``"-"`` when empty."""
    out, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out) or "-"


def describe(choice: LinearChoice) -> str:
    """Lines for ``mtp-ext info``: per weight shape and dtype the row counts that go through ours
    (the rest, and every count above 64, go through torch) and the measured time ratio ours / torch
    at each grid row count."""
    head = (f"linear kernel per row count ({ENV_VAR}={choice.mode}; ours = small_batch_linear, "
            f"chosen where >= {choice.margin:.0%} faster; above {MAX_ROWS} rows torch)")
    if choice.mode != "auto":
        rule = "ours at 2..max_rows rows" if choice.mode == "ours" else "torch at every row count"
        head += f"\n  forced by {ENV_VAR}: {rule}"
        if not choice.shapes():
            return head
    rows_head = "".join(f"{r:>6}" for r in ROWS)
    lines = [head, "  time of ours / torch per call at each row count; 'ours at': the row counts "
                   "that take ours", f"  {'N x K':<11} {'dtype':<9}{rows_head}  ours at"]
    for t in choice.table():
        by_row = dict(zip(t["rows"], t["ratio"]))
        ratios = "".join(f"{by_row[r]:>6.2f}" if by_row.get(r) else f"{'-':>6}" for r in ROWS)
        took = f"  ({t['seconds']:.1f} s)" if t.get("seconds") else ""
        lines.append(f"  {t['n']}x{t['k']:<{10 - len(str(t['n']))}} {t['dtype']:<9}{ratios}  "
                     f"{_ranges(t['ours_rows'])}{took}")
    return "\n".join(lines)
