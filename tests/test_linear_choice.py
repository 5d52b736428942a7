"""mtp_ext.linear_choice and SmallBatchLinear's routing by it.

The choice logic on injected costs of two kinds of machine (an EPYC-like one where ours wins at
every row count from 2, a Xeon-like one where torch wins float32 from 8 rows and bfloat16 from 4),
the 3 % hysteresis, row counts between grid points and above 64, the environment override, the
cache file (round trip, a damaged file, a folder that cannot be written), one real measurement on
tiny shapes, and SmallBatchLinear sending exactly the rows the table says through the kernel.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mtp_ext
from mtp_ext import cpu_linear, linear_choice as lc, ops
from mtp_ext.cpu_linear import SmallBatchLinear
from mtp_ext.linear_choice import ROWS, LinearChoice, choose, describe

SHAPES = [(576, 576), (49152, 576)]


def costs_from(fn, shapes=SHAPES, dtypes=("float32", "bfloat16")):
    """``{(kernel, N, K, dtype, rows): seconds}`` with ``fn(kernel, dtype, rows)`` a time
    relative to the weight's size."""
    out = {}
    for n, k in shapes:
        for dt in dtypes:
            for r in ROWS:
                for kernel in ("torch", "ours"):
                    out[(kernel, n, k, dt, r)] = n * k * 1e-9 * fn(kernel, dt, r)
    return out


def epyc(kernel, dtype, rows):
    # torch: one row at the weight stream's cost, 2+ rows about twice that; ours: the stream's
    # cost up to 64 rows, a little slower than torch at one row.
    if kernel == "torch":
        return 1.0 if rows == 1 else 2.0 + 0.01 * rows
    return 1.1 if rows == 1 else 1.0 + 0.005 * rows


def xeon(kernel, dtype, rows):
    if dtype == "float32":  # torch wins from 8 rows (AMX-less, but a good small-M GEMM)
        if kernel == "torch":
            return 1.0 if rows == 1 else (2.0 if rows < 8 else 1.2 + 0.005 * rows)
        return 1.05 if rows == 1 else 1.4 + 0.005 * rows
    # bfloat16 (AMX / AVX512-BF16): torch at 8 rows costs about its 1-row time, ours 2x; at 2 rows
    # torch is 2x slower than ours.
    if kernel == "torch":
        return {1: 1.0, 2: 2.0, 3: 2.0}.get(rows, 1.0 + 0.001 * rows)
    return {1: 1.2, 2: 1.0, 3: 1.1}.get(rows, 2.0)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    """Auto mode, a fresh cache folder and no table remembered from another test."""
    monkeypatch.delenv(lc.ENV_VAR, raising=False)
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lc, "_TABLES", {})


def ours_rows(choice, n, k, dt, upto=80):
    return [r for r in range(1, upto + 1) if choice.use_ours(n, k, dt, r, max_rows=upto)]


def test_epyc_like_costs_choose_ours_from_two_rows():
    choice = LinearChoice.from_costs(costs_from(epyc))
    for n, k in SHAPES:
        for dt in ("float32", torch.bfloat16):
            assert ours_rows(choice, n, k, dt) == list(range(2, 65))
            assert choice.rows_table(n, k, dt) == tuple(2 <= r <= 64 for r in range(65))


def test_xeon_like_costs_choose_torch_where_it_wins():
    choice = LinearChoice.from_costs(costs_from(xeon))
    for n, k in SHAPES:
        assert ours_rows(choice, n, k, torch.float32) == list(range(2, 7))  # 7 takes 8's choice
        assert ours_rows(choice, n, k, torch.bfloat16) == [2, 3]
    assert not choice.use_ours(576, 576, "bfloat16", 8)
    assert choice.use_ours(576, 576, "bfloat16", 2)
    (row,) = [t for t in choice.table() if (t["n"], t["dtype"]) == (576, "bfloat16")]
    assert row["rows"] == list(ROWS)
    assert row["ratio"][ROWS.index(8)] == pytest.approx(2.0 / 1.008)
    assert row["ratio"][ROWS.index(2)] == pytest.approx(0.5)
    assert row["choice"][:3] == ["torch", "ours", "ours"]


