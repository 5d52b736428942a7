"""What one tree step costs against one plain decode step, for tree sizes T = 1..64, on a random-
weight model of a real shape (the cost of a forward pass does not depend on the weights' values).

For each T, with a key/value cache of ``--prefix`` tokens, medians over ``--reps`` interleaved
repetitions (the cache is cut back to the prefix after each):

* ``plain``: one decode step as ``model.generate`` runs it: the causal LM over one new token per
  row, then the argmax of its logits;
* ``tree forward``: the tree's attention mask, the decoder over its T nodes and the greedy
  verification from the hidden states (``verify_tree_from_hidden``), without drafting;
* ``tree step``: :func:`mtp_ext.tree_step.run_step` whole: drafting a dynamic tree of T nodes with
  three fresh conditioned heads, the above, the one host read and the cache compaction.

The ratio ``tree step / plain`` is what a tree must win back in accepted tokens per step: with
``a`` tokens per step at size T, decoding speeds up by ``a / ratio``. Every timed call ends with a
device synchronization. Before timing, the tree forward's greedy token at each root is compared
with the plain step's (column "root agrees": bfloat16 sums in another order may flip a near-tie).

    python bench/tree_step_cost.py --device cuda --shape llama-1b --out results/
    python bench/tree_step_cost.py --device cpu --shape tiny --reps 3     # dry run

Writes tree_step_cost.json and tree_step_cost.md into --out (default: $OUT, else the current
directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch

from mtp_ext import ops
from mtp_ext.hf_compat import cache_kwarg, crop_cache, last_logits_kwarg
from mtp_ext.heads import MTPHeads
from mtp_ext.tree_step import DecodeState, backbone, run_step, start_state, tree_mask
from mtp_ext.trees import DynamicTree, build_tree

# Llama 3.2 1B's shape (tied embeddings, grouped-query attention), and a tiny one for dry runs.
SHAPES = {
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     rope_theta=500000.0),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rope_theta=100000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
}
WIDTH = 8  # a dynamic tree's width: 3 heads give a pool of 1 + 8 + 64 + 64 nodes


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight LlamaForCausalLM of the named shape, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(tie_word_embeddings=True, max_position_embeddings=8192, **SHAPES[shape])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """The model with a cache holding ``prefix`` tokens per row, and a decoding state over it
    that every timed call starts from."""

    def __init__(self, model, heads: MTPHeads, batch: int, prefix: int, device: torch.device):
        from transformers import DynamicCache

        self.model, self.heads, self.device, self.prefix = model, heads, device, prefix
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (batch, prefix + 1), generator=g).to(device)
        self.cache = DynamicCache()
        with torch.no_grad():
            self.prompt_out = model(ids[:, :prefix], use_cache=True, output_hidden_states=True,
                                    **cache_kwarg(model, self.cache), **last_logits_kwarg(model))
        self.root = ids[:, prefix]
        self.settings = SimpleNamespace(do_sample=False)

    def state(self) -> DecodeState:
        crop_cache(self.cache, self.prefix)
        B = self.root.shape[0]
        valid = torch.ones(B, self.prefix, dtype=torch.bool, device=self.device)
        pos = torch.arange(self.prefix, device=self.device).expand(B, -1)
        return start_state(self.model, self.heads, self.cache, self.prompt_out, valid, pos,
                           self.root.clone())

    @torch.no_grad()
    def plain(self) -> torch.Tensor:
        crop_cache(self.cache, self.prefix)
        out = self.model(self.root[:, None], use_cache=True, **cache_kwarg(self.model, self.cache))
        return out.logits[:, -1].argmax(-1)

    @torch.no_grad()
    def tree_forward(self, tree) -> torch.Tensor:
        state = self.state()
        mask, pos = tree_mask(state, tree.parents, self.heads.lm_head_weight.dtype, ops)
        base = backbone(self.model)
        out = base(tree.tokens.clamp(min=0), attention_mask=mask, position_ids=pos, use_cache=True,
                   **cache_kwarg(base, self.cache))
        _, tokens, _ = ops.verify_tree_from_hidden(
            tree.tokens, tree.parents, out.last_hidden_state,
            self.model.get_output_embeddings().weight,
        )
        return tokens

    @torch.no_grad()
    def tree_step(self, spec: DynamicTree):
        return run_step(self.model, self.heads, self.state(), spec, self.settings, None, ops)


def interleaved(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds of each function, called round-robin (one call each per round)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(bench: Bench, sizes: list[int], reps: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        for T in sizes:
            spec = DynamicTree(T, min(WIDTH, max(1, T - 1)))
            state = bench.state()
            tree = build_tree(bench.heads, state.feature, state.root, spec)
            agrees = float((bench.tree_forward(tree)[:, 0] == bench.plain()).float().mean())
            ms = interleaved({
                "plain": bench.plain,
                "tree_forward": lambda: bench.tree_forward(tree),
                "tree_step": lambda: bench.tree_step(spec),
            }, reps, bench.device)
            row = {"batch": int(bench.root.shape[0]), "T": int(tree.size), **ms, "root_agrees": agrees,
                   "forward_ratio": ms["tree_forward"] / ms["plain"],
                   "step_ratio": ms["tree_step"] / ms["plain"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"One tree step against one plain decode step: {meta['shape']} shape, random weights, "
        f"{meta['dtype']}, {meta['prefix']} cached tokens, on {meta['where']}; medians of "
        f"{meta['reps']} interleaved repetitions; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, {meta['date']}.",
        "",
        "| batch | T | plain step ms | tree forward ms | tree step ms | tree forward / plain | tree step / plain | root agrees |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['T']} | {r['plain']:.2f} | {r['tree_forward']:.2f} | "
            f"{r['tree_step']:.2f} | {r['forward_ratio']:.2f}x | {r['step_ratio']:.2f}x | "
            f"{r['root_agrees']:.0%} |"
        )
    lines += ["", f"Command: `{meta['command']}`"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    p.add_argument("--sizes", default="1,2,4,8,16,24,32,48,64")
    p.add_argument("--batch", default="1", help="batch sizes, comma-separated")
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = random_model(args.shape, device, dtype)
    heads = MTPHeads.for_model(model, 3, kind="conditioned")
    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        bench = Bench(model, heads, batch, args.prefix, device)
        rows += measure(bench, [int(s) for s in args.sizes.split(",")], args.reps)
        del bench
    import sys

    import transformers

    meta = {
        "shape": args.shape, "dtype": args.dtype, "prefix": args.prefix,
        "reps": args.reps, "torch": torch.__version__, "transformers": transformers.__version__,
        "where": (torch.cuda.get_device_name(device) if device.type == "cuda"
                  else f"{torch.get_num_threads()} CPU threads, {platform.machine()}"),
        "date": datetime.date.today().isoformat(),
        "command": "python bench/tree_step_cost.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tree_step_cost.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = markdown(rows, meta)
    with open(os.path.join(args.out, "tree_step_cost.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
