"""What a draft tree costs on CPU, against one plain decode step: small-row linears, tree forward,
verification from hidden states and fused heads, stock kernels against mtp_ext's.

Every measurement is checked for correctness first, then all variants of one row of the table are
timed interleaved (round-robin, one call each per round) in the same process, and medians are
reported. The model is SmolLM2-135M's architecture (30 layers, hidden 576, vocabulary 49152, tied
embeddings) with random weights: the cost of a forward pass does not depend on the values.

    python bench/tree_cost.py                      # float32, 2 threads, markdown table on stdout
    python bench/tree_cost.py --dtype bfloat16     # bfloat16 weights (both stock and ours)
    python bench/tree_cost.py --json results.json  # also write the raw medians
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import Callable

import torch
from torch.nn import functional as F

import mtp_ext
from mtp_ext import reference
from mtp_ext.hf_compat import cache_kwarg, crop_cache

PREFIX = 200  # tokens in the KV cache
TREE_SIZES = (4, 8, 16, 32, 64)
LINEAR_SHAPES = [(576, 576, "576 x 576 (q/o)"), (192, 576, "576 x 192 (k/v)"), (1536, 576, "576 x 1536 (up/gate)"), (576, 1536, "1536 x 576 (down)"), (49152, 576, "576 x 49152 (output)")]
LINEAR_ROWS = (2, 4, 8, 16, 32, 64)


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median milliseconds of each function, timed round-robin so drift hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def smollm2_shaped_model(dtype: torch.dtype):
    """A random-weight LlamaForCausalLM with SmolLM2-135M's configuration."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    return model


COLD_POOL_BYTES = 96 << 20  # > 2x the last-level cache: each call streams its weight from DRAM


def bench_linears(dtype: torch.dtype, rounds: int, cold: bool) -> list[dict]:
    """small_batch_linear against F.linear. With ``cold``, every call reads another copy of the
    weight from a pool larger than the caches, as inside a model's forward pass, where each layer's
    weights were evicted by the other layers'; otherwise the weight stays cache-resident."""
    rows_out = []
    for n, k, label in LINEAR_SHAPES:
        weight = torch.randn(n, k).to(dtype) * 0.02
        copies = max(1, -(-COLD_POOL_BYTES // (weight.numel() * weight.element_size()))) if cold else 1
        pool = [weight.clone() for _ in range(copies)]
        one = torch.randn(1, k).to(dtype)
        for m in LINEAR_ROWS:
            x = torch.randn(m, k).to(dtype)
            torch.testing.assert_close(
                mtp_ext.small_batch_linear(x, weight).float(),
                reference.small_batch_linear(x, weight).float(),
                rtol=2e-2 if dtype != torch.float32 else 1e-4,
                atol=2e-2 if dtype != torch.float32 else 1e-4,
            )
            # Each function starts a quarter of the pool further on, so no call in a round reads
            # a copy that another call of the same round just brought into the cache.
            cycles = [itertools.cycle(pool[j * len(pool) // 4:] + pool[: j * len(pool) // 4])
                      for j in range(4)]
            t = interleaved_medians(
                {
                    "torch_1row": lambda: F.linear(one, next(cycles[0])),
                    "ours_1row": lambda: mtp_ext.small_batch_linear(one, next(cycles[3])),
                    "torch": lambda: F.linear(x, next(cycles[1])),
                    "ours": lambda: mtp_ext.small_batch_linear(x, next(cycles[2])),
                },
                rounds,
            )
            rows_out.append({"shape": label, "M": m, "cold": cold, **t})
    return rows_out


def tree_inputs(t: int, vocab: int, gen: torch.Generator):
    parents = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, t)])
    draft = torch.randint(0, vocab, (1, t), generator=gen)
    return draft, parents


@torch.inference_mode()
def bench_tree(model, rounds: int) -> list[dict]:
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, PREFIX), generator=gen)
    cache = DynamicCache()
    model(prompt, use_cache=True, **cache_kwarg(model, cache))
    lm_head = model.lm_head.weight

    def crop() -> None:
        crop_cache(cache, PREFIX)

    def decode_step():
        out = model(prompt[:, -1:], use_cache=True, position_ids=torch.tensor([[PREFIX]]),
                    **cache_kwarg(model, cache))
        crop()
        return out.logits[:, -1].argmax(-1)

    results = []
    for t in TREE_SIZES:
        draft, parents = tree_inputs(t, vocab, gen)
        mask, depth = mtp_ext.tree_attention_mask(parents, PREFIX, dtype=lm_head.dtype)
        mask4 = mask[None, None]
        pos = (PREFIX + depth)[None]

        def stock_tree():
            out = model(draft, attention_mask=mask4, position_ids=pos, use_cache=True,
                        **cache_kwarg(model, cache))
            crop()
            return mtp_ext.verify_tree(draft, parents, out.logits)

        def fast_tree():
            with mtp_ext.fast_cpu(model):
                hidden = model.model(draft, attention_mask=mask4, position_ids=pos, use_cache=True,
                                     **cache_kwarg(model.model, cache)).last_hidden_state
            crop()
            # The backbone's output is already normed: norm weight None.
            return mtp_ext.verify_tree_from_hidden(draft, parents, hidden, lm_head)

        got, want = fast_tree(), stock_tree()
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        t_ms = interleaved_medians({"decode_step": decode_step, "stock_tree": stock_tree, "fast_tree": fast_tree}, rounds)
        results.append({"T": t, **t_ms, "same_result": same})
    return results