def test_one_row_goes_to_ours_where_it_measured_faster():
    costs = costs_from(lambda kernel, dt, r: 0.5 if kernel == "ours" else 1.0)
    choice = LinearChoice.from_costs(costs)
    assert ours_rows(choice, 576, 576, "float32") == list(range(1, 65))


def test_hysteresis_keeps_torch_unless_ours_is_3_percent_faster():
    for ratio, expected in [(0.98, "torch"), (0.975, "torch"), (0.969, "ours"), (0.9, "ours"),
                            (1.0, "torch"), (1.5, "torch")]:
        costs = {("torch", 8, 8, "float32", 4): 1.0, ("ours", 8, 8, "float32", 4): ratio}
        assert choose(costs) == {(8, 8, "float32", 4): expected}, ratio
    # ours without a cost (it failed or disagreed) or with None: torch
    assert choose({("torch", 8, 8, "float32", 4): 1.0}) == {(8, 8, "float32", 4): "torch"}
    assert choose({("torch", 8, 8, "float32", 4): 1.0, ("ours", 8, 8, "float32", 4): None}) == {
        (8, 8, "float32", 4): "torch"}
    assert choose({("torch", 8, 8, "float32", 4): 1.0, ("ours", 8, 8, "float32", 4): 0.98},
                  margin=0.01) == {(8, 8, "float32", 4): "ours"}


def test_rows_between_grid_points_take_the_next_point_up_and_above_64_torch():
    # ours wins only at the grid points 6, 12 and 64
    costs = costs_from(lambda kernel, dt, r: 0.5 if kernel == "ours" and r in (6, 12, 64) else 1.0,
                       shapes=[(64, 32)], dtypes=("float32",))
    choice = LinearChoice.from_costs(costs)
    assert ours_rows(choice, 64, 32, "float32", upto=200) == [5, 6, 9, 10, 11, 12] + list(
        range(49, 65))
    table = choice.rows_table(64, 32, torch.float32, max_rows=100)
    assert len(table) == 101 and not table[0] and not any(table[65:])
    # max_rows below 64 cuts the table
    assert choice.rows_table(64, 32, torch.float32, max_rows=8) == tuple(
        r in (5, 6) for r in range(9))


def test_unmeasured_shapes_and_dtypes():
    choice = LinearChoice.from_costs(costs_from(xeon))
    # a shape without costs keeps the routing of before; float64 always torch
    assert ours_rows(choice, 7, 9, "float32", upto=64) == list(range(2, 65))
    assert ours_rows(choice, 576, 576, torch.float64) == []
    assert ours_rows(LinearChoice.fixed("torch"), 576, 576, "float32") == []
    assert ours_rows(LinearChoice.fixed("ours"), 576, 576, "float32", upto=100) == list(
        range(2, 101))


def test_environment_forces_a_kernel(monkeypatch):
    costs = costs_from(epyc)
    monkeypatch.setenv(lc.ENV_VAR, "torch")
    assert ours_rows(LinearChoice.from_costs(costs), 576, 576, "float32") == []
    monkeypatch.setenv(lc.ENV_VAR, "ours")
    assert ours_rows(LinearChoice.from_costs(costs_from(xeon)), 576, 576, "bfloat16",
                     upto=64) == list(range(2, 65))
    monkeypatch.setenv(lc.ENV_VAR, "AUTO")
    assert lc.kernel_mode() == "auto"
    monkeypatch.setenv(lc.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=lc.ENV_VAR):
        lc.kernel_mode()
    # forced: nothing is measured
    monkeypatch.setenv(lc.ENV_VAR, "torch")
    monkeypatch.setattr(lc, "_measure_entry", lambda *a, **k: pytest.fail("measured"))
    choice = lc.choice_for_model(nn.Linear(32, 64))
    assert choice.mode == "torch" and choice.rows_table(64, 32, torch.float32) == (False,) * 65
    assert "forced" in describe(choice)


