"""Records of :func:`mtp_ext.evaluation.evaluate` as JSON, markdown tables and PNG figures."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterable, Sequence

from .claims import judge

__all__ = ["write_report", "markdown_tables", "pivot", "plot_figures", "verdict_table"]

_METRICS = ("top1_text", "top5_text", "top1_greedy", "top5_greedy", "nll_text", "mass")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def _fmt_value(r: dict) -> str:
    """``value``, with its 95% interval ``[lo, hi]`` where the record has one."""
    if r.get("lo") is None or r.get("hi") is None:
        return _fmt(r["value"])
    return f"{r['value']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"


def pivot(records: Iterable[dict], rows: Sequence[str], metrics: Sequence[str] = _METRICS,
          cost: bool = True) -> str:
    """A markdown table: one row per distinct ``rows`` fields, one column per metric (mean
    values, with the 95% bootstrap interval over windows in brackets where the record has one),
    plus the positions and the tokens the model evaluated per position."""
    table: dict[tuple, dict] = {}
    for r in records:
        row = tuple(r[f] for f in rows)
        cell = table.setdefault(row, {"positions": r["positions"], "cost": None})
        cell[r["metric"]] = _fmt_value(r)
        if r["metric"] in ("top1_text", "nll_text", "tv_exact"):
            cell["positions"] = r["positions"]
            if r["positions"]:
                cell["cost"] = r["model_tokens"] / r["positions"]
    present = [m for m in metrics if any(m in c for c in table.values())]
    head = list(rows) + present + ["positions"] + (["tokens/position"] if cost else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cell in table.items():
        vals = [_fmt(x) for x in row] + [cell.get(m, "") for m in present]
        vals.append(str(cell["positions"]))
        if cost:
            vals.append("" if cell["cost"] is None else f"{cell['cost']:.0f}")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def verdict_table(judged: Sequence[dict]) -> str:
    """The claims judged for one model (:func:`mtp_ext.evaluation.claims.judge`) as a markdown
    table: each dataset's difference with its 95% interval, then the verdict."""
    if not judged:
        return ""
    datasets = sorted({ds for j in judged for ds in j["datasets"]})
    head = ["claim (tested words, source)", "a - b"] + datasets + ["verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for j in judged:
        sides = f"{_side(j['a'])} - {_side(j['b'])}, {j['metric']}, t+{j['offset']}"
        cells = []
        for ds in datasets:
            d = j["datasets"].get(ds)
            cells.append("" if d is None else
                         f"{d['difference']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]")
        claim = f"{j['claim']} (\"{j['says']}\", {j['source']})"
        arrow = "higher" if j["direction"] > 0 else "lower"
        lines.append("| " + " | ".join([claim, f"{sides} ({arrow} claimed)"] + cells
                                       + [f"**{j['verdict']}**"]) + " |")
    return "\n".join(lines) + f"\n\nRule: {judged[0]['rule']}; contradicted when it excludes zero " \
        "the other way on as many; not reproduced otherwise.\n"


def _side(sel: dict) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in sel.items() if k != "method")
    return sel["method"] + (f" ({extra})" if extra else "")


def _select(records, **want):
    out = []
    for r in records:
        ok = True
        for k, v in want.items():
            if callable(v):
                ok = ok and v(r[k])
            else:
                ok = ok and r[k] == v
        if ok:
            out.append(r)
    return out


