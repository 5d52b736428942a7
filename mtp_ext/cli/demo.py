"""``mtp-ext demo``, the main demonstration: SmolLM2-135M with the shipped MTP heads generates
for a few prompts of different kinds, and for each one prints the text, the tokens accepted per
step, the speed against ``model.generate`` run with the same settings, and whether the tokens are
identical. ``mtp-ext demo --ops`` runs the op demonstration instead
(:mod:`mtp_ext.cli.ops_demo`)."""

from __future__ import annotations

import argparse
import statistics

import torch

__all__ = ["PROMPTS", "add_parser", "run", "run_decode_demo"]

PROMPTS = [
    ("chat", "What is the capital of France, and what is it famous for?", True),
    ("story", "Once upon a time, in a small village by the sea, there lived", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("translation", "Translate into Spanish.\nEnglish: In the beginning God created the heavens "
                    "and the earth.\nSpanish:", False),
]


def run_decode_demo(model_name: str = "smollm2-135m", max_new_tokens: int = 96, tree=None) -> bool:
    """Runs the demonstration; returns True when every output equals ``model.generate``'s."""
    from ..data.assets import load_model
    from ..heads.shipped import load_heads
    from .compare import compare_generate, encode_prompt

    model, tokenizer = load_model(model_name)
    heads = load_heads(model_name, model)
    print(f"{model_name} with {heads.config.num_heads} shipped {heads.config.kind} heads "
          f"({torch.get_num_threads()} threads)")
    if tree is None:
        print("draft tree: chosen at every step from this machine's measured step costs and the "
              "acceptance so far")
    all_same, ratios = True, []
    for kind, prompt, chat in PROMPTS:
        ids = encode_prompt(tokenizer, prompt, chat=chat)
        res = compare_generate(model, heads, ids, max_new_tokens=max_new_tokens, do_sample=False,
                               tree=tree)
        text = tokenizer.decode(res.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        all_same &= bool(res.identical)
        ratios.append(res.speedup)
        print(f"\n--- {kind}: {prompt!r}")
        print(text.strip())
        print(f"[{res.new_tokens} tokens, {res.tokens_per_step:.2f} tokens per step, "
              f"{res.tokens_per_second:.1f} tokens/s, {res.speedup:.2f}x model.generate, "
              f"identical tokens: {'yes' if res.identical else 'NO'}]")
    print(f"\nmedian speed-up over model.generate: {statistics.median(ratios):.2f}x; "
          f"all outputs identical: {'yes' if all_same else 'NO'}")
    return all_same


def add_parser(sub) -> None:
    """Adds the ``demo`` command to the subcommands ``sub``."""
    p = sub.add_parser(
        "demo", help="SmolLM2 with the shipped heads against model.generate (--ops: the op demo)"
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--ops", action="store_true",
                   help="instead: run every op on model-sized random inputs, check and time it")
    p.add_argument("--vocab", type=int, default=49152, help="vocabulary size V (--ops)")
    p.add_argument("--batch", type=int, default=8, help="batch size B")
    p.add_argument("--k", type=int, default=8, help="intermediate tokens for marginalization")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext demo``; returns the exit status."""
    if args.ops:
        from .ops_demo import run_demo

        run_demo(vocab=args.vocab, batch=args.batch, k=args.k, seed=args.seed)
        return 0
    return 0 if run_decode_demo(args.model, args.max_new_tokens) else 1
