"""``mtp-ext train-heads``: train MTP heads on a backbone, on one process or several under
``torchrun``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run"]


def _layer(value: str):
    return value if value == "whs" else int(value)


def add_parser(sub) -> None:
    """Adds the ``train-heads`` command to the subcommands ``sub``."""
    p = sub.add_parser("train-heads", help="train MTP heads on a backbone (mtp_ext.training)")
    p.add_argument("--model", default="smollm2-135m", help="known model name or model folder")
    p.add_argument("--texts", default="web", help="comma-separated mtp_ext.data.texts names")
    p.add_argument("--tokens", default=None,
                   help="a torch file {'train': [N, T] ids, 'validation': [M, T] ids} "
                        "used instead of --texts (no tokenizer needed)")
    p.add_argument("--shuffle-texts", action="store_true", help="shuffle the training items")
    p.add_argument("--self-generated", type=int, default=0, metavar="N",
                   help="also train on N greedy continuations by the backbone of prompts cut "
                        "from the training texts (mtp_ext.data.selfgen; half in the chat template)")
    p.add_argument("--self-generated-tokens", type=int, default=224,
                   help="new tokens per self-generated continuation")
    p.add_argument("--self-generated-chat", type=float, default=0.5,
                   help="share of self-generated prompts wrapped in the chat template")
    p.add_argument("--init-heads", default=None,
                   help="start from these trained heads (a save_pretrained folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--kind", default="resblock",
                   choices=["resblock", "linear", "conditioned", "transformer", "eagle"])
    p.add_argument("--fuse-layers", default=None,
                   help="eagle only: the EAGLE-3 layout, fusing these hidden states "
                        "(comma-separated indices, or 'default': 2, L // 2 and L - 3 of a "
                        "backbone with L layers); without it the EAGLE-1 layout")
    p.add_argument("--fc-bias", action="store_true", help="eagle only: fc has a bias")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--layer", type=_layer, default=-1, help="hidden-state index or 'whs'")
    p.add_argument("--whs-per-channel", action="store_true")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="draft over the N most frequent tokens only (default: whole vocabulary)")
    p.add_argument("--draft-vocab-from", default="greedy", choices=["greedy", "text"],
                   help="count frequencies in the backbone's predictions or in the text")
    p.add_argument("--target", default="greedy", choices=["text", "greedy", "kl"])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-positions", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute hidden states every step instead of caching them")
    p.add_argument("--cache-dir", default=None, help="on-disk hidden-state cache folder")
    p.add_argument("--max-train-tokens", type=int, default=None)
    p.add_argument("--max-val-tokens", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--joint", action="store_true", help="train the backbone too")
    p.add_argument("--joint-seqs", type=int, default=4)
    p.add_argument("--mtp-lambda", type=float, default=1.0)
    p.add_argument("--backbone-lr", type=float, default=1e-5)
    p.add_argument("--head-warmup-steps", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="the backbone's and heads' device, e.g. 'cpu' or 'cuda'; under torchrun "
                        "a CUDA device becomes cuda:$LOCAL_RANK (process group nccl, else gloo)")
    p.add_argument("--dist-timeout", type=float, default=60.0,
                   help="minutes a rank waits at a collective under torchrun (rank 0 builds "
                        "the --cache-dir caches while the others wait)")
    p.add_argument("--out", required=True, help="output folder (log, checkpoint, heads)")
    p.set_defaults(func=run)


def _fuse_layers(value: str | None, model) -> list[int] | None:
    """``--fuse-layers``: None, ``"default"`` (EAGLE-3's low, middle and high layers: hidden
    states 2, L // 2 and L - 3) or comma-separated hidden-state indices."""
    if value is None:
        return None
    if value == "default":
        from ..heads.eagle import default_fuse_layers

        return default_fuse_layers(model.config.num_hidden_layers)
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--fuse-layers must be 'default' or comma-separated ints, got {value!r}") from None


def _start_distributed(device: str, timeout_min: float) -> tuple[bool, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1) with no process group yet, initializes the default
    one: ``nccl`` on this rank's GPU (``cuda:$LOCAL_RANK``) when ``device`` is a CUDA device, else
    ``gloo``. Returns ``(initialized here, this rank's device)``."""
    import datetime
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False, device
    if dist.is_initialized():
        return False, device
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min)
    )
    return True, device


