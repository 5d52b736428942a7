"""Command line: ``mtp-ext info``, ``mtp-ext demo``, ``mtp-ext assets prepare`` and
``mtp-ext train-heads`` (also ``python -m mtp_ext ...``)."""

from __future__ import annotations

import argparse
import sys


def _info(_: argparse.Namespace) -> int:
    from .info import info_text

    print(info_text())
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.ops:
        from .demo import run_demo

        run_demo(vocab=args.vocab, batch=args.batch, k=args.k, seed=args.seed)
        return 0
    from .decode_demo import run_decode_demo

    return 0 if run_decode_demo(args.model, args.max_new_tokens) else 1


def _assets(args: argparse.Namespace) -> int:
    import time

    from .assets import MODELS, model_file
    from .texts import prepare_texts

    t0 = time.perf_counter()
    status = 0
    try:
        prepare_texts(force=args.force)
    except Exception as exc:  # noqa: BLE001  (report and go on to the model check)
        print(f"mtp_ext: preparing the texts failed: {exc}", file=sys.stderr)
        status = 1
    for name in MODELS if args.all_models else ["smollm2-135m"]:
        try:
            print(f"mtp_ext: model {name!r} installed: {model_file(name)}")
        except FileNotFoundError:
            install = MODELS[name].install
            print(f"mtp_ext: model {name!r} is not installed; install it with: {install}")
            status = 1
    print(f"mtp_ext: assets prepare done in {time.perf_counter() - t0:.1f} s")
    return status


def _layer(value: str):
    return value if value == "whs" else int(value)


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
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min)
    )
    return True, device


