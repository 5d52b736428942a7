"""The per-step tree and lookup controller (``mtp_ext.controller``): injected cost models of two
kinds of machine against injected streams of acceptance; no timing, no model."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from mtp_ext.controller import Controller, Plan


@dataclasses.dataclass
class Costs:
    """A cost model: ``forward(n)`` a verification step over n nodes, ``draft_ms`` the pool."""

    plain_ms: float
    draft_ms: float
    per_node: float  # extra ms per node beyond ``flat`` nodes
    flat: int
    base: float

    def step_ms(self, tree: int, lookup: int) -> float:
        if tree <= 1 and lookup <= 0:
            return self.plain_ms
        n = tree + lookup
        return self.base + self.per_node * max(0, n - self.flat) + (self.draft_ms if tree > 1 else 0)


# A server whose small-row kernels make 8 nodes cost one token (the committed EPYC figures) and
# one where 8 nodes cost 1.6x a plain step (the Xeon of the issue), drafting 10% / 15% of a step.
EPYC = Costs(plain_ms=30.0, draft_ms=3.0, per_node=0.6, flat=8, base=30.5)
XEON = Costs(plain_ms=30.0, draft_ms=4.5, per_node=2.6, flat=1, base=30.0)
# Drafting so expensive that no tree can pay.
HOPELESS = Costs(plain_ms=30.0, draft_ms=300.0, per_node=30.0, flat=1, base=30.0)


def pool(top: float, depth: int = 4, width: int = 4):
    """A ranked pool: at every depth the best child has probability ``top`` given its parent and
    the other ``width - 1`` share what is left; nodes in selection order (joint probability
    descending), root left out. Returns ``(probs, depths)``."""
    nodes = [(1.0, 0)]
    frontier = [1.0]
    for d in range(1, depth + 1):
        rest = (1 - top) / (width - 1)
        children = [p * q for p in frontier for q in [top] + [rest] * (width - 1)]
        nodes += [(c, d) for c in children]
        frontier = sorted(children, reverse=True)[:width]
    ranked = sorted(nodes[1:], key=lambda x: (-x[0], x[1]))
    return [p for p, _ in ranked], [d for _, d in ranked]


def accepted_depth(rng: random.Random, mass: list[float], truth: float) -> int:
    """Samples how deep a tree with per-depth mass ``mass`` is accepted when the true reach is
    ``truth`` times the heads' mass."""
    depth = 0
    for j in range(1, len(mass)):
        reach = min(1.0, truth * mass[j])
        prev = min(1.0, truth * mass[j - 1]) if j > 1 else 1.0
        if prev <= 0 or rng.random() >= reach / prev:
            break
        depth = j
    return depth


def run(costs: Costs, top: float, truth: float, steps: int = 300, lookup=None, seed: int = 0):
    """Drives a controller with a stream of pools of confidence ``top`` whose true acceptance is
    ``truth`` x the predicted; ``lookup(step) -> (available, matched)`` or None. Returns the plans
    and the controller."""
    rng = random.Random(seed)
    probs, depths = pool(top)
    ctl = Controller(costs, max_lookup=16 if lookup else 0, max_depth=4)
    plans = []
    for s in range(steps):
        available, matched = lookup(s) if lookup else (0, 0)
        plan = ctl.plan([available])
        masses = None
        if plan.draft:
            plan2, row_masses = ctl.choose([probs], [depths], [available], probe=plan.probe)
            plan = Plan(True, plan2.tree, plan2.lookup, plan2.rate, plan.probe)
            masses = [row_masses[0][plan.tree]] if plan.tree > 1 else None
        acc = accepted_depth(rng, masses[0], truth) if masses else 0
        emitted = max(acc, min(matched, plan.lookup)) + 1
        ctl.observe(drafted=plan.draft, tree=plan.tree, masses=masses, tree_accepted=[acc],
                    lookup_matched=[min(matched, emitted)], lookup_known=[min(available, emitted)],
                    probe=plan.probe)
        plans.append(plan)
    return plans, ctl