def _config(args: argparse.Namespace):
    """The :class:`~mtp_ext.training.TrainConfig` of ``args``, after the checks of the values and
    inputs that need no model (ValueError, FileNotFoundError), so that a bad one fails at once."""
    import os

    from ..training import TrainConfig
    from .checks import check_heads_folder, check_model

    for flag, value in [("--num-heads", args.num_heads), ("--threads", args.threads),
                        ("--draft-vocab", args.draft_vocab),
                        ("--self-generated-tokens", args.self_generated_tokens)]:
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag, value in [("--self-generated", args.self_generated),
                        ("--eval-every", args.eval_every),
                        ("--checkpoint-every", args.checkpoint_every)]:
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if not 0 <= args.self_generated_chat <= 1:
        raise ValueError(f"--self-generated-chat must be in [0, 1], got {args.self_generated_chat}")
    check_model(args.model)
    if args.init_heads:
        check_heads_folder(args.init_heads, "--init-heads")
    if args.tokens:
        if not os.path.isfile(args.tokens):
            raise FileNotFoundError(f"--tokens {args.tokens!r}: no such file")
    else:
        from ..data.texts import TEXTS

        names = [n for n in args.texts.split(",") if n]
        unknown = [n for n in names if n not in TEXTS]
        if unknown or not names:
            what = f"unknown texts {unknown}" if unknown else "no text"
            raise ValueError(f"--texts {args.texts!r} names {what}; known: {', '.join(TEXTS)}")
    return TrainConfig(
        steps=args.steps, seq_len=args.seq_len, target=args.target,
        batch_positions=args.batch_positions, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, schedule=args.schedule, seed=args.seed,
        cache_hidden=not args.no_cache, cache_dir=args.cache_dir,
        max_train_tokens=args.max_train_tokens, max_val_tokens=args.max_val_tokens,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, out_dir=args.out,
        resume=not args.no_resume, progress=not args.no_progress, joint=args.joint,
        joint_seqs=args.joint_seqs, mtp_lambda=args.mtp_lambda, backbone_lr=args.backbone_lr,
        head_warmup_steps=args.head_warmup_steps,
        draft_vocab_from="keep" if args.init_heads else args.draft_vocab_from,
    )


def run(args: argparse.Namespace) -> int:
    """Runs ``mtp-ext train-heads``; returns the exit status."""
    import torch
    import torch.distributed as dist

    config = _config(args)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    owned, device = _start_distributed(args.device, args.dist_timeout)
    try:
        return _run_train_heads(args, config, device)
    finally:
        if owned:
            dist.destroy_process_group()


def _run_train_heads(args: argparse.Namespace, config, device: str) -> int:
    import json
    import os
    import time

    import torch

    from ..data.assets import load_model
    from ..heads import MTPHeads
    from ..training import dist_info, train_heads

    rank = dist_info()[0]
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    model.to(device)
    if args.tokens:
        toks = torch.load(args.tokens, map_location="cpu", weights_only=True)
        texts_train, texts_val = toks["train"], toks["validation"]
        tokenizer = None
    else:
        from ..data.texts import load_text

        names = [n for n in args.texts.split(",") if n]
        texts_train = [x for n in names for x in load_text(n, "train")]
        texts_val = [x for n in names for x in load_text(n, "validation")]
        if args.shuffle_texts:
            import random

            random.Random(args.seed).shuffle(texts_train)
        if args.self_generated:
            from ..data.selfgen import self_generated

            # The model's own continuations go first, so that a token budget keeps them all.
            texts_train = self_generated(
                model, tokenizer, texts_train, args.self_generated,
                new_tokens=args.self_generated_tokens, seed=args.seed,
                chat_fraction=args.self_generated_chat,
                progress=rank == 0 and not args.no_progress,
            ) + texts_train
    if rank == 0:
        print(f"mtp-ext: loaded model and texts in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    heads = MTPHeads.for_model(
        model, num_heads=args.num_heads, kind=args.kind, layer=args.layer,
        whs_per_channel=args.whs_per_channel, draft_vocab_size=args.draft_vocab,
        fuse_layers=_fuse_layers(args.fuse_layers, model), fc_bias=args.fc_bias,
    )
    if args.init_heads:
        # Start from trained heads (their kind, layer and vocabulary replace the flags above).
        heads = MTPHeads.from_pretrained(args.init_heads, model)
    result = train_heads(model, tokenizer, heads, texts_train, texts_val, config)
    if rank != 0:  # rank 0 writes the summary (train_heads wrote the rest)
        return 0
    summary = {k: result[k] for k in ("step", "final", "timing", "train_tokens", "val_tokens")}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    if args.joint:
        print("mtp-ext: joint mode trained the backbone too; only the heads were saved",
              file=sys.stderr)
    return 0
