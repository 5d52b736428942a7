"""What a decoding step costs on this machine (``mtp_ext.step_costs``).

How many tokens a draft tree accepts is a property of the text; what a step over ``n`` nodes costs
is a property of the machine, the model, its dtype, the heads and the thread count. This module
measures the second once and caches it; :mod:`mtp_ext.controller` combines it with acceptance
estimated while generating.

A step's time is modelled as

- ``plain_ms``: a plain step (:func:`~mtp_ext.tree_step.plain_step`: one token per row, no tree);
- ``forward_ms(n)``: a verification step over ``n`` nodes per row that were not drafted by the
  heads (the root and a prompt-lookup branch), interpolated linearly between the measured node
  counts :data:`NODE_GRID`;
- ``draft_ms``: the heads drafting a dynamic tree's candidate pool (the same for every tree size,
  since every size is cut from one pool).

so a step with a tree of ``t`` nodes and a lookup branch of ``L`` tokens costs
``forward_ms(t + L) + draft_ms`` (``draft_ms`` only when ``t > 1``), and ``plain_ms`` when
``t = 1`` and ``L = 0``. The measurement runs on a fixed synthetic prompt (costs do not depend on
the text), about 100 steps: a few seconds for a 135M model on 2 CPU threads.

The cached file is ``<cache>/step_costs/<key>.json``; the key hashes the CPU (model, ISA flags,
torch version, threads; :func:`mtp_ext.machine.cpu_key`) or the GPU's name, the model's class
and configuration, the dtype, the heads' configuration, the pool's width and depth and the batch
size. Where the cache cannot be written the costs are kept for the process.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import ops as kernel_ops
from .data.cache import cache_dir, remove_stale_temps, warn_once, write_file
from .heads import MTPHeads
from .machine import cpu_key
from .settings import GenerationSettings
from .tree_step import plain_step, prefill, step_linears, verify_step
from .trees import draft_pool, root_tree

__all__ = ["NODE_GRID", "StepCosts", "measure_step_costs", "step_costs", "costs_key"]

NODE_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
PROMPT_TOKENS = 64


@dataclasses.dataclass
class StepCosts:
    """Measured milliseconds per step for ``batch`` rows (see the module docstring).

    Attributes:
        batch: rows per step.
        plain_ms: a plain step.
        nodes: node counts measured (ascending, starting at 1).
        forward_ms: a verification step over each node count, without drafting.
        draft_ms: drafting the candidate pool.
        width, max_depth: the pool the drafting cost is for.
    """

    batch: int
    plain_ms: float
    nodes: list[int]
    forward_ms: list[float]
    draft_ms: float
    width: int
    max_depth: int

    def forward(self, n: int) -> float:
        """Milliseconds of a verification step over ``n`` nodes (linear between measured counts,
        extrapolated from the last two beyond them)."""
        xs, ys = self.nodes, self.forward_ms
        if n <= xs[0] or len(xs) == 1:
            return ys[0]
        i = min(bisect.bisect_left(xs, n), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def step_ms(self, tree: int, lookup: int) -> float:
        """Milliseconds of a step with a drafted tree of ``tree`` nodes (1: no drafting) and a
        lookup branch of ``lookup`` tokens."""
        if tree <= 1 and lookup <= 0:
            return self.plain_ms
        return self.forward(tree + lookup) + (self.draft_ms if tree > 1 else 0.0)

    @property
    def max_nodes(self) -> int:
        return self.nodes[-1]


def _prompt(model, batch: int, device) -> torch.Tensor:
    """A fixed synthetic prompt ``[batch, PROMPT_TOKENS]`` of ordinary token ids."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    row = torch.randint(min(100, vocab - 1), max(101, vocab // 2), (PROMPT_TOKENS,), generator=g)
    return row.clamp(max=vocab - 1).expand(batch, -1).contiguous().to(device)


