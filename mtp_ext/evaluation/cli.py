"""``mtp-ext eval``: the evaluation harness from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

__all__ = ["add_parser", "run"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="re-measure NTP, marginalization and MTP heads on a model (mtp_ext.evaluation)",
        description="Teacher-forced evaluation of next-token prediction, numerical "
        "marginalization (t+2, t+3) and MTP heads (layer grid, WHS, joint training) on the "
        "project's texts. Writes results.json, results.md and, with --plot, PNG figures.",
    )
    p.add_argument("--model", action="append", default=None,
                   help="known model name or transformers causal-LM folder (repeat for several; "
                        "default smollm2-135m)")
    p.add_argument("--datasets", default="en-es,web,austen,python",
                   help="comma-separated: en-es, web, austen, python")
    p.add_argument("--split", default="test", choices=("train", "validation", "test"))
    p.add_argument("--quick", action="store_true",
                   help="every method on a few short samples with tiny training runs (minutes)")
    p.add_argument("--samples", type=int, default=None, help="samples per dataset")
    p.add_argument("--seq-len", type=int, default=None, help="sample length in tokens")
    p.add_argument("--ks", type=_ints, default=None, help="k values for t+2, e.g. 1,2,4,8,16,32")
    p.add_argument("--ks3", type=_ints, default=None, help="k per level for t+3, e.g. 1,2,4")
    p.add_argument("--exact-positions", type=int, default=None,
                   help="positions per dataset with the exact t+2 marginal (V + 1 tokens each)")
    p.add_argument("--chunk-nodes", type=int, default=None, help="branch tokens per forward")
    p.add_argument("--no-heads", action="store_true", help="skip the heads study")
    p.add_argument("--no-shipped", action="store_true", help="skip the shipped heads")
    p.add_argument("--layers", type=_ints, default=None,
                   help="hidden-state indices of the layer grid (default every --layer-step-th)")
    p.add_argument("--layer-step", type=int, default=None)
    p.add_argument("--head-steps", type=int, default=None, help="training steps per head set")
    p.add_argument("--head-kind", default=None, help="resblock (default), linear, conditioned")
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--train-tokens", type=int, default=None)
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="train the heads over the N most frequent tokens only (cheaper; no NLL)")
    p.add_argument("--no-whs", action="store_true")
    p.add_argument("--joint-variants", default=None,
                   help="comma-separated subset of heads-only,joint,joint+difflr,joint+difflr+warmup "
                        "('' for none)")
    p.add_argument("--joint-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="eval_results", help="output folder")
    p.add_argument("--plot", action="store_true", help="also write PNG figures (matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The :class:`EvalConfig` the arguments ask for."""
    from .samples import DATASETS
    from .study import EvalConfig, quick_config

    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise SystemExit(f"mtp-ext eval: unknown dataset(s) {unknown}; known: {list(DATASETS)}")
    cfg = quick_config() if args.quick else EvalConfig()
    over = dict(datasets=datasets, split=args.split, progress=not args.no_progress,
                shipped_heads=not args.no_shipped)
    for name in ("samples", "seq_len", "ks", "ks3", "exact_positions", "chunk_nodes"):
        if getattr(args, name) is not None:
            over[name] = getattr(args, name)
    heads = cfg.heads
    if args.no_heads:
        heads = None
    elif heads is not None:
        hover = {}
        pairs = (("layers", "layers"), ("layer_step", "layer_step"), ("head_steps", "steps"),
                 ("head_kind", "kind"), ("num_heads", "num_heads"),
                 ("train_tokens", "train_tokens"), ("draft_vocab", "draft_vocab"),
                 ("joint_steps", "joint_steps"))
        for arg, field in pairs:
            if getattr(args, arg) is not None:
                hover[field] = getattr(args, arg)
        if args.no_whs:
            hover["whs"] = False
        if args.joint_variants is not None:
            hover["joint_variants"] = tuple(v for v in args.joint_variants.split(",") if v)
        if args.seq_len is not None:
            hover["seq_len"] = args.seq_len
        heads = dataclasses.replace(heads, **hover)
    over["heads"] = heads
    return dataclasses.replace(cfg, **over)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.assets import load_model
    from .report import write_report
    from .study import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config(args)
    command = "mtp-ext eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 \
        and sys.argv[1] == "eval" else None
    results = []
    t0 = time.perf_counter()
    for name in args.model or ["smollm2-135m"]:
        model, tokenizer = load_model(name)
        model = model.to(args.device).eval()
        res = evaluate(model, tokenizer, config, model_name=name)
        results.append(res)
        del model
        paths = write_report(results, args.out, plot=args.plot, command=command)
    print(f"mtp-ext eval: {sum(len(r['records']) for r in results)} records in "
          f"{time.perf_counter() - t0:.0f} s -> {paths['markdown']}, {paths['json']}"
          + (f", {len(paths['figures'])} figures" if paths["figures"] else ""))
    return 0