def test_pool_helper_is_ranked():
    probs, depths = pool(0.8)
    assert probs == sorted(probs, reverse=True)
    assert depths[0] == 1 and abs(probs[0] - 0.8) < 1e-12


def test_masses_per_size():
    ctl = Controller(EPYC, sizes=(1, 2, 4), max_depth=3)
    m = ctl.masses([0.5, 0.3, 0.2, 0.1], [1, 2, 1, 3])
    assert m[1] == [0.0, 0.0, 0.0, 0.0]
    assert m[2] == [0.0, 0.5, 0.0, 0.0]
    # size 4 holds 3 nodes: 0.5 (d1), 0.3 (d2), 0.2 (d1)
    assert m[4] == pytest.approx([0.0, 0.7, 0.3, 0.0])


def test_expected_tokens_combines_tree_and_lookup_per_depth():
    ctl = Controller(EPYC, max_lookup=4, max_depth=2)
    q = [1.0, 0.5, 0.25, 0.125, 0.0625]
    # tree reaches depth 1 w.p. 0.6 and depth 2 w.p. 0.3; lookup 2 tokens
    e = ctl.expected([1.0, 0.6, 0.3], 2, 4, q)
    assert e == pytest.approx((1 - 0.4 * 0.5) + (1 - 0.7 * 0.75))
    # without lookup: the tree's reach probabilities summed
    assert ctl.expected([1.0, 0.6, 0.3], 0, 4, q) == pytest.approx(0.9)
    # lookup limited by what the match offers
    assert ctl.expected([1.0, 0.0, 0.0], 4, 1, q) == pytest.approx(0.5)


def test_first_plan_drafts_to_learn():
    ctl = Controller(XEON)
    plan = ctl.plan([0])
    assert plan.draft and plan.probe


