"""Several heads side by side end to end: ``mtp_ext.generate`` with each heads folder against
``model.generate`` on the prompt sets of ``bench/generate_speed.py``, in one process.

For every prompt and round, ``model.generate`` runs once and then ``mtp_ext.generate`` once per
heads, interleaved. Per heads and set the table gives the median over prompts of the speed-up
over ``model.generate`` (time per token, same round), the lowest speed-up, the median tokens per
tree step, and how many prompts gave exactly ``model.generate``'s tokens. Greedy, float32 by
default, no tree passed (``mtp_ext.generate``'s controller decides).

    python bench/heads_e2e.py --heads shipped --heads EAGLE/heads --set both --json out.json
    python bench/heads_e2e.py --heads KINDS/conditioned --heads KINDS/eagle3 --set chat \\
        --new-tokens 64

Importing this file runs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generate_speed as gs  # noqa: E402  (bench/generate_speed.py: prompts, timing helpers)

import mtp_ext  # noqa: E402
from mtp_ext.heads import MTPHeads, shipped_heads_dir  # noqa: E402


def heads_label(path: str) -> str:
    """A short name for a ``--heads`` value: ``shipped`` or the folder (without a final
    ``/heads``)."""
    if path == "shipped":
        return path
    p = Path(path)
    return str(p.parent if p.name == "heads" else p)


def load_all(model, paths: list[str]) -> dict[str, MTPHeads]:
    dtype = model.get_output_embeddings().weight.dtype
    out = {}
    for path in paths:
        folder = shipped_heads_dir("smollm2-135m") if path == "shipped" else path
        heads = MTPHeads.from_pretrained(folder, model, dtype=dtype).eval()
        out[heads_label(path)] = heads
    return out


def bench_prompt(model, all_heads: dict, ids: torch.Tensor, new_tokens: int, rounds: int,
                 mtp_kw: dict) -> dict:
    """Per heads: ``{"speedup", "tokens_per_step", "identical"}`` (medians over rounds)."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    P = ids.shape[1]
    model.generate(ids, **kw)  # warm-up
    for heads in all_heads.values():
        mtp_ext.generate(model, ids, heads, max_new_tokens=4, do_sample=False, **mtp_kw)
    per = {name: {"ratio": [], "tps": [], "same": True} for name in all_heads}
    for _ in range(rounds):
        ref, t_hf = gs.timed(lambda: model.generate(ids, **kw))
        n_ref = max(1, ref.shape[1] - P)
        for name, heads in all_heads.items():
            out, t = gs.timed(lambda: mtp_ext.generate(model, ids, heads, return_dict_in_generate=True,
                                                       **mtp_kw, **kw))
            n = max(1, out.sequences.shape[1] - P)
            per[name]["ratio"].append((t_hf / n_ref) / (t / n))
            per[name]["tps"].append(out.tokens_per_step)
            per[name]["same"] &= torch.equal(out.sequences, ref)
    return {name: {"speedup": statistics.median(r["ratio"]),
                   "tokens_per_step": statistics.median(r["tps"]), "identical": bool(r["same"])}
            for name, r in per.items()}


def summarize(rows: list[tuple[str, dict]], names: list[str]) -> dict:
    """Per heads over the prompts: median and lowest speed-up (and its prompt), median tokens per
    step, identical count."""
    out = {}
    for name in names:
        sp = [(r[name]["speedup"], label) for label, r in rows]
        out[name] = {
            "median_speedup": statistics.median(s for s, _ in sp),
            "lowest_speedup": min(sp)[0], "lowest_prompt": min(sp)[1],
            "median_tokens_per_step": statistics.median(r[name]["tokens_per_step"]
                                                        for _, r in rows),
            "identical": sum(r[name]["identical"] for _, r in rows), "prompts": len(rows),
        }
    return out


def markdown(result: dict) -> str:
    m = result["meta"]
    lines = [f"{m['where']}; {m['dtype']}, greedy, "
             f"{m['new_tokens']} new tokens, {m['rounds']} round(s), tree: {m['tree']}.", ""]
    for name, summ in result["sets"].items():
        lines += [f"**{name}** ({next(iter(summ.values()))['prompts']} prompts): mtp_ext.generate "
                  "over model.generate", "",
                  "| heads | median | lowest (prompt) | tokens per step | identical |",
                  "|---|---|---|---|---|"]
        for heads, s in summ.items():
            lines.append(f"| {heads} | {s['median_speedup']:.2f}x | {s['lowest_speedup']:.2f}x "
                         f"({s['lowest_prompt']}) | {s['median_tokens_per_step']:.2f} | "
                         f"{s['identical']}/{s['prompts']} |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", action="append", required=True,
                   help="heads folder or 'shipped'; repeat to compare several")
    p.add_argument("--set", default="chat", choices=[*gs.SETS, "both"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per set")
    p.add_argument("--tree", default=None, help="node count or 'chain' (default: controller)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if len(set(map(heads_label, args.heads))) != len(args.heads):
        p.error("--heads: two values name the same heads")
    if args.new_tokens < 1 or args.rounds < 1:
        p.error("--new-tokens and --rounds must be at least 1")
    return args


def main(argv=None) -> dict:
    import transformers

    from mtp_ext.data.assets import load_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mtp_kw = {}
    if args.tree is not None:
        mtp_kw["tree"] = int(args.tree) if args.tree.isdigit() else args.tree
    model, tokenizer = load_model("smollm2-135m", getattr(torch, args.dtype))
    all_heads = load_all(model, args.heads)
    sets = list(gs.SETS) if args.set == "both" else [args.set]
    result = {"meta": {"where": gs.machine_line(torch.device("cpu")), "torch": torch.__version__,
                       "transformers": transformers.__version__, "threads": args.threads,
                       "dtype": args.dtype, "new_tokens": args.new_tokens,
                       "rounds": args.rounds, "tree": args.tree or gs.TREE_DEFAULT,
                       "heads": args.heads},
              "sets": {}, "prompts": {}}
    with torch.no_grad():
        for name in sets:
            ps = (gs.prompts(tokenizer, 2, 64) if name == "continuation"
                  else gs.chat_prompts(tokenizer))
            rows = []
            for label, ids in gs.spread(ps, args.limit):
                rows.append((label, bench_prompt(model, all_heads, ids, args.new_tokens,
                                                 args.rounds, mtp_kw)))
                print(name, label, json.dumps(rows[-1][1]), flush=True)
            result["prompts"][name] = dict(rows)
            result["sets"][name] = summarize(rows, list(all_heads))
    return gs.emit(result, markdown(result), args.json)


if __name__ == "__main__":
    main()