# ------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_measure(monkeypatch):
    """Replaces the timing by the Xeon-like costs; returns the list of measured shapes."""
    calls = []

    def fake(n, k, dt, rows=ROWS, l3=None):
        calls.append((n, k, dt))
        return {"n": n, "k": k, "dtype": dt, "rows": list(rows),
                "torch_s": [n * k * 1e-9 * xeon("torch", dt, r) for r in rows],
                "ours_s": [n * k * 1e-9 * xeon("ours", dt, r) for r in rows],
                "copies": 1, "seconds": 0.01}

    monkeypatch.setattr(lc, "_measure_entry", fake)
    return calls


def test_cache_round_trip(fake_measure, monkeypatch, tmp_path):
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 16), nn.Linear(32, 64))
    choice = lc.choice_for_model(model)
    assert sorted(fake_measure) == [(16, 64, "float32"), (64, 32, "float32")]
    path = lc.cache_path()
    assert path.parent == tmp_path / "cache" / "linear_choice"
    assert path.name == f"{mtp_ext.machine.cpu_key()}.json"
    data = json.loads(path.read_text())
    assert set(data["entries"]) == {"64x32:float32", "16x64:float32"}
    assert data["machine"] == mtp_ext.machine.describe_cpu()
    # a new process (no table in memory) reads it back and measures nothing
    monkeypatch.setattr(lc, "_TABLES", {})
    again = lc.choice_for_model(model)
    assert len(fake_measure) == 2
    assert again.table() == choice.table()
    assert ours_rows(again, 64, 32, "float32") == list(range(2, 7))
    # a new shape and dtype are measured on first use and added to the same file
    lc.choice_for_model(nn.Linear(32, 64).to(torch.bfloat16))
    assert fake_measure[-1] == (64, 32, "bfloat16") and len(fake_measure) == 3
    assert set(json.loads(path.read_text())["entries"]) == {
        "64x32:float32", "16x64:float32", "64x32:bfloat16"}
    assert lc.cached_choice().shapes() == [(16, 64, "float32"), (64, 32, "bfloat16"),
                                           (64, 32, "float32")]
    text = describe(lc.cached_choice())
    assert "64x32" in text and "2-3" in text and "2-6" in text  # bf16 ours at 2-3, f32 at 2-6
    # refresh measures again
    lc.choice_for_shapes([(64, 32, "float32")], refresh=True)
    assert len(fake_measure) == 4


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_entry", "wrong_format"])
def test_damaged_cache_file_is_measured_again(fake_measure, monkeypatch, damage):
    lc.choice_for_shapes([(64, 32, "float32"), (16, 64, "float32")])
    path = lc.cache_path()
    text = path.read_text()
    data = json.loads(text)
    if damage == "garbage":
        path.write_bytes(b"\xff\x00not json")
    elif damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "bad_entry":
        data["entries"]["64x32:float32"]["torch_s"][3] = -1.0
        path.write_text(json.dumps(data))
    else:
        data["format"] = 999
        path.write_text(json.dumps(data))
    monkeypatch.setattr(lc, "_TABLES", {})
    fake_measure.clear()
    choice = lc.choice_for_shapes([(64, 32, "float32"), (16, 64, "float32")])
    expected = [(64, 32, "float32")] if damage == "bad_entry" else [(16, 64, "float32"),
                                                                    (64, 32, "float32")]
    assert sorted(fake_measure) == sorted(expected)
    assert ours_rows(choice, 64, 32, "float32") == list(range(2, 7))
    assert set(lc._read(path)) == {"64x32:float32", "16x64:float32"}  # repaired


