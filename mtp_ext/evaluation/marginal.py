"""Next-token prediction and numerical marginalization, scored teacher-forced on one sample.

For a position ``t`` of a sample, ``p(x_{t+2} | x_{<=t})`` is approximated by the mixture over the
``k`` most likely intermediate tokens ``v`` of ``p(x_{t+1} = v | x_{<=t}) * p(x_{t+2} | x_{<=t}, v)``
(renormalized by the kept mass, or not), and ``p(x_{t+3} | x_{<=t})`` by the mixture over the
``k * k`` paths of two intermediate tokens (top ``k`` at each level, path weight the product of
its probabilities). Top-1 / top-5 come from :func:`mtp_ext.ops.topk_marginalize` (the ranking
does not depend on renormalization); the negative log-likelihood of the text's token is computed
from the branches' log-softmax. The branch distributions come from
:func:`mtp_ext.evaluation.branches.forward_with_nodes` (one forward pass for many branches).

Metrics (per :class:`~mtp_ext.evaluation.tally.Key`): ``top1_text``, ``top5_text`` (against the
text's token), ``top1_greedy``, ``top5_greedy`` (against the model's own greedy prediction of
that token under teacher forcing: the argmax of its logits at ``t + offset - 1``), ``nll_text``
(nats) and ``mass`` (the probability mass of the kept intermediate tokens or paths). The cost
(``model_tokens``) of a method is what it would evaluate alone: ``1 + k`` tokens per position for
``t + 2``, ``1 + k + k^2`` for ``t + 3``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .branches import forward_with_nodes
from .samples import Sample
from .tally import Key, Tally, hits

__all__ = ["score_ntp", "score_marginal", "score_exact", "scored_positions"]


def scored_positions(sample: Sample, offset: int) -> torch.Tensor:
    """Positions ``t`` ``[P]`` (int64) whose token ``t + offset`` exists and is scored."""
    L = sample.ids.numel()
    if L <= offset:
        return torch.zeros(0, dtype=torch.long)
    t = torch.arange(L - offset)
    return t[sample.scored[offset:]]


def _score_distribution(tally, key, top_ids, text, greedy) -> None:
    tally.add(key, "top1_text", hits(top_ids, text, 1))
    tally.add(key, "top5_text", hits(top_ids, text, 5))
    if greedy is not None:
        tally.add(key, "top1_greedy", hits(top_ids, greedy, 1))
        tally.add(key, "top5_greedy", hits(top_ids, greedy, 5))


def score_ntp(tally: Tally, sample: Sample, logits: torch.Tensor, method: str = "ntp") -> None:
    """Next-token top-1 / top-5 accuracy and NLL of the text's token from ``logits[L, V]``."""
    t = scored_positions(sample, 1)
    if t.numel() == 0:
        return
    key = Key(method, 1)
    lg = logits[t].float()
    _, top = ops.softmax_topk(lg, min(5, lg.shape[-1]))
    text = sample.ids[t + 1]
    _score_distribution(tally, key, top, text, None)
    tally.add(key, "nll_text", -F.log_softmax(lg, -1).gather(-1, text[:, None])[:, 0])
    tally.cost(key, t.numel())


def _mixture_scores(tally, key, next_logits, weights, text, greedy, method_raw, cost) -> None:
    """Scores the mixtures ``sum_l weights[P, l] softmax(next_logits[P, l])`` (one per row), under
    ``key`` and (the NLL without renormalization) under ``method_raw``; both cost ``cost``."""
    m = min(5, next_logits.shape[-1])
    _, top = ops.topk_marginalize(next_logits, weights, m, True)
    _score_distribution(tally, key, top, text, greedy)
    lp = F.log_softmax(next_logits.float(), -1).gather(
        -1, text[:, None, None].expand(-1, next_logits.shape[1], 1)
    )[..., 0]
    lw = weights.double().log()
    joint = torch.logsumexp(lw + lp.double(), -1)  # log sum_l w_l p_l(x)
    mass = weights.double().sum(-1)
    tally.add(key, "nll_text", -(joint - mass.log()))
    tally.add(key, "mass", mass)
    raw = Key(method_raw, key.offset, key.k, key.layer)
    tally.add(raw, "nll_text", -joint)
    tally.cost(key, cost)
    tally.cost(raw, cost)


def _branch_logits(model, sample: Sample, attach, parent, tokens) -> torch.Tensor:
    """Node logits ``[C, V]`` (float32) of nodes on ``sample``'s text up to the last attach point."""
    end = int(attach.max()) + 1
    out = forward_with_nodes(model, sample.ids[:end], attach, parent, tokens)
    return out.logits[0, end:].float()