def _train_heads(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    owned, device = _start_distributed(args.device, args.dist_timeout)
    try:
        return _run_train_heads(args, device)
    finally:
        if owned:
            dist.destroy_process_group()


def _run_train_heads(args: argparse.Namespace, device: str) -> int:
    import json
    import os
    import time

    import torch

    from .assets import load_model
    from .heads import MTPHeads
    from .train import TrainConfig, _dist_info, train_heads

    rank = _dist_info()[0]
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
        from .texts import load_text

        names = [n for n in args.texts.split(",") if n]
        texts_train = [x for n in names for x in load_text(n, "train")]
        texts_val = [x for n in names for x in load_text(n, "validation")]
        if args.shuffle_texts:
            import random

            random.Random(args.seed).shuffle(texts_train)
        if args.self_generated:
            from .selfgen import self_generated

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
    )
    if args.init_heads:
        # Start from trained heads (their kind, layer and vocabulary replace the flags above).
        heads = MTPHeads.from_pretrained(args.init_heads, model)
    config = TrainConfig(
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


def _tree_arg(text: str):
    if text == "chain":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tree must be a node count or 'chain', got {text!r}")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from .assets import load_model
    from .compare import compare_generate, encode_prompt
    from .heads import MTPHeads
    from .shipped import load_heads

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    heads = MTPHeads.from_pretrained(args.heads, model) if args.heads else load_heads(args.model, model)
    ids = encode_prompt(tokenizer, args.prompt, chat=args.chat)
    tree = args.tree
    if tree is None:
        from .tree_tuning import auto_tree

        tree = auto_tree(model, heads, ids, progress=True)
        print(f"[mtp-ext] draft tree: {tree.size} nodes", file=sys.stderr)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, tree=tree)
    if args.do_sample:
        settings.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        generator=torch.Generator().manual_seed(args.seed))
    streamer = None
    if not args.no_stream:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=False)
    res = compare_generate(model, heads, ids, reference=args.compare, streamer=streamer, **settings)
    if streamer is None:
        print(tokenizer.decode(res.sequences[0], skip_special_tokens=False))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, build and the backends of every op")
    p_info.set_defaults(func=_info)
    p_demo = sub.add_parser(
        "demo", help="SmolLM2 with the shipped heads against model.generate (--ops: the op demo)"
    )
    p_demo.add_argument("--model", default="smollm2-135m")
    p_demo.add_argument("--max-new-tokens", type=int, default=96)
    p_demo.add_argument("--ops", action="store_true",
                        help="instead: run every op on model-sized random inputs, check and time it")
    p_demo.add_argument("--vocab", type=int, default=49152, help="vocabulary size V (--ops)")
    p_demo.add_argument("--batch", type=int, default=8, help="batch size B")
    p_demo.add_argument("--k", type=int, default=8, help="intermediate tokens for marginalization")
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=_demo)
    p_assets = sub.add_parser("assets", help="offline texts and models (see mtp_ext.texts)")
    p_assets.add_argument(
        "action", choices=["prepare"], help="prepare: fetch and parse what is missing"
    )
    p_assets.add_argument("--force", action="store_true", help="fetch and parse the texts again")
    p_assets.add_argument("--all-models", action="store_true", help="check every known model")
    p_assets.set_defaults(func=_assets)
    p_tr = sub.add_parser("train-heads", help="train MTP heads on a backbone (mtp_ext.train)")
    p_tr.add_argument("--model", default="smollm2-135m", help="known model name or model folder")
    p_tr.add_argument("--texts", default="web", help="comma-separated mtp_ext.texts names")
    p_tr.add_argument("--tokens", default=None,
                      help="a torch file {'train': [N, T] ids, 'validation': [M, T] ids} "
                           "used instead of --texts (no tokenizer needed)")
    p_tr.add_argument("--shuffle-texts", action="store_true", help="shuffle the training items")
    p_tr.add_argument("--self-generated", type=int, default=0, metavar="N",
                      help="also train on N greedy continuations by the backbone of prompts cut "
                           "from the training texts (mtp_ext.selfgen; half in the chat template)")
    p_tr.add_argument("--self-generated-tokens", type=int, default=224,
                      help="new tokens per self-generated continuation")
    p_tr.add_argument("--self-generated-chat", type=float, default=0.5,
                      help="share of self-generated prompts wrapped in the chat template")
    p_tr.add_argument("--init-heads", default=None,
                      help="start from these trained heads (a save_pretrained folder)")
    p_tr.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p_tr.add_argument("--kind", default="resblock",
                      choices=["resblock", "linear", "conditioned", "transformer"])
    p_tr.add_argument("--num-heads", type=int, default=3)
    p_tr.add_argument("--layer", type=_layer, default=-1, help="hidden-state index or 'whs'")
    p_tr.add_argument("--whs-per-channel", action="store_true")
    p_tr.add_argument("--draft-vocab", type=int, default=None,
                      help="draft over the N most frequent tokens only (default: whole vocabulary)")
    p_tr.add_argument("--draft-vocab-from", default="greedy", choices=["greedy", "text"],
                      help="count frequencies in the backbone's predictions or in the text")
    p_tr.add_argument("--target", default="greedy", choices=["text", "greedy", "kl"])
    p_tr.add_argument("--steps", type=int, default=1000)
    p_tr.add_argument("--seq-len", type=int, default=256)
    p_tr.add_argument("--batch-positions", type=int, default=512)
    p_tr.add_argument("--lr", type=float, default=1e-3)
    p_tr.add_argument("--weight-decay", type=float, default=0.0)
    p_tr.add_argument("--warmup-steps", type=int, default=20)
    p_tr.add_argument("--schedule", default="cosine", choices=["cosine", "constant"])
    p_tr.add_argument("--seed", type=int, default=0)
    p_tr.add_argument("--no-cache", action="store_true",
                      help="recompute hidden states every step instead of caching them")
    p_tr.add_argument("--cache-dir", default=None, help="on-disk hidden-state cache folder")
    p_tr.add_argument("--max-train-tokens", type=int, default=None)
    p_tr.add_argument("--max-val-tokens", type=int, default=None)
    p_tr.add_argument("--eval-every", type=int, default=100)
    p_tr.add_argument("--checkpoint-every", type=int, default=0)
    p_tr.add_argument("--no-resume", action="store_true")
    p_tr.add_argument("--no-progress", action="store_true")
    p_tr.add_argument("--joint", action="store_true", help="train the backbone too")
    p_tr.add_argument("--joint-seqs", type=int, default=4)
    p_tr.add_argument("--mtp-lambda", type=float, default=1.0)
    p_tr.add_argument("--backbone-lr", type=float, default=1e-5)
    p_tr.add_argument("--head-warmup-steps", type=int, default=0)
    p_tr.add_argument("--device", default="cpu",
                      help="the backbone's and heads' device, e.g. 'cpu' or 'cuda'; under torchrun "
                           "a CUDA device becomes cuda:$LOCAL_RANK (process group nccl, else gloo)")
    p_tr.add_argument("--dist-timeout", type=float, default=60.0,
                      help="minutes a rank waits at a collective under torchrun (rank 0 builds "
                           "the --cache-dir caches while the others wait)")
    p_tr.add_argument("--out", required=True, help="output folder (log, checkpoint, heads)")
    p_tr.set_defaults(func=_train_heads)
    p_gen = sub.add_parser("generate", help="generate with MTP heads (mtp_ext.generate)")
    p_gen.add_argument("--model", default="smollm2-135m", help="known model name or model folder")
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p_gen.add_argument("--heads", default=None, help="heads folder (default: the shipped heads)")
    p_gen.add_argument("--max-new-tokens", type=int, default=128)
    p_gen.add_argument("--tree", type=_tree_arg, default=None,
                       help="draft tree: node count or 'chain' (default: chosen for the model)")
    p_gen.add_argument("--do-sample", action="store_true")
    p_gen.add_argument("--temperature", type=float, default=1.0)
    p_gen.add_argument("--top-k", type=int, default=0)
    p_gen.add_argument("--top-p", type=float, default=1.0)
    p_gen.add_argument("--seed", type=int, default=0)
    p_gen.add_argument("--compare", action="store_true",
                       help="also run model.generate and report both speeds and equality")
    p_gen.add_argument("--no-stream", action="store_true", help="print the text at the end")
    p_gen.set_defaults(func=_generate)
    from .evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