def markdown_tables(records: Sequence[dict]) -> str:
    """The report's tables, one section per model."""
    parts = []
    for model in sorted({r["model"] for r in records}):
        rs = _select(records, model=model)
        parts.append(f"## {model}\n")
        sections = [
            ("Next-token prediction (offset 1)", _select(rs, method="ntp"), ("dataset",)),
            ("Marginalization for t+2 (renormalized; ranking metrics are the same without)",
             _select(rs, method="marginal", offset=2), ("dataset", "k")),
            ("Marginalization for t+3 (k per level, k^2 paths)",
             _select(rs, method="marginal", offset=3), ("dataset", "k")),
            ("NLL without renormalization", _select(rs, method="marginal_raw"),
             ("dataset", "offset", "k")),
            ("Exact t+2 marginal on a slice, and the top-k marginals' total variation distance to it",
             _select(rs, method="marginal_slice"), ("dataset", "k")),
            ("Heads on the frozen backbone by layer (0 = embeddings)",
             _select(rs, method="head_frozen"), ("dataset", "offset", "layer")),
            ("Other heads (WHS, joint variants, shipped) and the backbone's NTP after joint training",
             _select(rs, method=lambda m: m.startswith(("head_", "ntp_")) and m != "head_frozen"),
             ("dataset", "method", "offset")),
        ]
        for title, sel, rows in sections:
            if not sel:
                continue
            metrics = _METRICS + (("tv_exact",) if "slice" in title else ())
            parts.append(f"### {title}\n\n{pivot(sel, rows, metrics)}\n")
        table = verdict_table(judge(rs))
        if table:
            parts.append(f"### Verdicts\n\n{table}")
    return "\n".join(parts)


def _style(ax, xlabel: str, ylabel: str, title: str, log2: bool = False) -> None:
    if log2:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, out_dir: str, name: str, paths: list[str]) -> None:
    fig.tight_layout()
    paths.append(os.path.join(out_dir, name))
    fig.savefig(paths[-1], dpi=110)
    fig.clf()