@torch.inference_mode()
def bench_verify_and_heads(model, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    lm_head = model.lm_head.weight
    d = lm_head.shape[1]
    vocab = lm_head.shape[0]
    hidden = torch.randn(1, 8, d, generator=gen).to(lm_head.dtype)
    draft, parents = tree_inputs(8, vocab, gen)
    one = hidden[0, :1]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            mtp_ext.verify_tree_from_hidden(draft, parents, hidden, lm_head),
            reference.verify_tree_from_hidden(draft, parents, hidden, lm_head),
        )
    )
    verify = interleaved_medians(
        {
            "output_layer_1row": lambda: F.linear(one, lm_head),
            "stock_8_nodes": lambda: mtp_ext.verify_tree(draft, parents, F.linear(hidden, lm_head)),
            "fused_8_nodes": lambda: mtp_ext.verify_tree_from_hidden(draft, parents, hidden, lm_head),
        },
        rounds,
    )
    heads = 3
    w = (torch.randn(heads, d, d, generator=gen) * 0.02).to(lm_head.dtype)
    b = torch.zeros(heads, d).to(lm_head.dtype)
    top_ids = torch.arange(16384)
    sub_table = lm_head[top_ids].contiguous()
    ours, ref = mtp_ext.fused_mtp_heads(one, w, b, lm_head, 8), reference.fused_mtp_heads(one, w, b, lm_head, 8)
    assert torch.equal(ours[1], ref[1])

    def separate_heads():
        x = one.float()
        outs = []
        for h in range(heads):
            z = x + F.silu(F.linear(x, w[h].float(), b[h].float()))
            logits = F.linear(z.to(lm_head.dtype), lm_head)
            outs.append(torch.topk(torch.log_softmax(logits.float(), -1), 8))
        return outs

    head_t = interleaved_medians(
        {
            "separate_3_heads": separate_heads,
            "fused_3_heads": lambda: mtp_ext.fused_mtp_heads(one, w, b, lm_head, 8),
            "fused_3_heads_draft16k": lambda: mtp_ext.fused_mtp_heads(one, w, b, sub_table, 8, vocab_ids=top_ids),
        },
        rounds,
    )
    return {"verify": verify, "heads": head_t}


