"""``mtp-ext generate``: generate with MTP heads from a prompt, optionally beside
``model.generate``."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def _tree_arg(text: str):
    if text == "chain":
        return text
    try:
        nodes = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a node count or 'chain', got {text!r}")
    if nodes < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 node, got {nodes}")
    return nodes


def add_parser(sub) -> None:
    """Adds the ``generate`` command to the subcommands ``sub``."""
    p = sub.add_parser("generate", help="generate with MTP heads (mtp_ext.generate)")
    p.add_argument("--model", default="smollm2-135m", help="known model name or model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--heads", default=None, help="heads folder (default: the shipped heads)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--tree", type=_tree_arg, default=None,
                   help="draft tree: node count or 'chain' (default: chosen at every step)")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true",
                   help="also run model.generate and report both speeds and equality")
    p.add_argument("--no-stream", action="store_true", help="print the text at the end")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict:
    """The decoding settings of ``args``, checked as ``mtp_ext.generate`` checks them (ValueError)
    before any model loads; the heads folder (or shipped heads) and the model are checked too."""
    from ..heads.shipped import SHIPPED_HEADS
    from ..settings import resolve_settings
    from .checks import check_heads_folder, check_model

    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample)
    if args.do_sample:
        settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    resolve_settings(None, 1, **settings)
    check_model(args.model)
    if args.heads:
        check_heads_folder(args.heads, "--heads")
    elif args.model not in SHIPPED_HEADS:
        raise ValueError(f"no heads ship for --model {args.model!r} (shipped for: "
                         f"{', '.join(sorted(SHIPPED_HEADS))}); give a heads folder with --heads")
    return settings


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext generate``; returns the exit status."""
    settings = _settings(args)
    import torch

    from ..data.assets import load_model
    from ..heads import MTPHeads
    from ..heads.shipped import load_heads
    from .compare import compare_generate, encode_prompt

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    heads = MTPHeads.from_pretrained(args.heads, model) if args.heads else load_heads(args.model, model)
    ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    settings["tree"] = args.tree  # None: chosen at every step (mtp_ext.controller)
    if args.do_sample:
        settings["generator"] = torch.Generator().manual_seed(args.seed)
    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer

        # Special tokens (the chat template's markers, the end token) are not text, as in
        # transformers' pipelines.
        streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    res = compare_generate(model, heads, ids, reference=args.compare, streamer=streamer, **settings)
    if streamer is None:
        print(tokenizer.decode(res.sequences[0], skip_special_tokens=True))
    print(f"\n[mtp-ext] {res.new_tokens} tokens in {res.seconds:.2f} s "
          f"({res.tokens_per_second:.1f} tokens/s, {res.tokens_per_step:.2f} tokens per step)")
    if args.compare:
        ref_tps = res.new_tokens / res.reference_seconds if res.reference_seconds else 0.0
        print(f"[mtp-ext] model.generate: {res.reference_seconds:.2f} s ({ref_tps:.1f} tokens/s); "
              f"speed-up {res.speedup:.2f}x")
        if args.do_sample:
            print("[mtp-ext] sampling: the tokens differ from model.generate's by design (same "
                  "distribution, different random draws)")
        else:
            print(f"[mtp-ext] identical tokens: {'yes' if res.identical else 'NO'}")
            return 0 if res.identical else 1
    return 0
