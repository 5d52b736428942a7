"""Bootstrap intervals over text windows and the verdict rule (``mtp_ext.evaluation.intervals``)."""

from __future__ import annotations

import random

import pytest
import torch

from mtp_ext.evaluation.intervals import difference_interval, interval, verdict, with_intervals
from mtp_ext.evaluation.report import pivot
from mtp_ext.evaluation.tally import Key, Tally


def windows_of(rate: float, n: int, size: int = 128, spread: float = 0.0, seed: int = 0):
    """``[[hits, size], ...]`` of ``n`` windows whose own rates scatter around ``rate``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = min(max(rate + rng.gauss(0, spread), 0.0), 1.0)
        out.append([float(sum(rng.random() < r for _ in range(size))), size])
    return out


def test_interval_holds_the_pooled_value_and_narrows_with_more_windows():
    few, many = windows_of(0.4, 8, spread=0.1), windows_of(0.4, 64, spread=0.1, seed=1)
    for w in (few, many):
        value = sum(t for t, _ in w) / sum(c for _, c in w)
        lo, hi = interval(w)
        assert lo < value < hi
    assert interval(many)[1] - interval(many)[0] < interval(few)[1] - interval(few)[0]


def test_windows_that_differ_widen_the_interval_beyond_independent_positions():
    """Positions of one window move together: the same positions in windows with different rates
    give a wider interval than windows that agree."""
    alike = windows_of(0.4, 16, spread=0.0, seed=2)
    apart = windows_of(0.4, 16, spread=0.2, seed=2)
    assert interval(apart)[1] - interval(apart)[0] > 1.5 * (interval(alike)[1] - interval(alike)[0])


def test_interval_covers_the_truth_about_95_percent_of_the_time():
    covered = 0
    for seed in range(200):
        lo, hi = interval(windows_of(0.3, 16, size=64, spread=0.05, seed=seed), n_boot=400)
        covered += lo <= 0.3 <= hi
    assert 0.85 <= covered / 200 <= 1.0


def test_interval_edge_cases():
    assert interval([[3.0, 10], [0.0, 0]]) == (0.3, 0.3)  # one window with positions
    with pytest.raises(ValueError):
        interval([[0.0, 0]])
    with pytest.raises(ValueError):
        interval([[1.0, -1]])
    assert interval([[1.0, 4], [3.0, 4]], seed=5) == interval([[1.0, 4], [3.0, 4]], seed=5)


def test_paired_difference_sees_a_small_consistent_gain_that_unpaired_does_not():
    """Two methods on the same windows: B hits on every position A hits plus 2% more. Paired,
    the window-to-window variation cancels and the gain is clear; unpaired it is not."""
    rng = random.Random(3)
    a, b = [], []
    for _ in range(16):
        rate = rng.uniform(0.2, 0.7)  # windows differ a lot
        hits_a = sum(rng.random() < rate for _ in range(128))
        a.append([float(hits_a), 128])
        b.append([float(hits_a + 3), 128])
    d, lo, hi = difference_interval(b, a, paired=True)
    assert d == pytest.approx(3 * 16 / (128 * 16)) and lo > 0
    _, lo_u, hi_u = difference_interval(b, a, paired=False)
    assert lo_u < 0 < hi_u
    with pytest.raises(ValueError):
        difference_interval(b, a[:8], paired=True)


def test_difference_over_seeds_resamples_seeds_too():
    one = [windows_of(0.40, 16, seed=s) for s in range(3)]
    other = [windows_of(0.40 + 0.08 * (s - 1), 16, seed=10 + s) for s in range(3)]  # seeds disagree
    d, lo, hi = difference_interval(other, one, paired=False)
    assert lo < d < hi and lo < 0 < hi  # the seeds' spread keeps zero inside


@pytest.mark.parametrize("intervals, direction, want", [
    ({"a": (0.01, 0.05), "b": (0.02, 0.04), "c": (0.001, 0.03), "d": (-0.01, 0.02)}, 1, "confirmed"),
    ({"a": (0.01, 0.05), "b": (0.02, 0.04), "c": (-0.001, 0.03), "d": (-0.01, 0.02)}, 1,
     "not reproduced"),
    ({"a": (-0.05, -0.01), "b": (-0.04, -0.02), "c": (-0.03, -0.001), "d": (0.0, 0.1)}, 1,
     "contradicted"),
    ({"a": (-0.05, -0.01), "b": (-0.04, -0.02), "c": (-0.03, -0.001), "d": (0.0, 0.1)}, -1,
     "confirmed"),
    ({"a": (0.01, 0.05), "b": (0.02, 0.04), "c": (0.001, 0.03), "d": (0.0, 0.1)}, -1,
     "contradicted"),
])
def test_verdict_rule(intervals, direction, want):
    assert verdict(intervals, direction) == want


def test_verdict_bad_arguments():
    with pytest.raises(ValueError):
        verdict({"a": (0.0, 1.0)}, direction=0)
    with pytest.raises(ValueError):
        verdict({"a": (0.0, 1.0)}, need=0)


def test_tally_keeps_windows_aligned_across_metrics_and_reports_intervals():
    t = Tally()
    k1, k2 = Key("ntp", 1), Key("marginal", 2, k=4)
    for w in range(4):
        t.window = w
        t.add(k1, "top1_text", torch.tensor([1.0, 0.0, float(w % 2)]))
        if w != 2:  # no position of k2 in window 2
            t.add(k2, "top1_text", torch.tensor([float(w > 0)]))
    recs = {r["method"]: r for r in t.records(model="m", dataset="web", split="test")}
    assert recs["ntp"]["windows"] == [[1.0, 3], [2.0, 3], [1.0, 3], [2.0, 3]]
    assert recs["marginal"]["windows"] == [[0.0, 1], [1.0, 1], [0.0, 0], [1.0, 1]]
    assert recs["ntp"]["value"] == pytest.approx(6 / 12)
    out = with_intervals(list(recs.values()))
    assert all(r["lo"] <= r["value"] <= r["hi"] for r in out)
    table = pivot([r for r in out if r["method"] == "ntp"], ("dataset",), ("top1_text",), cost=False)
    r = out[[x["method"] for x in out].index("ntp")]
    assert f"0.500 [{r['lo']:.3f}, {r['hi']:.3f}]" in table


def _records(model="m", gains=None, w=8):
    """Synthetic records of a heads study on four datasets, every method on the same windows:
    ``gains[method]`` hits per window added to a shared base."""
    rng = random.Random(7)
    gains = gains or {}
    out = []
    specs = [("ntp", None, None, 1), ("ntp_joint", None, None, 1), ("marginal", 8, None, 2),
             ("marginal", 32, None, 2), ("head_frozen", None, 3, 2), ("head_frozen", None, 6, 2),
             ("head_frozen", None, 9, 2), ("head_whs", None, None, 2), ("head_joint+difflr", None, None, 2)]
    for ds in ("en-es", "web", "austen", "python"):
        base = [rng.randint(10, 60) for _ in range(w)]
        for method, k, layer, off in specs:
            g = gains.get((method, k, layer), 0)
            windows = [[float(b + g), 128] for b in base]
            hits = sum(x for x, _ in windows)
            out.append({"model": model, "dataset": ds, "split": "test", "method": method, "k": k,
                        "layer": layer, "offset": off, "metric": "top1_text",
                        "value": hits / (128 * w), "positions": 128 * w, "model_tokens": 1,
                        "windows": windows})
    return out


def test_judge_applies_the_rule_with_layers_by_role():
    from mtp_ext.evaluation.claims import judge

    recs = _records(gains={("marginal", 32, None): 10, ("head_frozen", None, 6): 2,
                           ("ntp_joint", None, None): -5, ("head_whs", None, None): 0})
    got = {j["claim"].split(":")[0]: j for j in judge(recs)}
    marg = got["heads on a frozen backbone underperform marginalization"]
    assert marg["a"] == {"method": "marginal", "k": 32} and marg["b"]["layer"] == 9
    assert marg["verdict"] == "confirmed" and marg["source"] == "abstract"
    assert all(d["difference"] == pytest.approx(10 / 128) for d in marg["datasets"].values())
    last = got["the last layer is specialized"]
    assert last["a"]["layer"] == 6 and last["verdict"] == "confirmed"  # layer before the last, fixed
    assert got["one shared learning rate hurts the backbone's NTP"]["verdict"] == "confirmed"
    assert got["WHS beats a head on the frozen last layer"]["verdict"] == "not reproduced"
    assert got["a gap to marginalization remains after WHS"]["verdict"] == "confirmed"


def test_judge_contradicted_and_missing_records():
    from mtp_ext.evaluation.claims import judge
    from mtp_ext.evaluation.report import markdown_tables

    recs = _records(gains={("head_whs", None, None): -4})
    got = {j["claim"]: j["verdict"] for j in judge(recs)}
    assert got["WHS beats a head on the frozen last layer"] == "contradicted"
    no_heads = [r for r in recs if not r["method"].startswith(("head_", "ntp_"))]
    assert judge(no_heads) == []  # nothing to compare without the heads study
    md = markdown_tables(recs)
    assert "### Verdicts" in md and "**contradicted**" in md and "abstract" in md
