"""The training loop (:func:`train_heads`): optimizer and learning-rate schedule, the frozen or
joint steps, gradient summation across ranks, periodic validation, checkpoints and the final
heads."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import torch

from ..heads import MTPHeads
from .cache import memory_cache, shared_cache
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import (
    all_reduce_grads, barrier, broadcast_params, check_distributed, check_same_step, dist_info,
)
from .progress import StepProgress, append_log, eval_record
from .steps import frozen_step, joint_step
from .tokens import set_draft_vocab, tokenize_texts
from .validation import evaluate


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier at ``step``: a linear warm-up over ``warmup_steps``, then
    constant or a cosine decay to ``min_lr_ratio`` at ``steps``."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    p = min(1.0, (step - config.warmup_steps) / span)
    r = config.min_lr_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))


def train_heads(
    model,
    tokenizer,
    heads: MTPHeads,
    texts_train,
    texts_val,
    config: TrainConfig | None = None,
    train_cache: dict | None = None,
    val_cache: dict | None = None,
) -> dict:
    """Trains ``heads`` on ``model``'s hidden states (see :mod:`mtp_ext.training`).

    Args:
        model: a transformers causal LM (frozen unless ``config.joint``).
        tokenizer: its tokenizer (None when the texts are pre-tokenized).
        heads: an :class:`MTPHeads` built for ``model`` (trained in place).
        texts_train, texts_val: strings, or pre-tokenized (see :func:`tokenize_texts`).
        config: a :class:`TrainConfig`.
        train_cache, val_cache: frozen mode only: caches already built for these heads' input
            (for example :func:`select_layer` of one all-layer cache shared by heads at several
            layers); built from the texts when None.
    Returns:
        ``{"history": {"step", "loss", "lr"}, "evals": [...], "final": {...}, "timing": {...}}``.

    When ``torch.distributed`` is initialized with several ranks, every rank calls this with the
    same arguments and trains its share of each global batch (see
    :mod:`mtp_ext.training.distributed`); all ranks return the same history (global-batch losses)
    and evaluations. Raises ``ValueError`` when ``batch_positions`` (``joint_seqs`` in joint mode)
    is not divisible by the world size.
    """
    config = config or TrainConfig()
    rank, world = dist_info()
    check_distributed(config, world)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    timing = {}
    t0 = time.perf_counter()
    train_ids = tokenize_texts(texts_train, tokenizer, config.seq_len, config.max_train_tokens)
    val_ids = tokenize_texts(texts_val, tokenizer, config.seq_len, config.max_val_tokens)
    timing["tokenize_s"] = time.perf_counter() - t0

    model.eval()
    backbone_params = [p for p in model.parameters()]
    for p in backbone_params:
        p.requires_grad_(False)
    head_params = [p for p in heads.parameters() if p.requires_grad]
    groups = [{"params": head_params, "lr": config.lr, "weight_decay": config.weight_decay}]
    if config.joint:
        groups.append({"params": backbone_params, "lr": config.backbone_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    lambdas = [lambda st: lr_factor(st, config)]
    if config.joint:
        lambdas.append(
            lambda st: lr_factor(st, config) if st >= config.head_warmup_steps else 0.0
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    history = {"step": [], "loss": [], "lr": [], "backbone_lr": []}
    evals: list[dict] = []
    step = 0
    ckpt = os.path.join(config.out_dir, "checkpoint") if config.out_dir else None
    found = find_checkpoint(ckpt) if ckpt and config.resume else None
    if found:
        step, history = load_checkpoint(
            found, heads, optimizer, scheduler, gen, model if config.joint else None
        )
        if rank == 0:
            note = "" if found == ckpt else f" (the run stopped while replacing {ckpt})"
            print(f"train-heads: resumed from {found} at step {step}{note}", file=sys.stderr)
    device = heads.lm_head_weight.device
    check_same_step(step, world, device)

    # Caches (frozen mode): train once, validation once.
    t0 = time.perf_counter()
    if config.joint and (train_cache is not None or val_cache is not None):
        raise ValueError("train_cache and val_cache are for frozen mode; joint mode recomputes")
    if train_cache is not None:
        train_ids = train_cache["ids"]
    elif not config.joint and config.cache_hidden:
        train_cache = shared_cache(model, heads, train_ids, config, "train", rank, world)
    timing["cache_train_s"] = time.perf_counter() - t0
    if step == 0:  # a resumed run keeps the vocabulary its checkpoint holds
        set_draft_vocab(heads, train_ids, train_cache, config)
    t0 = time.perf_counter()
    if val_cache is not None:
        val_ids = val_cache["ids"]
    elif not config.joint:
        val_cache = shared_cache(model, heads, val_ids, config, "val", rank, world)
    timing["cache_val_s"] = time.perf_counter() - t0
    if world > 1:  # every rank starts from rank 0's parameters
        broadcast_params(head_params + (backbone_params if config.joint else []))

    def run_eval(at_step):
        vc = memory_cache(model, heads, val_ids, config, "v") if config.joint else val_cache
        res = evaluate(heads, vc, config)
        rec = eval_record(at_step, res)
        evals.append(rec)
        if rank == 0:
            append_log(config, rec)
        return res

    def checkpoint():
        save_checkpoint(ckpt, heads, optimizer, scheduler, step, gen, history,
                        model if config.joint else None)

    bar = StepProgress(config.steps, step,
                       config if rank == 0 else dataclasses.replace(config, progress=False))
    t0 = time.perf_counter()
    heads.train()
    trainable = head_params + (backbone_params if config.joint else [])
    while step < config.steps:
        if config.joint:
            loss, info = joint_step(model, heads, train_ids, gen, step, config, backbone_params,
                                    rank, world)
        else:
            loss, info = frozen_step(model, heads, train_ids, train_cache, gen, config,
                                     rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # this rank's share of the global-batch gradient: sum the shares
            info = all_reduce_grads(trainable, info, device)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None],
                                           config.grad_clip)
        optimizer.step()
        history["step"].append(step)
        history["loss"].append(info["loss"])
        history["lr"].append(optimizer.param_groups[0]["lr"])
        history["backbone_lr"].append(optimizer.param_groups[1]["lr"] if config.joint else 0.0)
        scheduler.step()
        step += 1
        bar.update(step, info)
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            run_eval(step)
        if ckpt and rank == 0 and config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint()
        if config.stop_at is not None and step >= config.stop_at:
            break
    bar.close()
    timing["train_s"] = time.perf_counter() - t0
    for p in backbone_params:
        p.requires_grad_(False)
    heads.eval()
    finished = step >= config.steps
    if ckpt and rank == 0 and config.stop_at is not None and not finished:
        checkpoint()
    t0 = time.perf_counter()
    final = run_eval(step)
    timing["eval_s"] = time.perf_counter() - t0
    if config.out_dir and finished and rank == 0:
        heads.save_pretrained(os.path.join(config.out_dir, "heads"))
    barrier(world)  # on return, rank 0's files are written on every rank
    return {
        "history": history,
        "evals": evals,
        "final": final,
        "step": step,
        "timing": timing,
        "train_tokens": train_ids.numel(),
        "val_tokens": val_ids.numel(),
    }