@torch.no_grad()
def measure_step_costs(model, heads: MTPHeads, batch: int = 1, width: int = 4,
                       max_depth: int | None = None, nodes=NODE_GRID, repeats: int = 7) -> StepCosts:
    """Times plain steps, verification steps over each node count in ``nodes`` and the drafting of
    a pool (``width``, ``max_depth``): ``repeats`` rounds, each running every one of them once
    (round robin, after one warm-up round; medians), on a synthetic prompt of ``batch`` rows,
    with the linear layers the steps use (:func:`~mtp_ext.tree_step.step_linears`)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = heads.lm_head_weight.device
    depth = heads.config.num_heads if max_depth is None else max_depth
    nodes = sorted({int(n) for n in nodes if n >= 1} | {1})
    ids = _prompt(model, batch, device)
    settings = GenerationSettings(max_new_tokens=0, do_sample=False, temperature=1.0, top_k=0,
                                  top_p=1.0, eos_token_ids=(), pad_token_id=None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def clock() -> float:
        sync()
        return time.perf_counter()

    g = torch.Generator().manual_seed(1)
    vocab = model.get_input_embeddings().weight.shape[0]
    with step_linears(model, device):
        state, _ = prefill(model, heads, ids, torch.ones_like(ids), settings, None, kernel_ops)

        def plain():
            plain_step(model, heads, state, settings, None, kernel_ops)

        def forward(n):
            # Random branch tokens: almost never accepted, so the cache grows by one per step.
            branch = torch.randint(0, vocab, (batch, n - 1), generator=g) if n > 1 else None
            verify_step(model, heads, state, root_tree(state.root), settings, None, kernel_ops,
                        branch)

        def draft():
            draft_pool(heads, heads.draft_input(state.feature), state.root, width, depth)

        runs = [plain] + [(lambda n=n: forward(n)) for n in nodes] + [draft]
        times: list[list[float]] = [[] for _ in runs]
        # Round robin, so that a passing load on the machine weighs on every entry alike; the
        # first round warms up and is not counted.
        for r in range(repeats + 1):
            for i, run in enumerate(runs):
                start = clock()
                run()
                if r:
                    times[i].append(1e3 * (clock() - start))
        ms = [statistics.median(t) for t in times]
        plain_ms, forward_ms, draft_ms = ms[0], ms[1:-1], ms[-1]
    return StepCosts(batch=batch, plain_ms=plain_ms, nodes=nodes, forward_ms=forward_ms,
                     draft_ms=draft_ms, width=width, max_depth=depth)


def costs_key(model, heads: MTPHeads, batch: int, width: int, max_depth: int | None) -> str:
    """The cache key of :func:`step_costs` (see the module docstring)."""
    lm = heads.lm_head_weight
    where = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else cpu_key()
    cfg = getattr(model, "config", None)
    model_cfg = cfg.to_json_string(use_diff=False) if hasattr(cfg, "to_json_string") else repr(cfg)
    text = json.dumps([
        where, str(lm.device.type), type(model).__name__, model_cfg, str(lm.dtype),
        heads.config.to_dict(), width, max_depth, batch, torch.get_num_threads(), torch.__version__,
    ], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _path(key: str) -> Path:
    return cache_dir() / "step_costs" / f"{key}.json"


# Costs read or measured in this process, by path (those the cache could not keep included), so
# that a generate call reads the cache file once per process, as mtp_ext.linear_choice does.
_KNOWN: dict[str, StepCosts] = {}


def _read(path: Path) -> StepCosts | None:
    """The costs saved at ``path``; None where there are none or the file is damaged."""
    try:
        with open(path) as f:
            costs = StepCosts(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    ok = (costs.nodes and len(costs.nodes) == len(costs.forward_ms) and costs.nodes[0] == 1
          and all(isinstance(v, (int, float)) and v > 0 for v in [costs.plain_ms, costs.draft_ms,
                                                                   *costs.forward_ms]))
    return costs if ok else None


def _save(path: Path, costs: StepCosts) -> None:
    remove_stale_temps(path.parent)
    text = json.dumps(dataclasses.asdict(costs), indent=2)
    try:
        write_file(path, lambda tmp: tmp.write_text(text))
    except OSError as err:
        warn_once(f"step_costs:{path}", f"mtp_ext: the step costs could not be saved in "
                  f"{path.parent} ({err}); they are kept for this process only")


def step_costs(model, heads: MTPHeads, batch: int = 1, width: int = 4, max_depth: int | None = None,
               nodes=NODE_GRID, refresh: bool = False, quiet: bool = False) -> StepCosts:
    """The step costs of this machine, model, dtype, heads, thread count and batch size: read
    from the cache, or measured (:func:`measure_step_costs`, a few seconds, said once on stderr
    unless ``quiet``) and cached; read once per process."""
    path = _path(costs_key(model, heads, batch, width, max_depth))
    if not refresh:
        costs = _KNOWN.get(str(path)) or _read(path)
        if costs is not None:
            _KNOWN[str(path)] = costs
            return costs
    if not quiet:
        print(f"mtp_ext: measuring decoding step costs for this machine, model, dtype, heads, "
              f"thread count and batch {batch} (once; cached in {path.parent})", file=sys.stderr,
              flush=True)
    costs = _KNOWN[str(path)] = measure_step_costs(model, heads, batch, width, max_depth, nodes)
    _save(path, costs)
    return costs
