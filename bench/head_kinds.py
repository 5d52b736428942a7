"""Every head kind side by side on the same data and budget: per-head top-1 / top-5 agreement with
the backbone's greedy token on the validation split, and training time.

The data is a token file ``{"train": [N, T], "validation": [M, T]}`` (for example the ids of the
shipped heads' training cache, so the comparison sees exactly that data) or, without
``--tokens``, the project's texts. All kinds share one on-disk hidden-state cache.

    python bench/head_kinds.py --tokens tokens.pt --steps 600 --out results/head_kinds.md
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mtp_ext.data.assets import load_model
from mtp_ext.heads import MTPHeads
from mtp_ext.training import TrainConfig, train_heads

KINDS = ("resblock", "linear", "conditioned", "transformer")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", required=True, help="torch file {'train': ids, 'validation': ids}")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-positions", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help="markdown file for the table (and .json beside it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m")
    toks = torch.load(args.tokens, map_location="cpu", weights_only=True)
    rows = []
    for kind in args.kinds.split(","):
        torch.manual_seed(0)
        heads = MTPHeads.for_model(model, args.num_heads, kind=kind, draft_vocab_size=args.draft_vocab)
        cfg = TrainConfig(
            steps=args.steps, seq_len=toks["train"].shape[1], target="greedy", lr=args.lr,
            batch_positions=args.batch_positions, eval_every=0, cache_dir=args.cache_dir,
            progress=True,
        )
        t0 = time.perf_counter()
        res = train_heads(model, None, heads, toks["train"], toks["validation"], cfg)
        f = res["final"]
        rows.append({"kind": kind, "top1": f["top1_greedy"], "top5": f["top5_greedy"],
                     "train_s": res["timing"]["train_s"], "total_s": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    H = args.num_heads
    lines = [
        f"SmolLM2-135M, {args.num_heads} heads, draft vocabulary {args.draft_vocab}, greedy targets, "
        f"{args.steps} steps of {args.batch_positions} positions, lr {args.lr}, "
        f"{toks['train'].numel()} training tokens, {toks['validation'].numel()} validation tokens, "
        f"{torch.get_num_threads()} thread(s). Agreement with the backbone's greedy token on the "
        "validation split, top-1 / top-5:",
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
