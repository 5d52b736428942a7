"""Steps whose tree size and lookup length a :class:`~mtp_ext.controller.Controller` picks
(``mtp_ext.controlled_steps``): what ``generate`` runs with its default ``tree``.

Each step:

1. the prompt-lookup drafts of every live row are read from the host contexts (no device work);
2. the controller plans: draft or not (and, when not, the lookup length);
3. when drafting, the heads draft one candidate pool (:func:`~mtp_ext.trees.draft_pool`), its
   ranked probabilities are read on the host, and the controller picks the tree size and lookup
   length for this pool;
4. a tree or lookup step runs (:func:`~mtp_ext.tree_step.verify_step`), or, when neither pays, a
   plain step (:func:`~mtp_ext.tree_step.plain_step`);
5. the controller observes how deep the tree's and the branch's drafts were accepted, and (on CPU)
   how long the step took.
"""

from __future__ import annotations

import time
import weakref

import torch

from .controller import Controller, Plan, default_grid
from .heads import MTPHeads
from .step_costs import step_costs
from .tree_step import DecodeState, HostContexts, StepResult, plain_step, verify_step
from .trees import draft_pool, root_tree

__all__ = ["ControlledSteps", "forget_priors"]

# Per heads object, what the last call's controller learned (Controller.prior): the next call
# with those heads starts from it instead of drafting its first step to learn the heads.
_PRIORS: "weakref.WeakKeyDictionary[MTPHeads, object]" = weakref.WeakKeyDictionary()


def forget_priors() -> None:
    """Drops what earlier calls learned: the next call of any heads starts knowing nothing."""
    _PRIORS.clear()


def _leading(row: list[int]) -> int:
    """How many leading entries of a -1 padded draft row are tokens."""
    n = 0
    for t in row:
        if t < 0:
            break
        n += 1
    return n


def _matched(draft: list[int], emitted: list[int], available: int) -> int:
    """How many of a lookup draft's first tokens equal the emitted ones (the model's targets)."""
    n = 0
    for d, e in zip(draft[:available], emitted):
        if d != e:
            break
        n += 1
    return n


