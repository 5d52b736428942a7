"""The heads part of the study: heads on a frozen backbone at a grid of layers, WHS, and joint
training of heads and backbone with and without differential learning rates and a head warm-up.

Every head set is trained by :func:`mtp_ext.training.train_heads` on the same training windows
(:func:`mtp_ext.evaluation.samples.training_windows`, a mix of the evaluated datasets' train
splits) and scored by :func:`score_heads` on the evaluation samples like every other method.

- **Layer grid** (method ``"head_frozen"``, ``layer`` = index into ``hidden_states``: 0 is the
  embedding output, ``L`` the last layer): one all-layer cache of the training windows is built
  once (:func:`mtp_ext.training.build_cache` for WHS heads) and each layer's heads train on its
  slice (:func:`mtp_ext.training.select_layer`), with identical steps and batches.
- **WHS** (``"head_whs"``): the same training on the learned softmax-weighted sum of all layers.
- **Joint variants** (``"head_<variant>"`` for the heads, ``"ntp_<variant>"`` for the backbone's
  own next-token prediction after training), each on a fresh copy of the backbone, heads reading
  the last layer, loss ``NTP + mtp_lambda * MTP`` on ``joint_seqs`` windows per step:
  ``heads-only`` (the backbone never unfreezes: the same batches, heads only, the baseline),
  ``joint`` (one learning rate for heads and backbone), ``joint+difflr`` (the backbone at
  ``backbone_lr``), ``joint+difflr+warmup`` (and the heads alone for the first
  ``warmup_fraction`` of the steps).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from ..heads import MTPHeads
from ..reference import stable_topk
from ..training import TrainConfig, build_cache, select_layer, train_heads
from .marginal import scored_positions
from .progress import log
from .samples import Sample
from .tally import Key, Tally, hits

__all__ = ["HeadStudyConfig", "TrainedHeads", "JOINT_VARIANTS", "train_head_sets", "score_heads",
           "grid_layers"]

JOINT_VARIANTS = ("heads-only", "joint", "joint+difflr", "joint+difflr+warmup")


@dataclasses.dataclass
class HeadStudyConfig:
    """What the heads study trains (see the module docstring)."""

    layers: tuple[int, ...] | None = None  # hidden-state indices; None: every layer_step-th
    layer_step: int = 3
    num_heads: int = 2  # heads predict t+2 .. t+1+num_heads
    kind: str = "resblock"
    steps: int = 300
    batch_positions: int = 256
    lr: float = 3e-3
    seq_len: int = 128
    train_tokens: int = 32768  # in all, split evenly over the datasets
    val_tokens: int = 2048
    draft_vocab: int | None = None
    whs: bool = True
    joint_variants: tuple[str, ...] = JOINT_VARIANTS
    joint_steps: int = 60
    joint_seqs: int = 2
    joint_lr: float = 1e-3
    backbone_lr: float = 1e-5
    warmup_fraction: float = 0.3
    mtp_lambda: float = 1.0
    seed: int = 0

    def __post_init__(self):
        unknown = [v for v in self.joint_variants if v not in JOINT_VARIANTS]
        if unknown:
            raise ValueError(f"unknown joint variants {unknown}; known: {list(JOINT_VARIANTS)}")
        if self.layer_step < 1 or self.num_heads < 1:
            raise ValueError("layer_step and num_heads must be >= 1")


@dataclasses.dataclass
class TrainedHeads:
    """A trained head set, the backbone it reads and how its records are labelled."""

    method: str
    layer: int | str
    heads: MTPHeads
    model: object
    ntp_method: str | None = None  # record the backbone's NTP under this method (joint copies)
    train_s: float = 0.0


def grid_layers(num_layers: int, step: int) -> tuple[int, ...]:
    """Hidden-state indices ``0, step, 2 step, ...`` and always the last one (``num_layers``)."""
    layers = list(range(0, num_layers + 1, step))
    if layers[-1] != num_layers:
        layers.append(num_layers)
    return tuple(layers)


def _train_config(cfg: HeadStudyConfig, progress: bool, **over) -> TrainConfig:
    base = dict(
        steps=cfg.steps, seq_len=cfg.seq_len, target="greedy", batch_positions=cfg.batch_positions,
        lr=cfg.lr, warmup_steps=min(20, max(1, cfg.steps // 10)), eval_every=0, seed=cfg.seed,
        progress=progress, cache_dtype="bfloat16", log_every=max(1, cfg.steps // 10),
        forward_batch=8,
    )
    base.update(over)
    return TrainConfig(**base)


def train_head_sets(
    model,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    cfg: HeadStudyConfig,
    progress: bool = True,
) -> list[TrainedHeads]:
    """Trains every head set of the study on ``train_ids`` ``[N, seq_len]`` (validation during
    training on ``val_ids``). ``model`` is left unchanged (joint variants train copies)."""
    n_layers = int(model.config.num_hidden_layers)
    layers = cfg.layers if cfg.layers is not None else grid_layers(n_layers, cfg.layer_step)
    out: list[TrainedHeads] = []
    quiet = dict(progress=False)
    if layers or cfg.whs:
        whs_heads = MTPHeads.for_model(model, cfg.num_heads, cfg.kind, layer="whs",
                                       draft_vocab_size=cfg.draft_vocab)
        tc = _train_config(cfg, progress)
        t0 = time.perf_counter()
        with _without_cache_size_warning():
            train_cache = build_cache(model, whs_heads, train_ids, tc, "train")
            val_cache = build_cache(model, whs_heads, val_ids, dataclasses.replace(tc, **quiet), "val")
        log(progress, f"cached all {n_layers + 1} hidden states of {train_ids.numel()} training "
                       f"tokens in {time.perf_counter() - t0:.0f} s")
        for layer in layers:
            heads = MTPHeads.for_model(model, cfg.num_heads, cfg.kind, layer=int(layer),
                                       draft_vocab_size=cfg.draft_vocab)
            t0 = time.perf_counter()
            train_heads(model, None, heads, train_ids, val_ids, tc,
                        train_cache=select_layer(train_cache, int(layer)),
                        val_cache=select_layer(val_cache, int(layer)))
            out.append(TrainedHeads("head_frozen", int(layer), heads, model,
                                    train_s=time.perf_counter() - t0))
            log(progress, f"heads at layer {layer}: trained in {out[-1].train_s:.0f} s")
        if cfg.whs:
            t0 = time.perf_counter()
            train_heads(model, None, whs_heads, train_ids, val_ids, tc,
                        train_cache=train_cache, val_cache=val_cache)
            out.append(TrainedHeads("head_whs", "whs", whs_heads, model,
                                    train_s=time.perf_counter() - t0))
            log(progress, f"WHS heads: trained in {out[-1].train_s:.0f} s")
        del train_cache, val_cache
    for variant in cfg.joint_variants:
        out.append(_train_joint(model, train_ids, val_ids, cfg, variant, progress))
    return out


@contextlib.contextmanager
def _without_cache_size_warning():
    """Silences the all-layer cache size warning (the study asks for that cache on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="caching all")
        yield


