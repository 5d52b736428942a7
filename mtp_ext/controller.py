"""Choosing each step's tree size and prompt-lookup length while generating (``mtp_ext.controller``).

Each step, :class:`Controller` picks the size ``t`` of the dynamic draft tree (1: no tree) and the
length ``L`` of the prompt-lookup branch (0: none) that maximize the expected tokens per second

    rate(t, L) = sum over live rows of (1 + E[accepted | t, L]) / step_ms(t, L)

with ``step_ms`` from the machine's measured cost model (:class:`~mtp_ext.step_costs.StepCosts`,
or any object with ``step_ms(tree, lookup)``) and the acceptance estimated online, within the
generation, per depth:

- **Tree.** After the heads draft a candidate pool, the ``i``-th best node has a joint draft
  probability ``p_i`` (the product of the heads' probabilities along its path). If the heads were
  calibrated, the probability that the accepted path reaches depth ``j`` with the tree of size
  ``t`` would be the sum of ``p_i`` over its depth-``j`` nodes (the paths are disjoint events).
  They are not, so that mass is scaled by a factor ``c_j`` per depth: observed reaches over
  predicted mass, summed over recent steps with exponential forgetting (a prior of one pseudo-step
  at ``c_j = 1``). The size is chosen after drafting, on the pool's own probabilities (a confident
  step gets a bigger tree; drafting costs the same for every size).
- **Lookup.** The lookup branch's ``m``-th token is accepted with a probability ``r_m`` given the
  ``m - 1`` before it were; counts per position with forgetting, shrunk towards the rate pooled
  over positions. The counts are updated every step, also when no branch ran: the tokens a step
  emitted are the model's own targets, so how many lookup tokens would have matched is known.
- **Both.** A step accepts the longer of the tree's and the branch's accepted paths; the two are
  combined per depth as independent events.
- **Costs corrected while generating.** Each step's measured time, over what the cost model
  predicted, feeds a running ratio per kind of step (plain, lookup only, drafted) that scales the
  model: costs measured while the machine was busier, or at a shorter context, converge to this
  call's.
- **Whether to draft at all.** Before drafting, the tree's acceptance is predicted from a running
  mean of recent pools' masses per size and depth. When no tree pays, the step is plain (or
  lookup only): no drafting, no tree mask, no tree verification. A plain run re-checks the heads
  every ``probe`` steps (4 at first, doubling up to 64 while drafting keeps not paying), since
  acceptance changes with the text, but never so often that the re-checks cost more than
  ``PROBE_BUDGET`` (1.5%) of the run by the cost model (:meth:`Controller.probe_floor`).
- **Across calls.** The first call with a set of heads knows nothing of them, so its first step
  drafts to learn them. A later call starts from what the last one learned (:class:`Prior`:
  the pool masses, the acceptance counts, the time ratios), so on text where trees do not pay it
  starts plain, without that first draft (which costs about 2.5 plain steps, 2-4% of a short
  answer); the counts are forgetful sums, so the new text's own steps soon outweigh them.

Everything here is host arithmetic on a few dozen floats per row (tens of microseconds a step).
Tests inject cost models of different machines and streams of acceptance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, Sequence

__all__ = ["CostModel", "Plan", "Prior", "Controller", "DEFAULT_SIZES", "DEFAULT_WIDTH", "GPU_SIZES",
           "GPU_WIDTH", "LOOKUP_GRID", "default_grid"]

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
DEFAULT_WIDTH = 4
# On a GPU a forward pass over 64 nodes costs about one over a single token for small models, so
# larger trees are tried, with a width whose pool holds them (1 + 8 + 64 + ... nodes).
GPU_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
GPU_WIDTH = 8
LOOKUP_GRID = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def default_grid(device) -> tuple[tuple[int, ...], int]:
    """``(tree sizes, pool width)`` to choose among on ``device`` (a ``torch.device`` or str)."""
    on_gpu = getattr(device, "type", str(device).split(":")[0]) == "cuda"
    return (GPU_SIZES, GPU_WIDTH) if on_gpu else (DEFAULT_SIZES, DEFAULT_WIDTH)


class CostModel(Protocol):
    """Milliseconds per step: ``step_ms(tree, lookup)`` (drafting included when ``tree > 1``)
    and ``draft_ms``, the drafting alone (:class:`~mtp_ext.step_costs.StepCosts` is one)."""

    draft_ms: float

    def step_ms(self, tree: int, lookup: int) -> float: ...


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a step runs: ``draft`` (whether the heads draft a pool), the tree size ``tree`` (1: no
    tree; after drafting, :meth:`Controller.choose` may change it) and the lookup length
    ``lookup``; ``rate``: the expected tokens per millisecond; ``probe``: a step that drafts
    only to re-measure the heads, which then runs a tree of at least 2 nodes."""

    draft: bool
    tree: int
    lookup: int
    rate: float
    probe: bool = False