def score_marginal(
    tally: Tally,
    model,
    sample: Sample,
    logits: torch.Tensor,
    ks: tuple[int, ...],
    ks3: tuple[int, ...] = (),
    chunk_nodes: int = 512,
) -> None:
    """Marginalization for ``t + 2`` with each ``k`` in ``ks`` and for ``t + 3`` with each ``k``
    in ``ks3`` (``k`` per level), on every scored position of ``sample``.

    Args:
        logits: ``[L, V]`` the model's logits over ``sample.ids`` (teacher forcing).
        chunk_nodes: branch tokens per forward pass (bounds memory: ``chunk_nodes x V`` logits).
    """
    V = logits.shape[-1]
    ks = tuple(sorted({min(k, V) for k in ks}))
    ks3 = tuple(sorted({min(k, V) for k in ks3}))
    kmax = max(ks + ks3) if ks + ks3 else 0
    if kmax == 0:
        return
    t2 = scored_positions(sample, 2)
    t3 = scored_positions(sample, 3)
    ts = torch.unique(torch.cat([t2, t3]))
    if ts.numel() == 0:
        return
    ids = sample.ids
    greedy = logits.argmax(-1)
    w_all, v_all = ops.softmax_topk(logits[ts].float(), kmax)  # [P, kmax]
    group = max(1, chunk_nodes // kmax)
    for s in range(0, ts.numel(), group):
        tg, w, v = ts[s : s + group], w_all[s : s + group], v_all[s : s + group]
        n = tg.numel()
        attach = tg.repeat_interleave(kmax)
        branch = _branch_logits(model, sample, attach, torch.full_like(attach, -1), v.flatten())
        branch = branch.view(n, kmax, V)
        in2 = torch.isin(tg, t2)
        if bool(in2.any()) and ks:
            b2, w2, p2 = branch[in2], w[in2], tg[in2]
            for k in ks:
                key = Key("marginal", 2, k)
                _mixture_scores(tally, key, b2[:, :k], w2[:, :k], ids[p2 + 2], greedy[p2 + 1],
                                "marginal_raw", p2.numel() * (1 + k))
        in3 = torch.isin(tg, t3)
        if bool(in3.any()) and ks3:
            _score_t3(tally, model, sample, tg[in3], w[in3], v[in3], branch[in3], greedy, ks3,
                      chunk_nodes)


def _score_t3(tally, model, sample, tg, w1, v1, branch1, greedy, ks3, chunk_nodes) -> None:
    """``t + 3`` through paths ``(v1, v2)``; the level-1 candidates ``v1[n, >=k]`` (weights
    ``w1``) and their next-token logits ``branch1[n, >=k, V]`` are given."""
    k3 = max(ks3)
    V = branch1.shape[-1]
    w1, v1 = w1[:, :k3], v1[:, :k3]
    w2, v2 = ops.softmax_topk(branch1[:, :k3], k3)  # [n, k3, k3]: p(v2 | x<=t, v1) and tokens
    per = k3 + k3 * k3
    group = max(1, chunk_nodes // per)
    ids = sample.ids
    for s in range(0, tg.numel(), group):
        t = tg[s : s + group]
        n = t.numel()
        # Each position's tree: k3 level-1 nodes, then the k3 * k3 level-2 nodes (node
        # k3 + i * k3 + j is child j of level-1 node i).
        base = torch.arange(n)[:, None] * per
        p1 = torch.full((n, k3), -1, dtype=torch.long)
        p2 = (base + torch.arange(k3).repeat_interleave(k3)[None]).reshape(n, -1)
        parent = torch.cat([p1, p2], 1).flatten()
        tokens = torch.cat([v1[s : s + n], v2[s : s + n].reshape(n, -1)], 1).flatten()
        attach = t.repeat_interleave(per)
        leaf = _branch_logits(model, sample, attach, parent, tokens).view(n, per, V)[:, k3:]
        leaf = leaf.view(n, k3, k3, V)
        pw = w1[s : s + n, :, None].double() * w2[s : s + n].double()  # [n, k3, k3]
        for k in ks3:
            key = Key("marginal", 3, k)
            _mixture_scores(tally, key, leaf[:, :k, :k].reshape(n, k * k, V),
                            pw[:, :k, :k].reshape(n, k * k).float(), ids[t + 3], greedy[t + 2],
                            "marginal_raw", n * (1 + k + k * k))


def score_exact(
    tally: Tally,
    model,
    sample: Sample,
    t: int,
    logits: torch.Tensor,
    ks: tuple[int, ...],
    chunk_nodes: int = 512,
    progress: bool = False,
) -> None:
    """The exact ``t + 2`` marginal at one position (all ``V`` intermediate tokens, most likely
    first) and how far each top-``k`` approximation is from it.

    Records under method ``"marginal_slice"``: for ``k = V`` the exact marginal's metrics (as
    :func:`score_marginal` reports them), and for each ``k`` in ``ks`` the total variation
    distance ``tv_exact`` between the renormalized top-``k`` marginal and the exact one.
    """
    V = logits.shape[-1]
    if not 0 <= t < sample.ids.numel() - 2:
        raise ValueError(f"t must leave room for t + 2 in a sample of {sample.ids.numel()}, got {t}")
    p = torch.softmax(logits[t].double(), -1)
    order = torch.sort(p, descending=True, stable=True).indices
    q = torch.zeros(V, dtype=torch.float64)
    snaps: dict[int, torch.Tensor] = {}
    ks = tuple(sorted({min(k, V) for k in ks}))
    starts = range(0, V, chunk_nodes)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"exact marginal (V = {V})", unit="chunk", leave=False)
    for start in starts:
        toks = order[start : start + chunk_nodes]
        attach = torch.full_like(toks, t)
        br = _branch_logits(model, sample, attach, torch.full_like(toks, -1), toks)
        contrib = p[toks][:, None] * torch.softmax(br.double(), -1)
        for k in ks:
            if start < k <= start + toks.numel():
                snaps[k] = q + contrib[: k - start].sum(0)
        q += contrib.sum(0)
    text, greedy = sample.ids[t + 2 : t + 3], logits[t + 1].argmax()[None]
    key = Key("marginal_slice", 2, V)
    top = torch.sort(q, descending=True, stable=True).indices[None, :5]
    _score_distribution(tally, key, top, text, greedy)
    tally.add(key, "nll_text", -q[text].log())
    tally.cost(key, 1 + V)
    for k in ks:
        approx = snaps[k] / p[order[:k]].sum()
        key = Key("marginal_slice", 2, k)
        tally.add(key, "tv_exact", 0.5 * (approx - q).abs().sum()[None])
        tally.cost(key, 1 + k)
