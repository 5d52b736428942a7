"""Decoding speed on a real model: ``mtp_ext.generate`` against ``model.generate`` and
transformers' prompt-lookup decoding, with identical-output checks.

SmolLM2-135M (float32 by default) with the shipped heads (or ``--heads DIR``), greedy, prompts cut
from the validation split of several texts (prose, translation, code). For every prompt the methods
run interleaved (one call each per round) and the table reports median tokens per second, the ratio
to ``model.generate`` measured in the same rounds, the mean tokens per tree step, and whether the
tokens equal ``model.generate``'s in every round. Then a left-padded batch of 4 and a sampling run.

    python bench/generate_speed.py                       # markdown on stdout
    python bench/generate_speed.py --json out.json --rounds 3 --tree 8
    python bench/generate_speed.py --device cuda --prompts bench/prompts/smollm2.json

``--save-prompts FILE`` writes the prompts' token ids, and ``--prompts FILE`` reads them instead of
the texts (for machines where the texts are not installed). On CUDA every timed call ends with a
device synchronization.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import mtp_ext
from mtp_ext.data.assets import load_model
from mtp_ext.data.texts import load_text
from mtp_ext.heads import MTPHeads

TEXTS = ("web", "austen", "python", "en-es")
MTP_KW: dict = {}  # extra arguments of every mtp_ext.generate call (set from the command line)


def prompts(tokenizer, per_text: int, length: int) -> list[tuple[str, torch.Tensor]]:
    """``(label, ids [1, P])``: the first ``length`` tokens of validation items of each text
    (items long enough; en-es pairs become 'English: ...\\nSpanish:' prompts)."""
    out = []
    for name in TEXTS:
        items = load_text(name, "validation")
        stride = max(1, len(items) // (3 * per_text))  # spread the prompts over the split
        taken = 0
        for i in range(0, len(items), stride):
            if name == "en-es":
                en = items[i].split("\t")[0]
                text = f"Translate into Spanish.\nEnglish: {en}\nSpanish:"
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
            else:
                ids = tokenizer(items[i][:20 * length], return_tensors="pt")["input_ids"]
                if ids.shape[1] < length:
                    continue
                ids = ids[:, :length]
            out.append((f"{name}#{i}", ids))
            taken += 1
            if taken == per_text:
                break
    return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    """``(fn(), seconds)``, the device's queued work included."""
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start


def save_prompts(path: str, ps: list[tuple[str, torch.Tensor]]) -> None:
    with open(path, "w") as f:
        json.dump([{"label": label, "ids": ids[0].tolist()} for label, ids in ps], f)


def read_prompts(path: str) -> list[tuple[str, torch.Tensor]]:
    with open(path) as f:
        return [(p["label"], torch.tensor([p["ids"]], dtype=torch.long)) for p in json.load(f)]


def bench_prompt(model, heads, ids, new_tokens: int, rounds: int, tree) -> dict:
    """Interleaved rounds of the three decoders on one prompt; medians."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    fns = {
        "hf": lambda: model.generate(ids, **kw),
        "pld": lambda: model.generate(ids, prompt_lookup_num_tokens=10, **kw),
        "mtp": lambda: mtp_ext.generate(model, ids, heads, tree=tree, return_dict_in_generate=True, **MTP_KW, **kw),
    }
    times = {k: [] for k in fns}
    same, steps_tokens = True, []
    fns["hf"]()  # warm-up
    for _ in range(rounds):
        outs = {}
        for name, fn in fns.items():
            outs[name], dt = timed(fn)
            times[name].append(dt)
        ref = outs["hf"]
        same &= torch.equal(outs["mtp"].sequences, ref) and torch.equal(outs["pld"], ref)
        steps_tokens.append(outs["mtp"].tokens_per_step)
    n = int(ref.shape[1] - ids.shape[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [h / m for h, m in zip(times["hf"], times["mtp"])]
    return {
        "new_tokens": n,
        "tok_s": {k: n / v for k, v in med.items()},
        "mtp_vs_hf": statistics.median(ratios),
        "pld_vs_hf": statistics.median([h / p for h, p in zip(times["hf"], times["pld"])]),
        "tokens_per_step": statistics.median(steps_tokens),
        "identical": bool(same),
    }


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS token (tokenizers converted from GGUF by some
    transformers releases have no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], attention_mask [B, P])`` from 1-D rows of different lengths, left-padded."""
    width = max(r.numel() for r in rows)
    ids = rows[0].new_full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


def bench_batch(model, heads, batch_ids, new_tokens: int, rounds: int, tree, tokenizer) -> dict:
    ids, mask = left_pad(batch_ids, pad_id(tokenizer))
    kw = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=mask)
    th, tm, same, tps = [], [], True, []
    model.generate(ids, **kw)
    for _ in range(rounds):
        ref, dt = timed(lambda: model.generate(ids, **kw))
        th.append(dt)
        out, dt = timed(lambda: mtp_ext.generate(model, ids, heads, tree=tree, return_dict_in_generate=True, **MTP_KW, **kw))
        tm.append(dt)
        same &= torch.equal(out.sequences, ref)
        tps.append(out.tokens_per_step)
    return {"batch": ids.shape[0], "mtp_vs_hf": statistics.median([h / m for h, m in zip(th, tm)]),
            "tokens_per_step": statistics.median(tps), "identical": bool(same)}