def _train_joint(model, train_ids, val_ids, cfg: HeadStudyConfig, variant: str,
                 progress: bool) -> TrainedHeads:
    copy_ = copy.deepcopy(model)
    heads = MTPHeads.for_model(copy_, cfg.num_heads, cfg.kind, layer=-1,
                               draft_vocab_size=cfg.draft_vocab)
    steps = cfg.joint_steps
    warmup = {"heads-only": steps, "joint": 0, "joint+difflr": 0,
              "joint+difflr+warmup": int(round(cfg.warmup_fraction * steps))}[variant]
    backbone_lr = cfg.joint_lr if variant == "joint" else cfg.backbone_lr
    tc = _train_config(cfg, progress, joint=True, steps=steps, joint_seqs=cfg.joint_seqs,
                       lr=cfg.joint_lr, backbone_lr=backbone_lr, head_warmup_steps=warmup,
                       mtp_lambda=cfg.mtp_lambda, warmup_steps=min(10, max(1, steps // 10)),
                       log_every=max(1, steps // 10))
    t0 = time.perf_counter()
    train_heads(copy_, None, heads, train_ids, val_ids[:1], tc)
    copy_.eval()
    for p in copy_.parameters():
        p.requires_grad_(False)
    res = TrainedHeads(f"head_{variant}", int(model.config.num_hidden_layers), heads, copy_,
                       ntp_method=f"ntp_{variant}", train_s=time.perf_counter() - t0)
    log(progress, f"joint variant {variant!r}: trained in {res.train_s:.0f} s")
    return res


@torch.inference_mode()
def score_heads(
    tally: Tally,
    th: TrainedHeads,
    sample: Sample,
    hidden_states: Sequence[torch.Tensor],
    logits: torch.Tensor,
) -> None:
    """Scores head set ``th`` on ``sample`` teacher-forced.

    Args:
        hidden_states: ``th.model``'s hidden states over ``sample.ids`` (each ``[1, L, D]``).
        logits: ``[L, V]`` ``th.model``'s logits (its greedy predictions are the agreement
            targets).
    Head ``h`` predicts offset ``h + 1``: metrics ``top1_text``, ``top5_text``, ``top1_greedy``,
    ``top5_greedy`` and, without a draft vocabulary, ``nll_text``.
    """
    heads = th.heads
    H = heads.config.num_heads
    nt = None
    if heads.config.kind == "conditioned":
        nt = MTPHeads.teacher_tokens(sample.ids, H)[None].to(heads.lm_head_weight.device)
    out = heads(tuple(hidden_states), nt)[0].float().cpu()  # [L, H, V']
    greedy = logits.argmax(-1)
    for h in range(1, H + 1):
        off = h + 1
        t = scored_positions(sample, off)
        if t.numel() == 0:
            continue
        key = Key(th.method, off, None, th.layer)
        lg = out[t, h - 1]
        top = stable_topk(lg, min(5, lg.shape[-1]))[1]
        if heads.vocab_ids is not None:
            top = heads.vocab_ids.cpu()[top]
        text = sample.ids[t + off]
        tally.add(key, "top1_text", hits(top, text, 1))
        tally.add(key, "top5_text", hits(top, text, 5))
        tally.add(key, "top1_greedy", hits(top, greedy[t + off - 1], 1))
        tally.add(key, "top5_greedy", hits(top, greedy[t + off - 1], 5))
        if heads.vocab_ids is None:
            tally.add(key, "nll_text", -F.log_softmax(lg, -1).gather(-1, text[:, None])[:, 0])
        tally.cost(key, t.numel())
