"""Records of :func:`mtp_ext.evaluation.evaluate` as JSON, markdown tables and PNG figures."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Iterable, Sequence

__all__ = ["write_report", "markdown_tables", "pivot", "plot_figures"]

_METRICS = ("top1_text", "top5_text", "top1_greedy", "top5_greedy", "nll_text", "mass")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def pivot(records: Iterable[dict], rows: Sequence[str], metrics: Sequence[str] = _METRICS,
          cost: bool = True) -> str:
    """A markdown table: one row per distinct ``rows`` fields, one column per metric (mean
    values), plus the positions and the tokens the model evaluated per position."""
    table: dict[tuple, dict] = {}
    for r in records:
        row = tuple(r[f] for f in rows)
        cell = table.setdefault(row, {"positions": r["positions"], "cost": None})
        cell[r["metric"]] = r["value"]
        if r["metric"] in ("top1_text", "nll_text", "tv_exact"):
            cell["positions"] = r["positions"]
            if r["positions"]:
                cell["cost"] = r["model_tokens"] / r["positions"]
    present = [m for m in metrics if any(m in c for c in table.values())]
    head = list(rows) + present + ["positions"] + (["tokens/position"] if cost else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cell in table.items():
        vals = [_fmt(x) for x in row] + [_fmt(cell.get(m)) for m in present]
        vals.append(str(cell["positions"]))
        if cost:
            vals.append("" if cell["cost"] is None else f"{cell['cost']:.0f}")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


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
            d[r["dataset"]].append((r[x_field], r["value"]))
        return {k: sorted(v) for k, v in d.items()}

    # 1. accuracy against k (t+2 and t+3), per model
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.8 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, off in enumerate((2, 3)):
            ax = axes[i][j]
            for metric, style in (("top1_text", "-o"), ("top1_greedy", "--s")):
                sel = _select(records, model=model, method="marginal", offset=off, metric=metric)
                for n, (ds, pts) in enumerate(series(sel, "k").items()):
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{n}",
                            label=f"{ds} ({metric.split('_')[1]})")
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
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{n}", label=ds)
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
            vals = []
            for _, want in methods:
                sel = _select(rs, dataset=ds, **want)
                vals.append(sel[0]["value"] if sel else 0.0)
            ax.bar([i + n * width for i in range(len(methods))], vals, width, label=ds)
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
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{n}",
                        label=f"{model} {ds}")
                n += 1
        _style(ax, "k", "total variation to the exact marginal",
               "top-k marginalization converging (t+2)", log2=True)
        _save(fig, out_dir, "exact_convergence.png", paths)
        plt.close(fig)
    return paths


def write_report(results: Sequence[dict], out_dir: str, plot: bool = False,
                 command: str | None = None) -> dict:
    """Writes ``results.json`` (every record, timings, configs), ``results.md`` (tables) and,
    with ``plot``, PNG figures into ``out_dir``. ``results`` are :func:`evaluate` returns."""
    os.makedirs(out_dir, exist_ok=True)
    records = [r for res in results for r in res["records"]]
    meta = [{k: v for k, v in res.items() if k != "records"} for res in results]
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"command": command, "runs": meta, "records": records}, f, indent=1, default=str)
    md = "# mtp_ext evaluation\n\n"
    if command:
        md += f"Command: `{command}`\n\n"
    md += markdown_tables(records)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    figures = plot_figures(records, out_dir) if plot else []
    return {"json": os.path.join(out_dir, "results.json"),
            "markdown": os.path.join(out_dir, "results.md"), "figures": figures}