def test_confident_heads_grow_trees_where_nodes_are_cheap():
    plans, _ = run(EPYC, top=0.85, truth=1.0)
    late = plans[50:]
    assert all(p.draft for p in late)
    sizes = sorted(p.tree for p in late)
    assert sizes[len(sizes) // 2] >= 6, sizes


def test_the_same_heads_get_smaller_trees_where_nodes_cost():
    epyc, _ = run(EPYC, top=0.85, truth=1.0)
    xeon, _ = run(XEON, top=0.85, truth=1.0)
    med = lambda plans: sorted(p.tree for p in plans[50:])[125]  # noqa: E731
    assert med(xeon) < med(epyc)
    assert med(xeon) >= 2  # still worth a tree


def test_weak_heads_on_a_costly_machine_decode_plainly_and_probe_rarely():
    plans, ctl = run(XEON, top=0.3, truth=0.6, steps=400)
    late = plans[100:]
    drafted = [p for p in late if p.draft]
    assert all(p.probe for p in drafted)  # every draft after the start is a re-check
    assert len(drafted) <= len(late) // 16  # backing off to one re-check in 64 steps
    assert ctl.probe == Controller.PROBE_MAX
    assert all(p.tree == 1 and p.lookup == 0 for p in late if not p.draft)


def test_weak_heads_still_pay_where_trees_cost_almost_nothing():
    cheap = Costs(plain_ms=30.0, draft_ms=0.5, per_node=0.1, flat=8, base=30.0)
    plans, _ = run(cheap, top=0.3, truth=1.0, steps=200)
    assert sum(p.draft and not p.probe for p in plans[50:]) > 100


def test_hopeless_costs_never_draft_except_probes():
    plans, _ = run(HOPELESS, top=0.9, truth=1.0, steps=300)
    drafted = [i for i, p in enumerate(plans) if p.draft]
    assert all(plans[i].probe for i in drafted)
    # probes at 0 then intervals doubling 4, 8, 16, 32, 64, 64, ...
    assert len(drafted) <= 10


def test_calibration_learns_overconfident_heads():
    _, ctl = run(EPYC, top=0.85, truth=0.5, steps=400)
    c = ctl.calibration()
    assert 0.35 < c[1] < 0.65, c


def test_calibration_recovers_after_the_text_changes():
    rng = random.Random(1)
    probs, depths = pool(0.8)
    ctl = Controller(XEON, max_depth=4)
    for truth in (1.2, 0.2):
        for _ in range(150):
            plan = ctl.plan([0])
            if not plan.draft:
                ctl.observe(drafted=False, tree=1, masses=None, tree_accepted=[0],
                            lookup_matched=[0], lookup_known=[0])
                continue
            plan2, rm = ctl.choose([probs], [depths], [0], probe=plan.probe)
            t = plan2.tree
            masses = [rm[0][t]] if t > 1 else None
            acc = accepted_depth(rng, masses[0], truth) if masses else 0
            ctl.observe(drafted=True, tree=t, masses=masses, tree_accepted=[acc],
                        lookup_matched=[0], lookup_known=[0], probe=plan.probe)
        if truth > 1:
            assert ctl.calibration()[1] > 0.9
    assert ctl.calibration()[1] < 0.5


def test_lookup_length_grows_on_repetitive_text_and_stays_off_without_matches():
    plans, ctl = run(XEON, top=0.3, truth=0.6, steps=200, lookup=lambda s: (32, 12))
    late = plans[50:]
    assert sorted(p.lookup for p in late)[75] >= 8
    assert ctl.lookup_rates()[8] > 0.7
    plans, _ = run(XEON, top=0.3, truth=0.6, steps=100, lookup=lambda s: (0, 0))
    assert all(p.lookup == 0 for p in plans)


def test_lookup_that_never_matches_is_dropped():
    plans, ctl = run(XEON, top=0.3, truth=0.6, steps=200, lookup=lambda s: (16, 0))
    assert all(p.lookup == 0 for p in plans[30:])
    assert ctl.lookup_rates()[1] < 0.2


def test_batch_rows_share_one_plan_and_sum_their_tokens():
    ctl = Controller(EPYC, max_depth=4)
    probs, depths = pool(0.85)
    plan, masses = ctl.choose([probs, probs], [depths, depths], [0, 0])
    one = Controller(EPYC, max_depth=4)
    plan1, _ = one.choose([probs], [depths], [0])
    assert plan.tree == plan1.tree and plan.rate == pytest.approx(2 * plan1.rate)
    assert len(masses) == 2


def test_probe_forces_a_tree():
    # nodes so costly that, drafting already paid, the pool is still best left unused
    ctl = Controller(Costs(plain_ms=30.0, draft_ms=1.0, per_node=100.0, flat=1, base=30.0),
                     max_depth=4)
    probs, depths = pool(0.2)
    plan, _ = ctl.choose([probs], [depths], [0], probe=True)
    assert plan.tree >= 2
    plan, _ = ctl.choose([probs], [depths], [0], probe=False)
    assert plan.tree == 1


def test_pool_smaller_than_sizes_caps_the_tree():
    ctl = Controller(EPYC, max_depth=1)
    plan, _ = ctl.choose([[0.99, 0.99]], [[1, 1]], [0])
    assert plan.tree <= 3


def test_measured_step_times_correct_the_cost_model():
    """Costs measured on a busier machine (plain steps predicted 2x too slow) stop keeping trees
    from paying once the call's own step times come in."""
    ctl = Controller(XEON, max_depth=4)
    probs, depths = pool(0.5)
    before, _ = ctl.choose([probs], [depths], [0])
    for _ in range(30):
        ctl.observe_time(1, 0, False, 0.5 * XEON.plain_ms)  # plain steps take half the prediction
    assert ctl.time_scale["plain"] == pytest.approx(0.5, abs=0.02)
    assert ctl.time_scale["drafted"] == 1.0 and ctl.time_scale["lookup"] == 1.0
    after, _ = ctl.choose([probs], [depths], [0])
    assert before.tree > 1 and after.tree == 1  # plain is cheap now: the tree no longer pays


def test_step_time_ratio_is_clamped_and_skips_the_first_step():
    ctl = Controller(EPYC, max_depth=4)
    ctl.observe_time(4, 0, True, 1e6)  # first drafted step: not counted
    assert ctl.time_scale["drafted"] == 1.0
    ctl.observe_time(4, 0, True, 1e6)  # a pause of the process: at most 2x per step
    assert ctl.time_scale["drafted"] == pytest.approx(0.8 + 0.2 * 2.0)
    # drafted, then nothing used: predicted = plain + drafting
    ctl2 = Controller(EPYC, max_depth=4)
    for _ in range(20):
        ctl2.observe_time(1, 0, True, EPYC.plain_ms + EPYC.draft_ms)
    assert ctl2.time_scale["drafted"] == pytest.approx(1.0)


def test_rechecks_are_spaced_to_cost_at_most_the_budget():
    # a re-check (draft + 2 nodes) costs 7.1 ms more than a 30 ms plain step on XEON
    ctl = Controller(XEON, max_depth=4)
    floor = ctl.probe_floor()
    assert floor == math.ceil(7.1 / (Controller.PROBE_BUDGET * 30.0))
    plans, _ = run(HOPELESS, top=0.9, truth=1.0, steps=300)
    assert sum(p.draft for p in plans) == 1  # the first step only: a re-check would cost 11x


def test_a_prior_of_heads_that_do_not_pay_starts_with_plain_steps():
    """A call after one on which weak heads never paid plans its first step from that call's
    acceptance: plain, no draft to learn the heads."""
    _, first = run(XEON, top=0.3, truth=0.6, steps=200)
    prior = first.prior()
    ctl = Controller(XEON, max_lookup=0, max_depth=4)
    assert ctl.start_from(prior)
    plan = ctl.plan([0])
    assert not plan.draft and plan.tree == 1 and plan.lookup == 0
    # ... and re-checks the heads on the usual schedule
    gap = max(Controller.PROBE_FIRST, ctl.probe_floor())
    plans = []
    for _ in range(gap):
        plans.append(ctl.plan([0]))
        ctl.observe(drafted=False, tree=1, masses=None, tree_accepted=[0], lookup_matched=[0],
                    lookup_known=[0])
    assert [p.probe for p in plans] == [False] * (gap - 1) + [True]


def test_a_prior_of_heads_that_pay_drafts_from_the_first_step():
    _, first = run(EPYC, top=0.85, truth=1.0, steps=100)
    ctl = Controller(EPYC, max_lookup=0, max_depth=4)
    assert ctl.start_from(first.prior())
    plan = ctl.plan([0])
    assert plan.draft and not plan.probe and plan.tree > 1


def test_the_new_calls_own_steps_soon_outweigh_a_prior():
    _, first = run(EPYC, top=0.85, truth=0.5, steps=400)
    ctl = Controller(EPYC, max_lookup=0, max_depth=4)
    ctl.start_from(first.prior())
    assert ctl.calibration() == first.calibration() and ctl.calibration()[1] < 0.65
    # the new text's heads are exactly calibrated: a few dozen steps move c_1 most of the way
    rng = random.Random(1)
    probs, depths = pool(0.85)
    for _ in range(40):
        _, rm = ctl.choose([probs], [depths], [0])
        mass = rm[0][8]
        ctl.observe(drafted=True, tree=8, masses=[mass], tree_accepted=[accepted_depth(rng, mass, 1.0)],
                    lookup_matched=[0], lookup_known=[0])
    assert ctl.calibration()[1] > 0.8


def test_a_prior_for_other_sizes_or_none_is_ignored():
    _, first = run(EPYC, top=0.85, truth=1.0, steps=50)
    other = Controller(EPYC, sizes=(1, 2, 4), max_lookup=0, max_depth=4)
    assert not other.start_from(first.prior())
    assert other.plan([0]).probe  # still learns the heads first
    assert not other.start_from(None)
    assert Controller(EPYC).prior() is None  # nothing learned yet