class ControlledSteps:
    """The per-call stepper of ``generate``'s default tree (see the module docstring).

    Args:
        model, heads, state: the backbone, its heads and the state after the prefill.
        settings, uniforms_fn, ops: as :func:`~mtp_ext.tree_step.run_step` takes them.
        contexts: the rows' tokens on the host (for prompt lookup), or None when lookup is off.
        max_lookup: the longest lookup branch.
        controller: a :class:`Controller` (default: one over this machine's measured step costs
            for this model, dtype, heads and batch size, :func:`~mtp_ext.step_costs.step_costs`,
            started from what the last call with these heads learned, :meth:`finish`).
    """

    def __init__(self, model, heads: MTPHeads, state: DecodeState, settings, uniforms_fn, ops,
                 contexts: HostContexts | None, max_lookup: int,
                 controller: Controller | None = None):
        self.model, self.heads, self.state = model, heads, state
        self.settings, self.uniforms_fn, self.ops = settings, uniforms_fn, ops
        self.contexts = contexts if max_lookup > 0 else None
        self.max_lookup = max_lookup if contexts is not None else 0
        device = state.root.device
        sizes, self.width = default_grid(device)
        if controller is None:
            costs = step_costs(model, heads, batch=state.root.shape[0], width=self.width)
            controller = Controller(costs, sizes, self.max_lookup, heads.config.num_heads)
            controller.start_from(_PRIORS.get(heads))
            self._remember = True
        else:
            self._remember = False
        self.controller = controller
        self.pin = device.type == "cuda"
        # Steps are timed on CPU only: on a GPU, work queued after a step's host read would run
        # into the next step's time.
        self.timed = device.type == "cpu"
        self.plans: list[tuple[int, int]] = []  # (tree nodes, lookup tokens) per step

    def finish(self) -> None:
        """After the call: keeps what the controller learned for the next call with these heads
        (only for the controller made here, not an injected one)."""
        if self._remember:
            prior = self.controller.prior()
            if prior is not None:
                _PRIORS[self.heads] = prior

    def _drafts(self, taken: list[list[int]], active: list[bool]):
        """``(drafts [B, max_lookup] host tensor or None, rows as lists or None)``."""
        if self.contexts is None:
            return None, None
        for b, new in enumerate(taken):
            if new:
                self.contexts.extend(b, new)
        drafts = self.contexts.lookup(self.max_lookup, active, pin=self.pin)
        return drafts, (drafts.tolist() if drafts is not None else None)

    def _pool_choice(self, plan: Plan, live: list[int], available: list[int]):
        """Drafts the pool and lets the controller cut it: ``(plan, tree, masses)``."""
        state, heads = self.state, self.heads
        pool = draft_pool(heads, heads.draft_input(state.feature), state.root, self.width)
        n = min(pool.capacity, max(self.controller.sizes))
        scores, depths = pool.ranked_nodes(n)
        both = torch.stack([scores[:, 1:], depths[:, 1:].to(scores.dtype)]).tolist()  # one read
        probs = [Controller.probabilities(both[0][b]) for b in live]
        depths_ = [[int(d) for d in both[1][b]] for b in live]
        plan_, row_masses = self.controller.choose(probs, depths_, available, probe=plan.probe)
        plan = Plan(True, plan_.tree, plan_.lookup, plan_.rate, plan.probe)
        tree = pool.select(plan.tree) if plan.tree > 1 else None
        masses = [m[plan.tree] for m in row_masses] if plan.tree > 1 else None
        return plan, tree, masses

    def step(self, taken: list[list[int]], active: list[bool]) -> StepResult:
        """Runs one step; ``taken``: the tokens each row took last step (for the contexts)."""
        start = time.perf_counter()
        drafts, rows = self._drafts(taken, active)
        live = [b for b, on in enumerate(active) if on]
        available = [_leading(rows[b]) if rows is not None else 0 for b in live]
        plan = self.controller.plan(available)
        tree = masses = None
        if plan.draft:
            plan, tree, masses = self._pool_choice(plan, live, available)
        state = self.state
        if plan.tree > 1 or plan.lookup > 0:
            if tree is None:
                tree = root_tree(state.root)
            branch = drafts[:, : plan.lookup] if plan.lookup > 0 and drafts is not None else None
            res = verify_step(self.model, self.heads, state, tree, self.settings, self.uniforms_fn,
                              self.ops, branch, active)
        else:
            res = plain_step(self.model, self.heads, state, self.settings, self.uniforms_fn,
                             self.ops)
        lookup = plan.lookup if drafts is not None else 0
        self.plans.append((plan.tree, lookup))
        if self.timed:
            self.controller.observe_time(plan.tree, lookup, plan.draft,
                                         1e3 * (time.perf_counter() - start))
        self._observe(plan, res, live, rows, available, masses)
        return res

    def _observe(self, plan: Plan, res: StepResult, live: list[int], rows, available: list[int],
                 masses) -> None:
        tree_acc = [0] * len(live)
        if plan.tree > 1:
            deepest = max(res.accepted[b] for b in live) if live else 0
            path = res.path[:, 1 : deepest + 1].tolist()
            for i, b in enumerate(live):
                n = 0
                for node in path[b][: res.accepted[b]]:
                    if node >= plan.tree:
                        break
                    n += 1
                tree_acc[i] = n
        matched = [_matched(rows[b], res.emitted[b], a) if rows is not None else 0
                   for b, a in zip(live, available)]
        known = [min(a, len(res.emitted[b])) for b, a in zip(live, available)]
        self.controller.observe(drafted=plan.draft, tree=plan.tree, masses=masses,
                                tree_accepted=tree_acc, lookup_matched=matched, lookup_known=known,
                                probe=plan.probe)