def bench_sampling(model, heads, ids, new_tokens: int, rounds: int, tree) -> dict:
    kw = dict(max_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    th, tm, tps = [], [], []
    for r in range(rounds):
        torch.manual_seed(r)
        ref, dt = timed(lambda: model.generate(ids, **kw))
        th.append(dt / (ref.shape[1] - ids.shape[1]))
        gen = torch.Generator(device=ids.device).manual_seed(r)
        out, dt = timed(lambda: mtp_ext.generate(model, ids, heads, tree=tree, generator=gen, return_dict_in_generate=True, **MTP_KW, **kw))
        tm.append(dt / int(out.new_tokens.sum()))
        tps.append(out.tokens_per_step)
    return {"settings": "temperature 0.7, top-p 0.9",
            "mtp_vs_hf": statistics.median([h / m for h, m in zip(th, tm)]),
            "tokens_per_step": statistics.median(tps)}


def markdown(rows, batch, sampling, meta) -> str:
    lines = [
        f"SmolLM2-135M {meta['dtype']}, {meta['where']}, greedy, {meta['new_tokens']} new tokens, "
        f"tree {meta['tree']}, heads {meta['heads']}, {meta['rounds']} interleaved rounds per prompt "
        f"(medians); torch {meta['torch']}, transformers {meta['transformers']}.",
        "",
        "| prompt | model.generate tok/s | prompt lookup tok/s | mtp_ext tok/s | mtp_ext / generate | prompt lookup / generate | tokens per step | identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        t = r["tok_s"]
        lines.append(
            f"| {label} | {t['hf']:.1f} | {t['pld']:.1f} | {t['mtp']:.1f} | {r['mtp_vs_hf']:.2f}x | "
            f"{r['pld_vs_hf']:.2f}x | {r['tokens_per_step']:.2f} | {'yes' if r['identical'] else 'NO'} |"
        )
    ratios = [r["mtp_vs_hf"] for _, r in rows]
    pld = [r["pld_vs_hf"] for _, r in rows]
    tps = [r["tokens_per_step"] for _, r in rows]
    lines += [
        f"| **median** | | | | **{statistics.median(ratios):.2f}x** | {statistics.median(pld):.2f}x | "
        f"{statistics.median(tps):.2f} | {'yes' if all(r['identical'] for _, r in rows) else 'NO'} |",
        "",
        f"Lowest ratio on any prompt: {min(ratios):.2f}x.",
        "",
        f"Batch {batch['batch']} (left-padded, the first prompt of each text): mtp_ext / generate "
        f"{batch['mtp_vs_hf']:.2f}x, {batch['tokens_per_step']:.2f} tokens per step, identical: "
        f"{'yes' if batch['identical'] else 'NO'}.",
        "",
        f"Sampling ({sampling['settings']}, first prompt, time per token): mtp_ext / generate "
        f"{sampling['mtp_vs_hf']:.2f}x, {sampling['tokens_per_step']:.2f} tokens per step.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default=None, help="heads folder (default: the shipped heads)")
    p.add_argument("--tree", default=None, help="node count or 'chain' (default: generate's)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-text", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lookup", type=int, default=None,
                   help="mtp_ext.generate's prompt_lookup_num_tokens (default: generate's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prompts", default=None, help="read the prompts' token ids from this JSON file")
    p.add_argument("--save-prompts", default=None, help="write the prompts' token ids to this file")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.lookup is not None:
        MTP_KW["prompt_lookup_num_tokens"] = args.lookup
    tree = int(args.tree) if args.tree and args.tree.isdigit() else args.tree
    model, tokenizer = load_model("smollm2-135m", getattr(torch, args.dtype))
    model.to(device)
    heads = (MTPHeads.from_pretrained(args.heads, model) if args.heads
             else mtp_ext.load_heads("smollm2-135m", model))
    ps = read_prompts(args.prompts) if args.prompts else prompts(tokenizer, args.per_text, args.prompt_tokens)
    if args.save_prompts:
        save_prompts(args.save_prompts, ps)
    ps = [(label, ids.to(device)) for label, ids in ps]
    if tree is None:  # profile (or read the cached profile) before anything is timed
        from mtp_ext.tree_tuning import auto_tree

        tree = auto_tree(model, heads, ps[0][1], progress=True)
        args.tree = f"{tree.size} (auto)"
    rows = []
    with torch.no_grad():
        for label, ids in ps:
            rows.append((label, bench_prompt(model, heads, ids, args.new_tokens, args.rounds, tree)))
            print(label, json.dumps(rows[-1]), flush=True)
        firsts: dict[str, torch.Tensor] = {}  # the first prompt of each text
        for label, ids in ps:
            firsts.setdefault(label.split("#")[0], ids[0])
        firsts = list(firsts.values())
        batch = bench_batch(model, heads, firsts, args.new_tokens, args.rounds, tree, tokenizer)
        print("batch", json.dumps(batch), flush=True)
        sampling = bench_sampling(model, heads, ps[0][1], args.new_tokens, args.rounds, tree)
        print("sampling", json.dumps(sampling), flush=True)
    import transformers

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{args.threads} threads on {platform.processor() or platform.machine()}")
    meta = {"dtype": args.dtype, "where": where, "threads": args.threads,
            "new_tokens": args.new_tokens, "tree": args.tree or "default",
            "heads": args.heads or "shipped", "rounds": args.rounds, "torch": torch.__version__,
            "transformers": transformers.__version__}
    print(markdown(rows, batch, sampling, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "prompts": rows, "batch": batch, "sampling": sampling}, f, indent=2)


if __name__ == "__main__":
    main()