@dataclasses.dataclass(frozen=True)
class Prior:
    """What a finished call's controller learned (:meth:`Controller.prior`), for the next call with
    the same heads to start from (:meth:`Controller.start_from`): the mean pool mass per tree size
    and depth, the tree's and the lookup branch's acceptance counts (forgetful sums: the new
    call's own steps outweigh them within a few dozen steps, ``forget`` 0.95) and the
    measured-over-predicted step time ratios."""

    sizes: tuple[int, ...]
    max_depth: int
    max_lookup: int
    mean_mass: dict[int, tuple[float, ...]]
    reached: tuple[float, ...]
    predicted: tuple[float, ...]
    look_hit: tuple[float, ...]
    look_try: tuple[float, ...]
    time_scale: dict[str, float]


class Controller:
    """The per-step choice of tree size and lookup length (see the module docstring).

    Args:
        costs: the machine's step costs (``step_ms(tree, lookup)`` in milliseconds).
        sizes: tree sizes to consider (1 = no tree).
        max_lookup: the longest lookup branch (0: lookup off).
        max_depth: the deepest a tree may be (the heads' count).
        forget: weight of the past per step in the acceptance statistics.
    """

    PROBE_FIRST = 4
    PROBE_MAX = 64
    # Re-checks of the heads during a plain run may cost at most this share of its time: a
    # re-check costs a drafted step of 2 nodes instead of a plain one.
    PROBE_BUDGET = 0.015

    def __init__(self, costs: CostModel, sizes: Sequence[int] = DEFAULT_SIZES, max_lookup: int = 16,
                 max_depth: int = 4, forget: float = 0.95, mass_memory: float = 0.7):
        self.costs = costs
        self.sizes = sorted({int(s) for s in sizes if s >= 1} | {1})
        self.lookups = [L for L in LOOKUP_GRID if L <= max_lookup] or [0]
        if max_lookup > 0 and max_lookup not in self.lookups:
            self.lookups.append(int(max_lookup))
        self.max_lookup = max(0, int(max_lookup))
        self.max_depth = max(1, int(max_depth))
        self.forget = forget
        self.mass_memory = mass_memory
        D = self.max_depth
        self.reached = [0.0] * (D + 1)  # per depth j >= 1: observed reaches (forgetful sums)
        self.predicted = [0.0] * (D + 1)  # per depth: predicted mass
        L = max(1, self.max_lookup)
        self.look_hit = [0.0] * (L + 1)  # per lookup position m >= 1
        self.look_try = [0.0] * (L + 1)
        self.mean_mass: dict[int, list[float]] | None = None  # size -> per-depth mass, running
        self.plain_steps = 0  # consecutive steps without drafting
        self.probe = self.PROBE_FIRST
        self._step_ms: dict[tuple[int, int], float] = {}
        # Measured over predicted step time, per kind of step (see observe_time).
        self.time_scale = {"plain": 1.0, "lookup": 1.0, "drafted": 1.0}
        self._timed = {"plain": 0, "lookup": 0, "drafted": 0}

    # ---------------------------------------------------------------- across calls

    def prior(self) -> Prior | None:
        """What this controller learned, for the next call (None when it never drafted: nothing
        learned of the heads)."""
        if self.mean_mass is None:
            return None
        return Prior(tuple(self.sizes), self.max_depth, self.max_lookup,
                     {t: tuple(m) for t, m in self.mean_mass.items()}, tuple(self.reached),
                     tuple(self.predicted), tuple(self.look_hit), tuple(self.look_try),
                     dict(self.time_scale))

    def start_from(self, prior: Prior | None) -> bool:
        """Starts from ``prior`` (a former call's :meth:`prior` with the same heads) instead of
        knowing nothing: the first step then plans from the prior's acceptance instead of always
        drafting to learn it, so a text on which trees do not pay starts with plain steps (and
        re-checks on the usual schedule). Ignored (returns False) when the prior was made for
        other tree sizes or depths; its lookup counts only when the lookup length matches."""
        if prior is None or prior.sizes != tuple(self.sizes) or prior.max_depth != self.max_depth:
            return False
        self.mean_mass = {t: list(m) for t, m in prior.mean_mass.items()}
        self.reached, self.predicted = list(prior.reached), list(prior.predicted)
        if prior.max_lookup == self.max_lookup:
            self.look_hit, self.look_try = list(prior.look_hit), list(prior.look_try)
        self.time_scale = dict(prior.time_scale)
        return True

    # ---------------------------------------------------------------- estimates

    def calibration(self) -> list[float]:
        """``c_j`` per depth (index 0 unused)."""
        return [1.0] + [(self.reached[j] + 1.0) / (self.predicted[j] + 1.0)
                        for j in range(1, self.max_depth + 1)]

    def lookup_rates(self) -> list[float]:
        """``q_m``: the probability that the first ``m`` lookup tokens are all accepted, given a
        match (index 0: 1)."""
        L = max(1, self.max_lookup)
        pooled = (sum(self.look_hit) + 1.0) / (sum(self.look_try) + 2.0)
        q, out = 1.0, [1.0]
        for m in range(1, L + 1):
            r = (self.look_hit[m] + 2.0 * pooled) / (self.look_try[m] + 2.0)
            q *= min(max(r, 0.0), 1.0)
            out.append(q)
        return out

    def _base_cost(self, tree: int, lookup: int) -> float:
        key = (tree, lookup)
        ms = self._step_ms.get(key)
        if ms is None:
            ms = self._step_ms[key] = max(float(self.costs.step_ms(tree, lookup)), 1e-6)
        return ms

    @staticmethod
    def _kind(tree: int, lookup: int, drafted: bool) -> str:
        if drafted or tree > 1:
            return "drafted"
        return "lookup" if lookup > 0 else "plain"

    def _cost(self, tree: int, lookup: int) -> float:
        return self._base_cost(tree, lookup) * self.time_scale[self._kind(tree, lookup, False)]

    TIME_MEMORY = 0.8  # weight of the past in the measured / predicted time ratio
    TIME_CLAMP = (0.5, 2.0)  # bounds of one step's ratio (a pause of the process is not a cost)

    def observe_time(self, tree: int, lookup: int, drafted: bool, ms: float) -> None:
        """Corrects the cost model by a step's measured time ``ms``: per kind of step (plain,
        lookup only, drafted), a running ratio of measured over predicted time multiplies the
        machine's measured costs, so costs measured on a busier or quieter machine, or at another
        context length, converge to this call's. The first step of each kind (first calls of
        kernels at new shapes) is not counted."""
        kind = self._kind(tree, lookup, drafted)
        self._timed[kind] += 1
        if self._timed[kind] == 1 or not ms > 0:
            return
        predicted = self._base_cost(tree, lookup)
        if drafted and tree <= 1:  # drafted, then nothing of the pool used
            predicted += float(self.costs.draft_ms)
        lo, hi = self.TIME_CLAMP
        ratio = min(max(ms / predicted, lo), hi)
        a = self.TIME_MEMORY
        self.time_scale[kind] = a * self.time_scale[kind] + (1 - a) * ratio

    def masses(self, probs: Sequence[float], depths: Sequence[int]) -> dict[int, list[float]]:
        """Per tree size, the pool's mass per depth: ``probs`` / ``depths`` are a row's pool nodes
        in selection order, the root left out (so size ``t`` holds the first ``t - 1``)."""
        D = self.max_depth
        acc = [0.0] * (D + 1)
        out: dict[int, list[float]] = {}
        i = 0
        for t in self.sizes:
            while i < min(t - 1, len(probs)):
                d = int(depths[i])
                if 1 <= d <= D:
                    acc[d] += float(probs[i])
                i += 1
            out[t] = list(acc)
        return out

    def _reach(self, mass: list[float], calib: list[float]) -> list[float]:
        """``P(tree path reaches depth j)``, non-increasing in ``j``."""
        out, prev = [1.0], 1.0
        for j in range(1, self.max_depth + 1):
            prev = min(prev, calib[j] * mass[j], 1.0)
            out.append(prev)
        return out

    def expected(self, reach: list[float], lookup: int, available: int, q: list[float]) -> float:
        """Expected accepted tokens of one row: tree reach probabilities ``reach`` per depth and a
        lookup branch of ``min(lookup, available)`` tokens (``q`` from :meth:`lookup_rates`)."""
        n = min(lookup, available)
        deepest = max(len(reach) - 1, n)
        total = 0.0
        for j in range(1, deepest + 1):
            p = reach[j] if j < len(reach) else 0.0
            r = q[j] if j <= n else 0.0
            total += 1.0 - (1.0 - p) * (1.0 - r)
        return total

    def _best(self, row_masses: list[dict[int, list[float]]] | None, available: Sequence[int],
              sizes: Sequence[int], draft_paid: bool) -> Plan:
        calib = self.calibration()
        q = self.lookup_rates()
        best = Plan(False, 1, 0, -1.0)
        any_match = any(a > 0 for a in available)
        for t in sizes:
            if t > 1 and row_masses is None:
                continue
            if t > 1:  # rows sharing one mass table (a plan before drafting) share its reach
                by_table: dict[int, list[float]] = {}
                for m in row_masses:
                    if id(m) not in by_table:
                        by_table[id(m)] = self._reach(m[t], calib)
                reach = [by_table[id(m)] for m in row_masses]
            else:
                reach = [[1.0]] * len(available)
            for L in (self.lookups if any_match else [0]):
                tokens = sum(1.0 + self.expected(r, L, a, q) for r, a in zip(reach, available))
                ms = self._cost(t, L)
                if draft_paid and t == 1:  # after drafting the pool is paid whatever is chosen
                    ms += float(self.costs.draft_ms) * self.time_scale["drafted"]
                rate = tokens / ms
                if rate > best.rate:
                    best = Plan(t > 1, t, L, rate)
        return best

    # ---------------------------------------------------------------- decisions

    def plan(self, available: Sequence[int]) -> Plan:
        """Before a step: whether to draft, and (when not) the lookup length. ``available``: per
        live row, how many lookup tokens a match offers (0: no match)."""
        if self.mean_mass is None:  # nothing known yet: look at the heads
            return Plan(True, max(self.sizes), 0, 0.0, probe=True)
        rows = [self.mean_mass] * len(available)
        best = self._best(rows, available, self.sizes, draft_paid=False)
        if best.draft:
            self.probe = self.PROBE_FIRST
            return best
        if self.plain_steps + 1 >= max(self.probe, self.probe_floor()):
            return Plan(True, best.tree, best.lookup, best.rate, probe=True)  # re-check the heads
        return best

    def probe_floor(self) -> int:
        """The fewest plain steps between two re-checks for which the re-checks cost at most
        ``PROBE_BUDGET`` of a plain run's time (by the cost model)."""
        plain = self._cost(1, 0)
        extra = max(self._cost(2, 0) - plain, 0.0)
        return max(1, math.ceil(extra / (self.PROBE_BUDGET * plain)))

    def choose(self, probs: Sequence[Sequence[float]], depths: Sequence[Sequence[int]],
               available: Sequence[int], probe: bool = False) -> tuple[Plan, list[dict]]:
        """After drafting: the tree size and lookup length for this step's pools (per live row,
        the pool nodes' probabilities and depths in selection order, root left out; ``probe``:
        a tree of at least 2 nodes). Returns the plan and each row's masses (:meth:`masses`),
        which :meth:`observe` takes after the step."""
        row_masses = [self.masses(p, d) for p, d in zip(probs, depths)]
        self._remember(row_masses)
        cap = 1 + min((len(p) for p in probs), default=0)
        sizes = [t for t in self.sizes if t <= cap and (t > 1 or not probe or cap < 2)] or [1]
        return self._best(row_masses, available, sizes, draft_paid=True), row_masses

    def _remember(self, row_masses: list[dict[int, list[float]]]) -> None:
        if not row_masses:
            return
        n = len(row_masses)
        mean = {t: [sum(m[t][j] for m in row_masses) / n for j in range(self.max_depth + 1)]
                for t in self.sizes}
        if self.mean_mass is None:
            self.mean_mass = mean
        else:
            a = self.mass_memory
            self.mean_mass = {t: [a * o + (1 - a) * v for o, v in zip(self.mean_mass[t], mean[t])]
                              for t in self.sizes}

    # ---------------------------------------------------------------- observations

    def observe(self, *, drafted: bool, tree: int, masses: Sequence[list[float]] | None,
                tree_accepted: Sequence[int], lookup_matched: Sequence[int],
                lookup_known: Sequence[int], probe: bool = False) -> None:
        """After a step, per live row: ``masses`` (the run tree's mass per depth, from
        :meth:`masses` at size ``tree``; None when nothing was drafted), ``tree_accepted`` (how
        deep the accepted path went along tree nodes), ``lookup_matched`` (how many of the
        lookup draft's tokens equal the emitted tokens, from the first) and ``lookup_known``
        (how many lookup positions the emitted tokens decide: ``min(available, emitted)``)."""
        f = self.forget
        if drafted and masses is not None:
            self.reached = [f * v for v in self.reached]
            self.predicted = [f * v for v in self.predicted]
            for mass, acc in zip(masses, tree_accepted):
                for j in range(1, self.max_depth + 1):
                    m = min(mass[j], 1.0)
                    if m <= 0.0:
                        break
                    self.predicted[j] += m
                    self.reached[j] += 1.0 if acc >= j else 0.0
        if any(k > 0 for k in lookup_known):
            self.look_hit = [f * v for v in self.look_hit]
            self.look_try = [f * v for v in self.look_try]
            L = len(self.look_hit) - 1
            for matched, known in zip(lookup_matched, lookup_known):
                for m in range(1, min(matched + 1, known, L) + 1):
                    self.look_try[m] += 1.0
                    self.look_hit[m] += 1.0 if m <= matched else 0.0
        if drafted:
            self.plain_steps = 0
            if probe:  # back to PROBE_FIRST as soon as a plan drafts on its own
                self.probe = min(2 * self.probe, self.PROBE_MAX)
        else:
            self.plain_steps += 1

    @staticmethod
    def probabilities(scores: Sequence[float]) -> list[float]:
        """Joint log-probabilities to probabilities."""
        return [math.exp(min(s, 0.0)) for s in scores]
