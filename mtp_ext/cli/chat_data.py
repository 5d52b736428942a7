"""``mtp-ext chat-data``: chat requests built from the texts (:mod:`mtp_ext.data.chat_requests`),
answered by the backbone itself (:mod:`mtp_ext.data.chat_answers`), optionally packed into the
``--tokens`` file of ``mtp-ext train-heads``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Adds the ``chat-data`` command to the subcommands ``sub``."""
    p = sub.add_parser(
        "chat-data",
        help="chat requests from the texts answered by the backbone (drafter training data)",
        description="Builds --num chat requests from the train texts and --num-validation from "
                    "the validation texts (mtp_ext.data.chat_requests), answers them greedily "
                    "with the backbone in its chat template into OUT/train and OUT/validation "
                    "(JSONL shards and manifest.json; a rerun resumes), and with --tokens-out "
                    "packs the conversations into {'train': [N, T], 'validation': [M, T]} token "
                    "ids for 'mtp-ext train-heads --tokens'.",
    )
    p.add_argument("--model", default="smollm2-135m", help="known model name or model folder")
    p.add_argument("--num", type=int, default=2000, help="training requests")
    p.add_argument("--num-validation", type=int, default=200, help="validation requests")
    p.add_argument("--out", required=True, help="output folder (OUT/train, OUT/validation)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    p.add_argument("--engine", default="mtp", choices=["mtp", "hf"],
                   help="mtp_ext.generate with the shipped heads (same tokens, faster; models "
                        "without shipped heads use hf) or model.generate")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the requests")
    p.add_argument("--tokens-out", default=None, metavar="FILE",
                   help="also write the packed token ids (a torch file) here")
    p.add_argument("--seq-len", type=int, default=256,
                   help="row length of --tokens-out (train-heads --seq-len must match)")
    p.add_argument("--mix-texts", default=None, metavar="NAMES",
                   help="with --tokens-out: also put continuation text in the train rows, from "
                        "the train splits of these comma-separated mtp_ext.data.texts names "
                        "(items shuffled with --seed)")
    p.add_argument("--mix-share", type=float, default=0.25,
                   help="share of the train rows that are --mix-texts text (default 0.25)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    """ValueError / FileNotFoundError for bad values, before any model loads."""
    import os

    from .checks import check_model

    for flag, value, low in [("--num", args.num, 1), ("--num-validation", args.num_validation, 0),
                             ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1)]:
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if not 0.0 <= args.mix_share < 1.0:
        raise ValueError(f"--mix-share must be in [0, 1), got {args.mix_share}")
    if args.mix_texts:
        from ..data.texts import TEXTS

        if not args.tokens_out:
            raise ValueError("--mix-texts needs --tokens-out (it mixes text into the token rows)")
        unknown = [n for n in args.mix_texts.split(",") if n not in TEXTS]
        if unknown:
            raise ValueError(f"--mix-texts: unknown texts {unknown}; known: {list(TEXTS)}")
    if args.tokens_out and args.num_validation < 1:
        raise ValueError("--tokens-out needs validation answers: give --num-validation >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out!r} exists and is not a folder")
    if args.tokens_out:
        folder = os.path.dirname(os.path.abspath(args.tokens_out))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--tokens-out {args.tokens_out!r}: no folder {folder!r}")
        if os.path.isdir(args.tokens_out):
            raise IsADirectoryError(f"--tokens-out {args.tokens_out!r} is a folder")
    check_model(args.model)


def _mtp_generate(name: str, model):
    """:func:`mtp_ext.generate` bound to the heads shipped for ``name``, or None when none ship."""
    from ..decoding import generate
    from ..heads.shipped import SHIPPED_HEADS, load_heads

    if name not in SHIPPED_HEADS:
        return None
    heads = load_heads(name, model)
    return lambda model_, ids, **kw: generate(model_, ids, heads, **kw)


def _mix_text_rows(chat_rows, args: argparse.Namespace, tokenizer):
    """``chat_rows [N, T]`` plus rows of continuation text (the train splits of
    ``--mix-texts``, items shuffled) making ``--mix-share`` of the result, rows shuffled; all
    with ``--seed``."""
    import random

    import torch

    from ..data.texts import load_text
    from ..training.tokens import tokenize_texts

    n_chat = chat_rows.shape[0]
    n_text = round(args.mix_share / (1.0 - args.mix_share) * n_chat)
    if n_text == 0:
        return chat_rows
    items = [t for name in args.mix_texts.split(",") for t in load_text(name, "train")]
    random.Random(args.seed).shuffle(items)
    need, picked, chars = n_text * args.seq_len, [], 0
    for t in items:  # about 3 characters per token: enough items, not every item
        picked.append(t)
        chars += len(t)
        if chars > 4 * need:
            break
    text_rows = tokenize_texts(picked, tokenizer, args.seq_len, max_tokens=need)
    rows = torch.cat([chat_rows, text_rows[:n_text]], 0)
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(args.seed))
    print(f"mtp-ext: train rows: {n_chat} chat + {min(n_text, text_rows.shape[0])} text "
          f"({args.mix_texts})", file=sys.stderr)
    return rows[order]


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext chat-data``; returns the exit status."""
    _check(args)
    import json
    import os
    import time

    import torch

    from ..data.assets import load_model
    from ..data.chat_answers import answer_requests, chat_token_rows, load_chat_data
    from ..data.chat_requests import chat_requests

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    splits = [("train", args.num)] + ([("validation", args.num_validation)]
                                      if args.num_validation else [])
    requests = {split: chat_requests(split, num, seed=args.seed) for split, num in splits}
    model, tokenizer = load_model(args.model)
    print(f"mtp-ext: built {sum(len(r) for r in requests.values())} requests and loaded the "
          f"model in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    generate_fn = _mtp_generate(args.model, model) if args.engine == "mtp" else None
    summary = {}
    for split, reqs in requests.items():
        manifest = answer_requests(
            model, tokenizer, reqs, os.path.join(args.out, split), engine=args.engine,
            generate_fn=generate_fn,
            model_name=args.model, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, seed=args.seed, split=split,
            progress=not args.no_progress,
        )
        summary[split] = {k: manifest[k] for k in (
            "engine", "records", "answers", "prompt_tokens", "answer_tokens",
            "truncated_answers", "run_seconds", "run_answer_tokens", "run_tokens_per_second",
            "complete")}
    if args.tokens_out:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        tokens = {}
        for split, reqs in requests.items():
            wanted = {r["id"] for r in reqs}
            records = [r for r in load_chat_data(os.path.join(args.out, split))
                       if r["id"] in wanted]
            rows = chat_token_rows(records, args.seq_len, pad)
            if rows.shape[0] == 0:
                total = sum(len(r["ids"]) for r in records)
                raise ValueError(f"the {split} answers hold {total} tokens, fewer than one row "
                                 f"of --seq-len {args.seq_len}; ask for more requests")
            tokens[split] = rows
        if args.mix_texts and args.mix_share > 0:
            tokens["train"] = _mix_text_rows(tokens["train"], args, tokenizer)
        torch.save(tokens, args.tokens_out)
        summary["tokens_out"] = {"path": args.tokens_out,
                                 **{s: list(t.shape) for s, t in tokens.items()}}
    print(json.dumps(summary, indent=2))
    return 0