def plot_figures(records: Sequence[dict], out_dir: str) -> list[str]:
    """PNG figures (accuracy against k, against layer, method comparison, convergence to the
    exact marginal); returns their paths. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    models = sorted({r["model"] for r in records})
    datasets = sorted({r["dataset"] for r in records})

    def series(sel, x_field):
        d = defaultdict(list)
        for r in sel:
            d[r["dataset"]].append((r[x_field], r["value"], r.get("lo"), r.get("hi")))
        return {k: sorted(v, key=lambda p: p[0]) for k, v in d.items()}

    def draw(ax, pts, style, **kw):
        """A line through ``(x, value, lo, hi)`` points, with the 95% intervals as error bars
        where every point has one."""
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        if pts and all(p[2] is not None and p[3] is not None for p in pts):
            err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
            ax.errorbar(x, y, yerr=err, fmt=style, capsize=2, **kw)
        else:
            ax.plot(x, y, style, **kw)

    # 1. accuracy against k (t+2 and t+3), per model
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, off in enumerate((2, 3)):
            ax = axes[i][j]
            for metric, style in (("top1_text", "-o"), ("top1_greedy", "--s")):
                sel = _select(records, model=model, method="marginal", offset=off, metric=metric)
                for n, (ds, pts) in enumerate(series(sel, "k").items()):
                    draw(ax, pts, style, color=f"C{n}", label=f"{ds} ({metric.split('_')[1]})")
            _style(ax, "k (intermediate tokens per level)", "top-1 accuracy",
                   f"{model}: marginalization for t+{off}", log2=True)
    _save(fig, out_dir, "accuracy_vs_k.png", paths)
    plt.close(fig)

    # 2. heads' accuracy against layer
    with_layers = [m for m in models if _select(records, model=m, method="head_frozen")]
    if with_layers:
        fig, axes = plt.subplots(len(with_layers), 2, figsize=(11, 3.8 * len(with_layers)),
                                 squeeze=False)
        for i, model in enumerate(with_layers):
            for j, metric in enumerate(("top1_text", "top1_greedy")):
                ax = axes[i][j]
                sel = _select(records, model=model, method="head_frozen", offset=2, metric=metric)
                for n, (ds, pts) in enumerate(series(sel, "layer").items()):
                    draw(ax, pts, "-o", color=f"C{n}", label=ds)
                    whs = _select(records, model=model, method="head_whs", offset=2, metric=metric,
                                  dataset=ds)
                    if whs:
                        ax.axhline(whs[0]["value"], color=f"C{n}", ls=":", lw=1)
                _style(ax, "hidden state the head reads (0 = embeddings)",
                       f"t+2 {metric.replace('_', ' vs ')}",
                       f"{model}: frozen-backbone head (dotted: WHS)")
        _save(fig, out_dir, "heads_vs_layer.png", paths)
        plt.close(fig)

    # 3. method comparison at t+2
    for model in models:
        methods = []
        rs = _select(records, model=model, offset=2, metric="top1_text")
        ks = sorted({r["k"] for r in rs if r["method"] == "marginal"})
        if ks:
            methods.append((f"marginal k={ks[-1]}", dict(method="marginal", k=ks[-1])))
            methods.append(("marginal k=1", dict(method="marginal", k=1)))
        layers = sorted({r["layer"] for r in rs if r["method"] == "head_frozen"})
        if layers:
            methods.append((f"head, layer {layers[-1]}", dict(method="head_frozen", layer=layers[-1])))
            best = max(layers, key=lambda lay: sum(r["value"] for r in rs if r["method"] == "head_frozen" and r["layer"] == lay))
            if best != layers[-1]:
                methods.append((f"head, layer {best}", dict(method="head_frozen", layer=best)))
        for m in sorted({r["method"] for r in rs if r["method"].startswith("head_") and r["method"] != "head_frozen"}):
            label = m.removeprefix("head_")
            if label == "shipped":
                label = "shipped (conditioned: sees x_t+1)"
            methods.append((label, dict(method=m)))
        if not methods:
            continue
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(methods) * 1.2), 4))
        width = 0.8 / max(1, len(datasets))
        for n, ds in enumerate(datasets):
            vals, err = [], [[], []]
            for _, want in methods:
                sel = _select(rs, dataset=ds, **want)
                r = sel[0] if sel else {"value": 0.0}
                vals.append(r["value"])
                has = r.get("lo") is not None and r.get("hi") is not None
                err[0].append(r["value"] - r["lo"] if has else 0.0)
                err[1].append(r["hi"] - r["value"] if has else 0.0)
            ax.bar([i + n * width for i in range(len(methods))], vals, width, label=ds,
                   yerr=err, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))])
        ax.set_xticklabels([m[0] for m in methods], rotation=20, ha="right", fontsize=8)
        _style(ax, "", "t+2 top-1 accuracy (text)", f"{model}: predicting t+2")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        _save(fig, out_dir, f"methods_t2_{safe}.png", paths)
        plt.close(fig)

    # 4. convergence of top-k marginals to the exact one
    tv = _select(records, method="marginal_slice", metric="tv_exact")
    if tv:
        fig, ax = plt.subplots(figsize=(6, 4))
        n = 0
        for model in models:
            for ds, pts in series(_select(tv, model=model), "k").items():
                pts = [p for p in pts if p[1] > 0 or p[0] < max(q[0] for q in pts)]
                draw(ax, pts, "-o", color=f"C{n}", label=f"{model} {ds}")
                n += 1
        _style(ax, "k", "total variation to the exact marginal",
               "top-k marginalization converging (t+2)", log2=True)
        _save(fig, out_dir, "exact_convergence.png", paths)
        plt.close(fig)
    return paths


def write_report(results: Sequence[dict], out_dir: str, plot: bool = False,
                 command: str | None = None) -> dict:
    """Writes ``results.json`` (every record with its per-window sums, timings, configs, the
    claims' verdicts), ``results.md`` (tables with 95% intervals, verdicts) and,
    with ``plot``, PNG figures into ``out_dir``. ``results`` are :func:`evaluate` returns."""
    os.makedirs(out_dir, exist_ok=True)
    records = [r for res in results for r in res["records"]]
    meta = [{k: v for k, v in res.items() if k != "records"} for res in results]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"command": command, "runs": meta, "records": records,
                   "verdicts": judge(records)}, f, indent=1, default=str)
    md = "# mtp_ext evaluation\n\n"
    if command:
        md += f"Command: `{command}`\n\n"
    md += markdown_tables(records)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    figures = plot_figures(records, out_dir) if plot else []
    return {"json": os.path.join(out_dir, "results.json"),
            "markdown": os.path.join(out_dir, "results.md"), "figures": figures}
