"""Agreement of heads with the backbone on its own chat answers: per depth, top-1 / top-5 of the
backbone's greedy token, scored only where the predicted token lies inside an answer (never on the
request's own text).

The data is a folder written by ``mtp-ext chat-data`` (``OUT/validation``: requests built from
the validation splits, held out from training). Each conversation runs once through the backbone;
every heads folder is scored on the same positions with teacher forcing (a depth-``d`` head reads
the true tokens before it: the case that matters in a tree, where a node is only reached when its
parent was accepted).

    python bench/chat_agreement.py --data OUT/validation --heads shipped --heads DIR [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mtp_ext.data.assets import load_model
from mtp_ext.data.chat_answers import load_chat_data
from mtp_ext.heads import MTPHeads, shipped_heads_dir
from mtp_ext.machine import describe_cpu


def answer_mask(record: dict, length: int) -> torch.Tensor:
    """``[length]`` bool: the positions of ``record["ids"]`` that hold answer tokens."""
    mask = torch.zeros(length, dtype=torch.bool)
    for a, b in record["answer_spans"]:
        mask[a:min(b, length)] = True
    return mask


@torch.no_grad()
def score(heads: MTPHeads, hidden_states, ids: torch.Tensor, greedy: torch.Tensor,
          in_answer: torch.Tensor, k: int = 5) -> torch.Tensor:
    """``[H, 3]`` float64 sums (top-1 hits, top-k hits, counted positions) of one conversation:
    ``ids``, ``greedy`` (the backbone's argmax at each position) and ``in_answer`` all ``[1, L]``.
    Head ``d`` at position ``t`` predicts the token at ``t + 1 + d``: its target is
    ``greedy[t + d]``, counted where ``t + 1 + d`` is an answer position."""
    H = heads.config.num_heads
    L = ids.shape[1]
    nt = MTPHeads.teacher_tokens(ids, H)
    logits = heads(hidden_states, nt).float()  # [1, L, H, V']
    top = logits.topk(k, -1).indices
    if heads.vocab_ids is not None:
        top = heads.vocab_ids[top]
    out = torch.zeros(H, 3, dtype=torch.float64)
    for d in range(1, H + 1):
        n = L - 1 - d
        if n <= 0:
            continue
        target = greedy[0, d : d + n]
        counted = in_answer[0, 1 + d : 1 + d + n]
        hits = top[0, :n, d - 1] == target[:, None]
        out[d - 1, 0] += (hits[:, 0] & counted).sum()
        out[d - 1, 1] += (hits.any(-1) & counted).sum()
        out[d - 1, 2] += counted.sum()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a chat-data folder (e.g. OUT/validation)")
    p.add_argument("--heads", action="append", required=True,
                   help="a heads folder, or 'shipped' (repeat to compare)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--max-len", type=int, default=768, help="tokens per conversation, at most")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, _ = load_model(args.model)
    records = sorted(load_chat_data(args.data), key=lambda r: r["id"])[: args.max_records]
    names = [shipped_heads_dir(args.model) if h == "shipped" else h for h in args.heads]
    all_heads = [MTPHeads.from_pretrained(n, model, dtype=torch.float32).eval() for n in names]
    sums = [torch.zeros(h.config.num_heads, 3, dtype=torch.float64) for h in all_heads]
    with torch.no_grad():
        for r in records:
            ids = torch.tensor(r["ids"][: args.max_len])[None]
            out = model(ids, output_hidden_states=True)
            greedy = out.logits.argmax(-1)
            in_answer = answer_mask(r, ids.shape[1])[None]
            for i, h in enumerate(all_heads):
                sums[i] += score(h, out.hidden_states, ids, greedy, in_answer)
    rows = []
    for label, h, s in zip(args.heads, all_heads, sums):
        per = [{"depth": d + 1, "top1": float(s[d, 0] / s[d, 2]), "top5": float(s[d, 1] / s[d, 2]),
                "positions": int(s[d, 2])} for d in range(h.config.num_heads)]
        rows.append({"heads": label, "kind": h.config.kind, "depths": per})
    result = {"cpu": describe_cpu(), "torch": torch.__version__, "data": args.data,
              "records": len(records), "seconds": round(time.perf_counter() - t0, 1),
              "rows": rows}
    print(f"{len(records)} conversations of {args.data}; top-1 / top-5 of the backbone's greedy "
          "token at answer positions", file=sys.stderr)
    for row in rows:
        cells = " | ".join(f"{d['top1']:.3f} / {d['top5']:.3f}" for d in row["depths"])
        print(f"| {row['heads']} ({row['kind']}) | {cells} | {row['depths'][0]['positions']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