def test_cache_that_cannot_be_written_is_kept_in_memory(fake_measure, monkeypatch, tmp_path,
                                                        capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MTP_EXT_CACHE", str(blocker / "cache"))  # under a file: never writable
    choice = lc.choice_for_shapes([(64, 32, "float32")])
    assert ours_rows(choice, 64, 32, "float32") == list(range(2, 7))
    lc.choice_for_shapes([(64, 32, "float32")])  # in memory: not measured again
    lc.choice_for_shapes([(16, 64, "float32")])  # a new shape: measured, still one warning
    assert fake_measure == [(64, 32, "float32"), (16, 64, "float32")]
    err = capsys.readouterr().err
    assert err.count("could not be saved") == 1
    assert lc.cached_choice().shapes() == [(16, 64, "float32"), (64, 32, "float32")]


# ------------------------------------------------------------------------------------------------
# A real measurement
# ------------------------------------------------------------------------------------------------


def test_copies_streamed_per_rotation():
    mib = 1 << 20
    assert lc._copies(576 * 576 * 4, 32 * mib) == 51  # > 64 MiB in all
    assert lc._copies(49152 * 576 * 4, 32 * mib) == 1  # larger than 2 x L3 alone
    assert lc._copies(49152 * 576 * 2, 32 * mib) == 2
    assert lc._copies(64 * 32 * 4, 32 * mib) == lc.MAX_COPIES
    assert lc._copies(100 * mib, 1024 * mib) == 5  # 512 MiB at most
    assert lc._parse_size("32768K") == 32 * mib and lc._parse_size("") is None
    assert lc.l3_bytes() > 0


@pytest.fixture
def one_thread():
    """One thread: a 2-thread parallel region waits for a core that other work may hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_real_measurement_on_tiny_shapes(one_thread):
    start = time.perf_counter()
    choice = LinearChoice.measured([(64, 32)], ("float32", "bfloat16"), mode="auto")
    took = time.perf_counter() - start
    assert took < 6.0
    costs = choice.costs()
    for dt in ("float32", "bfloat16"):
        for r in ROWS:
            for kernel in ("torch", "ours"):
                assert 0 < costs[(kernel, 64, 32, dt, r)] < 0.01
    (f32, bf16) = sorted(choice.table(), key=lambda t: t["dtype"] != "float32")
    assert f32["dtype"] == "float32" and all(x > 0 for x in f32["ratio"])
    assert len(choice.rows_table(64, 32, torch.float32)) == 65


def test_a_kernel_that_disagrees_is_never_chosen(monkeypatch, capsys, one_thread):
    real = ops.small_batch_linear

    def wrong_at_3_rows(x, weight, bias=None):
        y = real(x, weight, bias)
        return y + 1 if x.shape[0] == 3 else y

    monkeypatch.setattr(ops, "small_batch_linear", wrong_at_3_rows)
    entry = lc._measure_entry(16, 8, "float32", rows=(2, 3, 4))
    assert entry["ours_s"][1] is None and entry["ours_s"][0] > 0 and entry["ours_s"][2] > 0
    assert "disagrees" in capsys.readouterr().err
    choice = lc._choice_from_entries([entry], "auto")
    assert not choice.use_ours(16, 8, "float32", 3)


# ------------------------------------------------------------------------------------------------
# SmallBatchLinear / fast_cpu
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = ops.small_batch_linear

    def spying(x, weight, bias=None):
        calls.append((x.shape[0], tuple(weight.shape)))
        return real(x, weight, bias)

    monkeypatch.setattr(ops, "small_batch_linear", spying)
    return calls


def routed_costs():
    # (64, 32): ours up to 4 rows; (16, 64): ours from 6 rows; both float32
    def first(kernel, dt, r):
        return 0.5 if (kernel == "ours") == (r <= 4) else 1.0

    def second(kernel, dt, r):
        return 0.5 if (kernel == "ours") == (r >= 6) else 1.0

    return {**costs_from(first, [(64, 32)], ("float32",)),
            **costs_from(second, [(16, 64)], ("float32",))}


def test_small_batch_linear_routes_by_the_table(spy, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 16))
    choice = LinearChoice.from_costs(routed_costs())
    monkeypatch.setattr(cpu_linear, "choice_for_model", lambda m: pytest.fail("measured"))
    expected_routes = {1: [(1, (64, 32))], 2: [(2, (64, 32))], 4: [(4, (64, 32))],
                       5: [(5, (16, 64))], 8: [(8, (16, 64))], 64: [(64, (16, 64))], 65: []}
    with torch.inference_mode():
        for rows, route in expected_routes.items():
            x = torch.randn(rows, 32)
            stock = model(x)
            spy.clear()
            with mtp_ext.fast_cpu(model, choice=choice) as handle:
                assert handle.choice is choice
                got = model(x)
            assert spy == route, rows
            torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-5)
    # fast_cpu without a choice asks choice_for_model for this (CPU) model
    asked = []
    monkeypatch.setattr(cpu_linear, "choice_for_model", lambda m: asked.append(m) or choice)
    with mtp_ext.fast_cpu(model) as handle:
        assert asked == [model]
        assert model[0].use_ours_by_rows == choice.rows_table(64, 32, torch.float32)
        assert model[1].use_ours_by_rows[4:8] == (False, True, True, True)
    # leading dims count as rows; bfloat16 results match F.linear within bfloat16 rounding
    layer = SmallBatchLinear.from_linear(nn.Linear(32, 64).to(torch.bfloat16), 64,
                                         choice.rows_table(64, 32, "float32"))
    x = torch.randn(2, 2, 32, dtype=torch.bfloat16)
    spy.clear()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=2e-2, atol=2e-2)
    assert spy == [(4, (64, 32))]


def test_models_without_cpu_linears_measure_nothing(monkeypatch):
    monkeypatch.setattr(cpu_linear, "choice_for_model", lambda m: pytest.fail("measured"))
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(32, 64))
    with mtp_ext.fast_cpu(model) as handle:
        assert handle.choice is None and handle.num_swapped == 1
    with pytest.raises(ValueError, match="max_rows"):
        SmallBatchLinear.from_linear(nn.Linear(4, 4), 8, [True] * 4)


def test_forward_overhead_is_tiny():
    stock = nn.Linear(16, 16)
    fast = SmallBatchLinear.from_linear(stock, 64, [False] * 65)  # torch at every row count
    x = torch.randn(1, 16)

    def per_call(layer):
        best = float("inf")
        for _ in range(7):
            start = time.perf_counter()
            for _ in range(2000):
                layer(x)
            best = min(best, (time.perf_counter() - start) / 2000)
        return best

    with torch.inference_mode():
        per_call(stock), per_call(fast)
        overhead = per_call(fast) - per_call(stock)
    assert overhead < 4e-6, f"{overhead * 1e6:.2f} us per call"


def test_info_shows_the_cached_table_and_measures_only_when_asked(fake_measure):
    from mtp_ext.cli import info
    from mtp_ext.cli.parser import build_parser

    assert "not measured on this machine yet" in info.linear_choice_text()
    assert fake_measure == []
    text = info.info_text()
    assert f"CPU: {mtp_ext.machine.describe_cpu()}" in text and "not measured" in text
    assert fake_measure == []
    assert build_parser().parse_args(["info", "--measure-linear"]).measure_linear
    text = info.linear_choice_text(measure=True)
    assert sorted(fake_measure) == sorted(
        (n, k, dt) for n, k in lc.SMOLLM2_135M_SHAPES for dt in ("float32", "bfloat16"))
    line = next(s for s in text.splitlines() if s.strip().startswith("49152x576   bfloat16"))
    assert line.split()[2:4] == ["1.20", "0.50"] and line.endswith("2-3  (0.0 s)")
    assert info.linear_choice_text() == text  # now cached: shown without measuring
    assert len(fake_measure) == 10


def test_layers_torch_takes_at_every_row_count_are_not_wrapped():
    """No Python wrapper where it would only call F.linear: the plain steps then cost what
    model.generate's do."""
    from torch import nn

    from mtp_ext.cpu_linear import SmallBatchLinear, fast_cpu

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16))
    with fast_cpu(model, choice=lc.LinearChoice.fixed("torch")) as handle:
        assert handle.num_swapped == 0 and type(model[0]) is nn.Linear
    costs = {("torch", n, 8, "float32", r): 1.0 for n in (8, 16) for r in lc.ROWS}
    costs.update({("ours", 8, 8, "float32", r): 2.0 for r in lc.ROWS})  # torch wins: not wrapped
    costs.update({("ours", 16, 8, "float32", r): 0.5 for r in lc.ROWS})
    with fast_cpu(model, choice=lc.LinearChoice.from_costs(costs)) as handle:
        assert handle.num_swapped == 1
        assert type(model[0]) is nn.Linear and isinstance(model[1], SmallBatchLinear)