def linears_markdown(linears) -> list[str]:
    """The linear table: both kernels at 1 and M rows; "best M / best 1 row" is what a per-machine
    choice (``mtp_ext.linear_choice``: the faster kernel per row count) costs at M rows over the
    fastest 1-row product."""
    lines = ["| linear | weights | M | torch 1 row | ours 1 row | torch M rows | ours M rows | torch M / torch 1 row | ours M / torch 1 row | best M / best 1 row |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in linears:
        best1 = min(r["torch_1row"], r["ours_1row"])
        lines.append(
            f"| {r['shape']} | {'from DRAM' if r['cold'] else 'in cache'} | {r['M']} | {r['torch_1row']:.3f} | {r['ours_1row']:.3f} | "
            f"{r['torch']:.3f} | {r['ours']:.3f} | {r['torch'] / r['torch_1row']:.2f}x | {r['ours'] / r['torch_1row']:.2f}x | "
            f"{min(r['torch'], r['ours']) / best1:.2f}x |"
        )
    return lines


def caption(dtype: torch.dtype, threads: int) -> str:
    from mtp_ext.machine import describe_cpu

    return (f"Weights {str(dtype).replace('torch.', '')}, {describe_cpu()}, "
            f"medians of interleaved runs (ms).")


def markdown(dtype: torch.dtype, threads: int, linears, tree, vh) -> str:
    lines = [caption(dtype, threads), ""] + linears_markdown(linears)
    lines += ["", "| tree nodes T | decode step | stock tree + verify | fast_cpu tree + fused verify | stock / step | ours / step | same tokens |", "|---:|---:|---:|---:|---:|---:|---|"]
    for r in tree:
        lines.append(
            f"| {r['T']} | {r['decode_step']:.1f} | {r['stock_tree']:.1f} | {r['fast_tree']:.1f} | "
            f"{r['stock_tree'] / r['decode_step']:.2f}x | {r['fast_tree'] / r['decode_step']:.2f}x | {r['same_result']} |"
        )
    v, h = vh["verify"], vh["heads"]
    lines += [
        "",
        "| verification of 8 nodes | ms | / one 1-row output-layer pass |",
        "|---|---:|---:|",
        f"| output layer, 1 row | {v['output_layer_1row']:.2f} | 1.00x |",
        f"| stock: logits + verify_tree | {v['stock_8_nodes']:.2f} | {v['stock_8_nodes'] / v['output_layer_1row']:.2f}x |",
        f"| verify_tree_from_hidden | {v['fused_8_nodes']:.2f} | {v['fused_8_nodes'] / v['output_layer_1row']:.2f}x |",
        "",
        "| three heads, one position | ms |",
        "|---|---:|",
        f"| separate (3 x matrix-vector over the output layer) | {h['separate_3_heads']:.2f} |",
        f"| fused_mtp_heads | {h['fused_3_heads']:.2f} |",
        f"| fused_mtp_heads, draft vocabulary of 16384 | {h['fused_3_heads_draft16k']:.2f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the raw medians here")
    parser.add_argument("--linears-only", action="store_true",
                        help="only the linear table (weights from DRAM), e.g. for the M = 8 target")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.linears_only:
        linears = bench_linears(dtype, args.rounds, cold=True)
        print("\n".join([caption(dtype, args.threads), ""] + linears_markdown(linears)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"dtype": args.dtype, "threads": args.threads, "linears": linears}, f, indent=1)
        return
    linears = bench_linears(dtype, args.rounds, cold=True) + bench_linears(dtype, args.rounds, cold=False)
    model = smollm2_shaped_model(dtype)
    tree = bench_tree(model, args.rounds)
    vh = bench_verify_and_heads(model, args.rounds)
    print(markdown(dtype, args.threads, linears, tree, vh))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "threads": args.threads, "linears": linears, "tree": tree, **vh}, f, indent=1)


if __name__ == "__main__":
    main()
