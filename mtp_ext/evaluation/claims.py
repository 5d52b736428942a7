"""The paper's claims as paired comparisons of the harness's records, judged by a stated rule.

Each :class:`Claim` names two record selections scored on the same windows of every dataset (the
side the claim says is higher, ``a``, and the other, ``b``), a metric and an offset, and quotes
what it tests, marked by where the words come from: the paper's ``"abstract"`` or a ``"secondary
summary"`` of the paper (its body could not be read here).

:func:`judge` computes, per model and dataset, the difference ``a - b`` with its 95% interval from
a paired bootstrap over windows (:func:`~mtp_ext.evaluation.intervals.difference_interval`), and
the verdict of :func:`~mtp_ext.evaluation.intervals.verdict`: **confirmed** when the interval
excludes zero in the claimed direction on at least 3 of the 4 datasets, **contradicted** when it
excludes zero the other way on at least 3, **not reproduced** otherwise. A claim whose records are
missing (a run without the heads study) is left out.

Selections may name layers by role, resolved per model from its records: ``"last"`` (the deepest
layer a frozen-backbone head was trained on) and ``"before_last"`` (the grid layer before it:
fixed in advance, not chosen on the scores); ``k="max"`` is the largest ``k`` marginalized.
A new claim is one entry of :data:`CLAIMS`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .intervals import LEVEL, N_BOOT, difference_interval, verdict

__all__ = ["Claim", "CLAIMS", "judge", "NEED"]

NEED = 3  # datasets (of 4) on which the interval must exclude zero


@dataclasses.dataclass(frozen=True)
class Claim:
    """``a`` and ``b``: record fields to match (``method``, ``layer``, ``k``); ``direction``: +1
    when the claim says ``a`` scores higher on ``metric`` at ``offset``, -1 lower."""

    name: str
    says: str
    source: str  # "abstract" or "secondary summary"
    a: dict
    b: dict
    direction: int = 1
    metric: str = "top1_text"
    offset: int = 2


_ABSTRACT = ("their hidden layers are strongly specialized for NTP, making adaptation "
             "non-trivial")

CLAIMS: tuple[Claim, ...] = (
    Claim("heads on a frozen backbone underperform marginalization", _ABSTRACT, "abstract",
          a=dict(method="marginal", k="max"), b=dict(method="head_frozen", layer="last")),
    Claim("the last layer is specialized: a head on the layer before it predicts t+2 better",
          "early hidden-layer specialization", "secondary summary",
          a=dict(method="head_frozen", layer="before_last"),
          b=dict(method="head_frozen", layer="last")),
    Claim("joint training with a much lower backbone learning rate helps the heads",
          "joint training ... with differential learning rates helps", "secondary summary",
          a=dict(method="head_joint+difflr"), b=dict(method="head_frozen", layer="last")),
    Claim("one shared learning rate hurts the backbone's NTP",
          "differential learning rates (backbone much lower than heads)", "secondary summary",
          a=dict(method="ntp_joint"), b=dict(method="ntp"), direction=-1, offset=1),
    Claim("WHS beats a head on the frozen last layer",
          "weighted hidden states (WHS) ... the best adaptation", "secondary summary",
          a=dict(method="head_whs"), b=dict(method="head_frozen", layer="last")),
    Claim("a gap to marginalization remains after WHS",
          "a gap to marginalization remains", "secondary summary",
          a=dict(method="marginal", k="max"), b=dict(method="head_whs")),
)


def _roles(records: Sequence[dict]) -> dict:
    layers = sorted({r["layer"] for r in records
                     if r["method"] == "head_frozen" and isinstance(r["layer"], int)})
    ks = sorted({r["k"] for r in records if r["method"] == "marginal" and r["k"] is not None})
    return {"last": layers[-1] if layers else None,
            "before_last": layers[-2] if len(layers) > 1 else None,
            "max": ks[-1] if ks else None}


def _resolve(sel: dict, roles: dict) -> dict:
    """``sel`` with layer and ``k`` roles ("last", "before_last", "max") replaced by this model's
    values (None where the model has no such layer or ``k``)."""
    return {f: roles.get(v, v) if isinstance(v, str) and f != "method" else v
            for f, v in sel.items()}


def _pick(records: Sequence[dict], want: dict, dataset: str, metric: str,
          offset: int) -> dict | None:
    """The record with per-window sums matching the resolved selection ``want``, or None."""
    if any(v is None for v in want.values()):
        return None
    for r in records:
        if (r["dataset"] == dataset and r["metric"] == metric and r["offset"] == offset
                and r.get("windows") and all(r.get(f) == v for f, v in want.items())):
            return r
    return None


def judge(records: Sequence[dict], claims: Sequence[Claim] = CLAIMS, need: int = NEED,
          n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> list[dict]:
    """Per model and claim with records on every dataset of that model: ``{model, claim, says,
    source, direction, metric, offset, a, b, datasets: {dataset: {difference, lo, hi}},
    verdict, rule}`` (``a`` / ``b``: the selections with roles resolved)."""
    out = []
    for model in sorted({r["model"] for r in records}):
        rs = [r for r in records if r["model"] == model]
        roles = _roles(rs)
        datasets = sorted({r["dataset"] for r in rs})
        for claim in claims:
            a, b = _resolve(claim.a, roles), _resolve(claim.b, roles)
            per: dict[str, dict] = {}
            for ds in datasets:
                ra = _pick(rs, a, ds, claim.metric, claim.offset)
                rb = _pick(rs, b, ds, claim.metric, claim.offset)
                if ra is None or rb is None:
                    break
                d, lo, hi = difference_interval(ra["windows"], rb["windows"], paired=True,
                                                n_boot=n_boot, level=level, seed=seed)
                per[ds] = {"difference": d, "lo": lo, "hi": hi}
            if len(per) != len(datasets) or not per:
                continue
            out.append({
                "model": model, "claim": claim.name, "says": claim.says, "source": claim.source,
                "direction": claim.direction, "metric": claim.metric, "offset": claim.offset,
                "a": a, "b": b, "datasets": per,
                "verdict": verdict({k: (v["lo"], v["hi"]) for k, v in per.items()},
                                   claim.direction, min(need, len(per))),
                "rule": f"{int(level * 100)}% paired bootstrap interval over windows excludes zero "
                        f"in the claimed direction on at least {min(need, len(per))} of "
                        f"{len(per)} datasets",
            })
    return out
