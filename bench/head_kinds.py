"""Every head kind side by side on the same data and budget: per-head top-1 / top-5 agreement with
the backbone's greedy token on the validation split, and training time.

The data is a token file ``{"train": [N, T], "validation": [M, T]}`` (for example the ids of the
shipped heads' training cache, or the file ``mtp-ext chat-data --tokens-out`` packs). Kinds that
read the same hidden state share one on-disk hidden-state cache (``--cache-dir``); the EAGLE-3
layout (``eagle3``: kind ``"eagle"`` with three fused layers) caches its own.

    python bench/head_kinds.py --tokens tokens.pt --steps 600 --out results/head_kinds.md
    python bench/head_kinds.py --tokens chat_tokens.pt --kinds conditioned,eagle \\
        --lr 3e-3 --lr eagle=7e-4 --max-train-tokens 163840 --save-dir KINDS --out kinds.md

``--save-dir`` keeps each kind's trained heads (``DIR/<kind>``) so that they can be scored further,
for example on held-out chat answers with ``bench/chat_agreement.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from mtp_ext.data.assets import load_model
from mtp_ext.heads import MTPHeads
from mtp_ext.heads.eagle import default_fuse_layers
from mtp_ext.training import TrainConfig, train_heads

KINDS = ("resblock", "linear", "conditioned", "transformer", "eagle", "eagle3")


def parse_lrs(values: list[str], kinds: list[str]) -> dict[str, float]:
    """Learning rate per kind from ``--lr`` values: ``"3e-3"`` sets every kind, ``"eagle=7e-4"``
    one kind (later values win). Raises ``ValueError`` for a kind not compared or a bad number."""
    lrs = {k: 3e-3 for k in kinds}
    for v in values:
        kind, _, rate = v.rpartition("=")
        try:
            r = float(rate)
        except ValueError:
            raise ValueError(f"--lr {v!r}: not a number") from None
        if r <= 0:
            raise ValueError(f"--lr {v!r}: must be positive")
        if not kind:
            lrs = {k: r for k in kinds}
        elif kind not in lrs:
            raise ValueError(f"--lr {v!r}: {kind!r} is not among the kinds compared {kinds}")
        else:
            lrs[kind] = r
    return lrs


def make_heads(model, kind: str, num_heads: int, draft_vocab: int) -> MTPHeads:
    """Fresh heads of ``kind`` (``"eagle3"``: ``"eagle"`` fusing the default three layers)."""
    extra = {}
    if kind == "eagle3":
        kind = "eagle"
        extra = {"fuse_layers": default_fuse_layers(model.config.num_hidden_layers)}
    return MTPHeads.for_model(model, num_heads, kind=kind, draft_vocab_size=draft_vocab, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", required=True, help="torch file {'train': ids, 'validation': ids}")
    p.add_argument("--kinds", default="resblock,linear,conditioned,transformer",
                   help=f"comma-separated, from {', '.join(KINDS)}")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--lr", action="append", default=[],
                   help="learning rate, for every kind (3e-3) or one (eagle=7e-4); repeatable")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--batch-positions", type=int, default=512)
    p.add_argument("--max-train-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--save-dir", default=None, help="keep each kind's heads in DIR/<kind>")
    p.add_argument("--out", default=None, help="markdown file for the table (and .json beside it)")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        p.error(f"unknown kind(s) {bad}; choose from {list(KINDS)}")
    try:
        lrs = parse_lrs(args.lr, kinds)
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m")
    toks = torch.load(args.tokens, map_location="cpu", weights_only=True)
    rows = []
    for kind in kinds:
        torch.manual_seed(0)
        heads = make_heads(model, kind, args.num_heads, args.draft_vocab)
        cfg = TrainConfig(
            steps=args.steps, seq_len=toks["train"].shape[1], target="greedy", lr=lrs[kind],
            warmup_steps=args.warmup_steps, batch_positions=args.batch_positions, eval_every=0,
            cache_dir=args.cache_dir, max_train_tokens=args.max_train_tokens, progress=True,
        )
        t0 = time.perf_counter()
        res = train_heads(model, None, heads, toks["train"], toks["validation"], cfg)
        f = res["final"]
        if args.save_dir:
            heads.save_pretrained(os.path.join(args.save_dir, kind))
        rows.append({"kind": kind, "lr": lrs[kind], "top1": f["top1_greedy"],
                     "top5": f["top5_greedy"], "train_s": res["timing"]["train_s"],
                     "total_s": time.perf_counter() - t0, "train_tokens": res["train_tokens"]})
        print(json.dumps(rows[-1]), flush=True)
    H = args.num_heads
    ntrain = rows[0]["train_tokens"] if rows else 0
    lr_text = ", ".join(f"{k} {lrs[k]:g}" for k in kinds)
    lines = [
        f"SmolLM2-135M, {args.num_heads} heads, draft vocabulary {args.draft_vocab}, greedy targets, "
        f"{args.steps} steps of {args.batch_positions} positions, learning rates {lr_text}, "
        f"{ntrain} training tokens, {toks['validation'].numel()} validation tokens, "
        f"{torch.get_num_threads()} thread(s). Agreement with the backbone's greedy token on the "
        "validation split, top-1 / top-5 (head h predicts the token at t + 1 + h, given the true "
        "tokens before it):",
        "",
        "| kind | " + " | ".join(f"head {h + 1}" for h in range(H)) + " | training time |",
        "|---|" + "---|" * H + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(r["top1"], r["top5"]))
        lines.append(f"| {r['kind']} | {cells} | {r['train_s'] / 60:.1f} min |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
        with open(args.out.rsplit(".", 1)[0] + ".json", "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
