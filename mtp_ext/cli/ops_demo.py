"""``mtp-ext demo --ops``: a short demonstration of the ops on model-sized random inputs: each op
is run, checked against its reference, and timed against it (medians, same process)."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .. import ops, reference

__all__ = ["run_demo"]


def _median_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(vocab: int = 49152, batch: int = 8, k: int = 8, seed: int = 0) -> None:
    """Prints, for each op, whether it matches the reference and its speed-up over it."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=gen) * 3
    next_logits = torch.randn(batch, k, vocab, generator=gen) * 3
    probs, ids = ops.softmax_topk(logits, k)
    weights = probs
    tree_parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 4])
    t = tree_parents.numel()
    target = torch.randn(batch, t, vocab, generator=gen) * 3
    greedy = target.argmax(-1)
    draft = greedy.gather(1, tree_parents.clamp_min(0).expand(batch, t))
    draft[:, 0] = 0
    hidden = torch.randn(4, 576, generator=gen)
    head_w = torch.randn(3, 576, 576, generator=gen) * 0.02
    lm_head = torch.randn(vocab, 576, generator=gen) * 0.05

    cases = [
        ("softmax_topk", lambda: ops.softmax_topk(logits, k), lambda: reference.softmax_topk(logits, k)),
        (
            "topk_marginalize",
            lambda: ops.topk_marginalize(next_logits, weights, 8),
            lambda: reference.topk_marginalize(next_logits, weights, 8),
        ),
        (
            "marginalize",
            lambda: ops.marginalize(next_logits, weights),
            lambda: reference.marginalize(next_logits, weights),
        ),
        (
            "fused_mtp_heads",
            lambda: ops.fused_mtp_heads(hidden, head_w, None, lm_head, 8),
            lambda: reference.fused_mtp_heads(hidden, head_w, None, lm_head, 8),
        ),
        (
            "verify_tree",
            lambda: ops.verify_tree(draft, tree_parents, target),
            lambda: reference.verify_tree(draft, tree_parents, target),
        ),
    ]
    print(f"mtp_ext demo: V={vocab}, B={batch}, k={k}, {torch.get_num_threads()} threads")
    print(f"{'op':<18} {'matches':>8} {'kernel ms':>10} {'reference ms':>13} {'speed-up':>9}")
    for name, kernel, ref in cases:
        got, want = kernel(), ref()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        ok = all(
            torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-4, atol=1e-5)
            for a, b in zip(got, want)
        )
        tk, tr = _median_ms(kernel), _median_ms(ref)
        print(f"{name:<18} {str(ok):>8} {tk:>10.2f} {tr:>13.2f} {tr / tk:>8.1f}x")
    num, tokens, _ = ops.verify_tree(draft, tree_parents, target)
    print(f"verify_tree accepted per row: {num.tolist()} (tree of {t} nodes, greedy drafts)")
