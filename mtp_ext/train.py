"""Training of MTP heads (``mtp_ext.train``, CLI ``mtp-ext train-heads``).

Two modes:

- **frozen** (default): the backbone is frozen. The texts are tokenized into fixed-length sequences
  (``seq_len``); the backbone runs once per batch of sequences with ``output_hidden_states=True``
  under ``torch.inference_mode``, and what the heads need (the selected hidden state, or all of them
  for WHS, the last one for KL targets, the token ids and the backbone's greedy next tokens) is
  cached, in memory and, with ``cache_dir``, on disk once (a ``.pt`` file reused by later runs).
  Each step samples ``batch_positions`` positions from the cached states (a generator seeded with
  ``seed``). With ``cache_hidden=False`` the backbone recomputes the sequences that hold the sampled
  positions at every step (same sampling, same losses; much slower).
- **joint** (``joint=True``): the backbone is trainable; each step runs it on ``joint_seqs``
  sequences and the loss is ``NTP + mtp_lambda * MTP``; two AdamW parameter groups (heads ``lr``,
  backbone ``backbone_lr``); during the first ``head_warmup_steps`` steps the backbone is frozen.

Targets (``target``), for head ``h`` (1-based) at position ``t`` (it predicts the token at
``t + 1 + h``):

- ``"text"``: the text's token at ``t + 1 + h``;
- ``"greedy"``: the backbone's own argmax at position ``t + h`` under teacher forcing (which is its
  prediction of the token at ``t + 1 + h``), cross-entropy;
- ``"kl"``: the backbone's full distribution at position ``t + h``, loss ``KL(backbone || head)``.
  The teacher logits are recomputed from the cached last hidden state through the output embedding
  (exact for Llama-style models; checked against the model's logits when caching).

The MTP loss is the sum over heads of the mean per-head loss over the positions whose target lies
inside the sequence. Validation (every ``eval_every`` steps and at the end) reports per head top-1
and top-5 accuracy against the text and against the backbone's greedy prediction (and, in joint
mode, the backbone's next-token accuracy); each evaluation is one JSON line in ``log.jsonl``.
Checkpoints (``checkpoint/``: the heads via ``save_pretrained``, plus ``trainer.pt`` with the
optimizer, the step, the sampling generator and, in joint mode, the backbone) are written every
``checkpoint_every`` steps and resumed from when ``resume`` is set.

**Distributed** (data parallel, e.g. ``torchrun --nproc_per_node N -m mtp_ext train-heads ...``;
active when ``torch.distributed`` is initialized with a world size above 1, CPU ``gloo`` or GPU
``nccl``): every rank draws the same global batch from the same seeded generator (``batch_positions``
positions, or ``joint_seqs`` sequences in joint mode, which must be divisible by the world size) and
keeps its contiguous share (rank ``r`` of ``W``: items ``[r * P / W, (r + 1) * P / W)``). Each rank's
loss is its share of the global-batch loss (each head's term weighted by the rank's number of
counted positions over the global number, which one small all-reduce gives), and the gradients of
the trainable parameters are summed across ranks after ``backward`` (an explicit all-reduce rather
than a ``DistributedDataParallel`` wrapper), before clipping; so a run on ``W`` processes follows the
single-process run on the same global batch up to float rounding, in frozen and in joint mode. The
trainable parameters are broadcast from rank 0 at the start. Only rank 0 prints progress, writes
``log.jsonl``, checkpoints and the final heads; every rank resumes from the same checkpoint
(``out_dir`` must be visible to all of them). With ``cache_dir``, rank 0 builds and saves the caches
first and the others load them after a barrier; without it, every rank builds them in memory. Every
rank evaluates the whole validation set (same result; no collective inside the evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import warnings
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .heads import MTPHeads

__all__ = [
    "TrainConfig", "train_heads", "tokenize_texts", "build_cache", "evaluate", "frequent_tokens",
    "select_layer",
]

TARGETS = ("text", "greedy", "kl")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of :func:`train_heads`."""

    steps: int = 1000
    seq_len: int = 256
    target: str = "greedy"  # "text", "greedy" or "kl"
    batch_positions: int = 512  # frozen mode: positions per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # "cosine" or "constant" (after the linear warm-up)
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    forward_batch: int = 8  # sequences per backbone forward when caching / evaluating
    cache_hidden: bool = True
    cache_dir: str | None = None  # on-disk cache folder (None: in memory only)
    cache_dtype: str = "float32"
    max_train_tokens: int | None = None
    max_val_tokens: int | None = None
    eval_every: int = 100  # 0: only at the end
    eval_batch: int = 256  # positions per chunk in validation
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    out_dir: str | None = None  # log.jsonl, checkpoint/, heads/ (None: nothing written)
    resume: bool = True
    stop_at: int | None = None  # stop after this step (checkpoint written), as a time-boxed run
    log_every: int = 10
    progress: bool = True
    # joint mode
    joint: bool = False
    joint_seqs: int = 4  # sequences per step
    mtp_lambda: float = 1.0
    backbone_lr: float = 1e-5
    head_warmup_steps: int = 0
    # draft vocabulary: heads built with draft_vocab_size get the most frequent tokens of this source
    draft_vocab_from: str = "greedy"  # "greedy" (the backbone's predictions), "text" or "keep"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {list(TARGETS)}, got {self.target!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.seq_len < 3:
            raise ValueError(f"seq_len must be >= 3, got {self.seq_len}")
        if self.draft_vocab_from not in ("greedy", "text", "keep"):
            raise ValueError(
                f"draft_vocab_from must be 'greedy', 'text' or 'keep', got {self.draft_vocab_from!r}"
            )
        if self.steps < 0 or self.batch_positions < 1:
            raise ValueError("steps must be >= 0 and batch_positions >= 1")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def tokenize_texts(
    texts, tokenizer, seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Fixed-length sequences ``[N, seq_len]`` (int64).

    ``texts`` are strings (tokenized with ``tokenizer``, each followed by its EOS token when it has
    one, concatenated and cut into ``seq_len`` pieces, the remainder dropped), or pre-tokenized: a
    2-D int tensor (used as is) or a sequence of token-id lists (concatenated likewise).
    """
    if isinstance(texts, torch.Tensor):
        if texts.dim() != 2 or texts.shape[1] != seq_len:
            raise ValueError(f"token tensor must be [N, {seq_len}], got {list(texts.shape)}")
        ids = texts.long()
        if max_tokens is not None:
            ids = ids[: max(1, max_tokens // seq_len)]
        return ids
    flat: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for item in texts:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("string texts need a tokenizer")
            flat.extend(tokenizer(item, add_special_tokens=False)["input_ids"])
            if eos is not None:
                flat.append(int(eos))
        else:
            flat.extend(int(t) for t in item)
        if max_tokens is not None and len(flat) >= max_tokens + seq_len:
            break
    n = len(flat) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise ValueError(f"texts hold {len(flat)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def frequent_tokens(ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent ids of ``ids`` (any shape, int64), most frequent first; ties and
    unseen ids filled in by lower id first. Returns ``[n]`` int64."""
    if not 1 <= n <= vocab_size:
        raise ValueError(f"n must be in [1, vocab_size={vocab_size}], got {n}")
    counts = torch.bincount(ids.reshape(-1).clamp(0, vocab_size - 1), minlength=vocab_size)
    # Stable descending sort by count: equal counts keep ascending id order.
    order = torch.sort(-counts.double(), stable=True).indices
    return order[:n].long()


def _set_draft_vocab(heads: MTPHeads, train_ids: torch.Tensor, cache: dict | None, config) -> None:
    if heads.vocab_ids is None or config.draft_vocab_from == "keep":
        return
    src = train_ids
    if config.draft_vocab_from == "greedy" and cache is not None:
        src = cache["greedy"]
    heads.set_draft_vocab(
        frequent_tokens(src, heads.config.draft_vocab_size, heads.config.vocab_size)
    )


def _layer_index(heads: MTPHeads, n_states: int) -> int | None:
    layer = heads.config.layer
    return None if layer == "whs" else layer % n_states


def _fingerprint(model, heads: MTPHeads, ids: torch.Tensor, target: str, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(ids.numpy().tobytes())
    lm = heads.lm_head_weight
    h.update(repr((heads.config.layer, target == "kl", dtype, tuple(lm.shape))).encode())
    h.update(repr(float(lm.double().sum())).encode())
    h.update(str(getattr(model, "name_or_path", "")).encode())
    return h.hexdigest()[:16]


def _cache_progress(total: int, name: str, config: TrainConfig):
    """A callable advancing a progress bar over ``total`` tokens (a no-op without progress)."""
    if not config.progress or _dist_info()[0] != 0:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, desc=f"caching hidden states ({name})", unit="tok", unit_scale=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


@torch.inference_mode()
def build_cache(
    model, heads: MTPHeads, ids: torch.Tensor, config: TrainConfig, cache_name: str = "train"
) -> dict:
    """Runs the backbone over ``ids`` once and returns (and with ``config.cache_dir`` saves) the
    cached tensors: ``ids [N, T]``, ``greedy [N, T]`` (the backbone's argmax at each position),
    ``feat`` (``[N, T, D]`` the selected hidden state, or ``[L + 1, N, T, D]`` for WHS) and, for KL
    targets, ``last [N, T, D]`` (the last hidden state, when it is not ``feat`` itself)."""
    path = None
    if config.cache_dir:
        key = _fingerprint(model, heads, ids, config.target, config.cache_dtype)
        path = os.path.join(config.cache_dir, f"hidden-{cache_name}-{key}.pt")
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu", weights_only=True)
    dtype = getattr(torch, config.cache_dtype)
    device = heads.lm_head_weight.device
    N, T = ids.shape
    whs = heads.config.layer == "whs"
    if whs:
        L1 = (heads.config.num_layers or 0) + 1
        gib = L1 * N * T * heads.config.hidden_size * dtype.itemsize / 2**30
        warnings.warn(
            f"caching all {L1} hidden states for WHS: {gib:.2f} GiB for {N * T} tokens",
            stacklevel=2,
        )
    feats, lasts, greedy = [], [], []
    checked = False
    bar = _cache_progress(N * T, cache_name, config)
    for i in range(0, N, config.forward_batch):
        x = ids[i : i + config.forward_batch].to(device)
        out = model(x, output_hidden_states=True)
        bar(x.numel())
        hs = out.hidden_states
        greedy.append(out.logits.argmax(-1).cpu())
        li = _layer_index(heads, len(hs))
        if whs:
            feats.append(torch.stack([h.to(dtype).cpu() for h in hs], 0))
        else:
            feats.append(hs[li].to(dtype).cpu())
        if config.target == "kl":
            if not checked:
                rec = model.get_output_embeddings()(hs[-1][:1, :4])
                if not torch.allclose(rec.float(), out.logits[:1, :4].float(), atol=1e-3, rtol=1e-3):
                    raise ValueError(
                        "target='kl' recomputes the backbone's logits from its last hidden state "
                        "through the output embedding, which does not reproduce this model's logits"
                    )
                checked = True
            if whs or li != len(hs) - 1:
                lasts.append(hs[-1].to(dtype).cpu())
    cache = {
        "ids": ids.cpu(),
        "greedy": torch.cat(greedy, 0),
        "feat": torch.cat(feats, 1 if whs else 0),
    }
    if lasts:
        cache["last"] = torch.cat(lasts, 0)
    if path is not None:
        os.makedirs(config.cache_dir, exist_ok=True)
        torch.save(cache, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cache


def select_layer(cache: dict, layer: int) -> dict:
    """A single-layer view of an all-layer cache (one built for ``layer="whs"`` heads, ``feat``
    ``[L + 1, N, T, D]``): the cache that heads reading hidden state ``layer`` would have built."""
    feat = cache["feat"]
    if feat.dim() != 4:
        raise ValueError(f"select_layer needs an all-layer cache (feat [L + 1, N, T, D]), got "
                         f"feat of shape {list(feat.shape)}")
    out = {"ids": cache["ids"], "greedy": cache["greedy"], "feat": feat[layer]}
    if "last" in cache:
        out["last"] = cache["last"]
    return out


# ----------------------------------------------------------------------------------------------
# Targets and losses
# ----------------------------------------------------------------------------------------------


def head_targets(ids: torch.Tensor, greedy: torch.Tensor, s, t, num_heads: int, target: str):
    """Targets ``[P, H]`` (full-vocabulary ids, -100 past the end) for positions ``(s[P], t[P])``:
    the text's token at ``t + 1 + h`` or the backbone's greedy token at position ``t + h``."""
    T = ids.shape[1]
    hs = torch.arange(1, num_heads + 1)
    if target == "text":
        pos = t[:, None] + 1 + hs[None]
        src = ids
    else:
        pos = t[:, None] + hs[None]
        src = greedy
    valid = (t[:, None] + 1 + hs[None]) < T
    out = src[s[:, None], pos.clamp(max=T - 1)]
    return out.masked_fill(~valid, -100), valid


def _teacher_tokens(ids: torch.Tensor, s, t, num_heads: int) -> torch.Tensor:
    """``next_tokens[P, H]`` for conditioned heads: the text's tokens at ``t + 1 + d``."""
    T = ids.shape[1]
    pos = (t[:, None] + 1 + torch.arange(num_heads)[None]).clamp(max=T - 1)
    return ids[s[:, None], pos]


def mtp_loss(
    heads: MTPHeads,
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    scale: Sequence[float] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Sum over heads of the mean loss over valid positions; returns ``(loss, per-head losses)``.

    ``logits [P, H, V']``; ``targets [P, H]`` full-vocabulary ids (-100: no target); for KL,
    ``teacher_logits [P, H, V]`` the backbone's logits at ``t + h``. ``scale`` (``H`` factors,
    default 1) multiplies each head's term in ``loss`` (not in the per-head losses): distributed
    training passes this rank's counted positions over the global count (see :func:`_head_counts`).
    """
    total = logits.new_zeros((), dtype=torch.float32)
    per = []
    for h in range(logits.shape[1]):
        lg = logits[:, h].float()
        if teacher_logits is not None:
            m = valid[:, h]
            if not bool(m.any()):
                per.append(float("nan"))
                continue
            tl = teacher_logits[m, h].float()
            if heads.vocab_ids is not None:
                tl = tl[:, heads.vocab_ids]
            lh = F.kl_div(
                F.log_softmax(lg[m], -1), F.log_softmax(tl, -1), log_target=True,
                reduction="batchmean",
            )
        else:
            tg = heads.draft_index(targets[:, h].clamp(min=0)).masked_fill(targets[:, h] < 0, -100)
            if not bool((tg >= 0).any()):
                per.append(float("nan"))
                continue
            lh = F.cross_entropy(lg, tg, ignore_index=-100)
        total = total + (lh if scale is None else lh * float(scale[h]))
        per.append(float(lh.detach()))
    return total, per


def _head_counts(
    heads: MTPHeads, targets: torch.Tensor, valid: torch.Tensor, kl: bool
) -> torch.Tensor:
    """``[H]`` (int64) the number of positions each head's term of :func:`mtp_loss` averages over:
    the valid ones for KL, else those whose target is in the draft vocabulary (cross-entropy
    ignores the others)."""
    if kl:
        return valid.sum(0)
    tg = heads.draft_index(targets.clamp(min=0)).masked_fill(targets < 0, -100)
    return (tg >= 0).sum(0)


def _topk_hits(heads: MTPHeads, logits: torch.Tensor, targets: torch.Tensor, k: int):
    """``[P, H]`` bool: the target is among the top ``k`` (full-vocabulary ids)."""
    k = min(k, logits.shape[-1])
    top = logits.float().topk(k, -1).indices
    if heads.vocab_ids is not None:
        top = heads.vocab_ids[top]
    return (top == targets[..., None]).any(-1)


# ----------------------------------------------------------------------------------------------
# Sampling, schedule, progress
# ----------------------------------------------------------------------------------------------


def _sample_positions(N: int, T: int, P: int, gen: torch.Generator, whole: bool = False):
    """``P`` positions ``(s, t)`` uniformly among those with a head-1 target (``t + 2 < T``); with
    ``whole``, the positions of ``ceil(P / (T - 2))`` random sequences in order (the last one cut
    to make ``P``): what heads that attend over the sequence (the transformer kind) need, since
    their cost grows with the distinct sequences of a batch."""
    per = T - 2
    if whole:
        n = -(-P // per)
        seqs = torch.randint(0, N, (n,), generator=gen)
        return seqs.repeat_interleave(per)[:P], torch.arange(per).repeat(n)[:P]
    flat = torch.randint(0, N * per, (P,), generator=gen)
    return flat // per, flat % per


# ----------------------------------------------------------------------------------------------
# Distributed (data parallel) helpers
# ----------------------------------------------------------------------------------------------

_BUCKET_NUMEL = 1 << 24  # gradient elements per all-reduce (bounds the flat buffer's memory)


def _dist_info() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` when not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_slice(n: int, rank: int, world: int, what: str = "batch") -> slice:
    """Rank ``rank``'s contiguous share ``[rank * n / world, (rank + 1) * n / world)`` of ``n``
    items of a global batch; ``n`` must be divisible by ``world`` (``what`` names it in the error)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if n % world:
        raise ValueError(
            f"{what}={n} must be divisible by the world size {world} (every rank takes an equal "
            f"share of the global batch)"
        )
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def _check_distributed(config: TrainConfig, world: int) -> None:
    """Raises ``ValueError`` when the global batch cannot be split evenly over ``world`` ranks."""
    if config.joint:
        _rank_slice(config.joint_seqs, 0, world, "joint_seqs")
    else:
        _rank_slice(config.batch_positions, 0, world, "batch_positions")


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks (a new tensor on ``x``'s device and dtype)."""
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def _global_scale(local: torch.Tensor, world: int) -> list[float] | None:
    """Per-head factors ``local / global`` of the counted positions (``None`` on one process), so
    that the ranks' scaled losses sum to the global-batch loss."""
    if world == 1:
        return None
    glob = _all_reduce_sum(local.double())
    return (local.double() / glob.clamp(min=1)).tolist()


def _broadcast_params(tensors: Sequence[torch.Tensor]) -> None:
    """Copies rank 0's values of ``tensors`` to every rank (in place)."""
    for x in tensors:
        dist.broadcast(x.data, src=0)


def _buckets(params: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``params`` of at most ``limit`` elements (or one parameter)."""
    out: list[list[torch.Tensor]] = [[]]
    n = 0
    for p in params:
        if out[-1] and n + p.numel() > limit:
            out.append([])
            n = 0
        out[-1].append(p)
        n += p.numel()
    return out


def _all_reduce_grads(
    params: Sequence[torch.Tensor], scalars: dict[str, float], device: torch.device
) -> dict[str, float]:
    """Sums the gradients of the parameters that require one, and ``scalars``, over the ranks.

    Runs after ``backward``: a rank without a gradient for a parameter contributes zeros, and a
    parameter no rank has a gradient for keeps ``grad=None`` (as in a single process). Every rank
    must call it with the same parameters in the same order; the sums run in float64 on ``device``
    (a CUDA device for ``nccl``). Returns the summed ``scalars``."""
    params = [p for p in params if p.requires_grad]
    keys = list(scalars)
    out = dict(scalars)
    for i, bucket in enumerate(_buckets(params, _BUCKET_NUMEL)):
        head = [float(p.grad is not None) for p in bucket] + (
            [float(scalars[k]) for k in keys] if i == 0 else []
        )
        parts = [torch.tensor(head, dtype=torch.float64, device=device)]
        parts += [
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
            .to(device, torch.float64)
            for p in bucket
        ]
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flags = flat[: len(bucket)].tolist()
        if i == 0:
            out = dict(zip(keys, flat[len(bucket) : len(head)].tolist()))
        offset = len(head)
        for p, has in zip(bucket, flags):
            g = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if has == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = g.to(p.device, p.dtype)
            else:
                p.grad.copy_(g)
    return out


def _check_same_step(step: int, world: int, device: torch.device) -> None:
    """Raises when the ranks resumed at different steps (a checkpoint only some of them see)."""
    if world == 1:
        return
    x = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    if int(x[0]) != -int(x[1]):
        raise RuntimeError(
            f"ranks resumed at different steps (from {-int(x[1])} to {int(x[0])}): out_dir and its "
            f"checkpoint must be visible to every rank"
        )


def _shared_cache(model, heads: MTPHeads, ids: torch.Tensor, config: TrainConfig, name: str,
                  rank: int, world: int) -> dict:
    """:func:`build_cache`; distributed with ``cache_dir``, rank 0 builds and saves it first and
    the other ranks load the file after a barrier."""
    if world == 1 or not config.cache_dir:
        return build_cache(model, heads, ids, config, name)
    cache = build_cache(model, heads, ids, config, name) if rank == 0 else None
    dist.barrier()
    return cache if cache is not None else build_cache(model, heads, ids, config, name)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    p = min(1.0, (step - config.warmup_steps) / span)
    r = config.min_lr_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))


class _Progress:
    """tqdm when installed, otherwise a line every ``log_every`` steps."""

    def __init__(self, total: int, initial: int, config: TrainConfig):
        self.config = config
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = initial
        if not config.progress:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train-heads")
        except ImportError:
            self.bar = None

    def update(self, step: int, info: dict):
        if not self.config.progress:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
        elif step % max(1, self.config.log_every) == 0 or step == self.config.steps:
            dt = time.perf_counter() - self.t0
            rate = (step - self.start) / dt if dt > 0 else 0.0
            items = " ".join(f"{k}={v:.4g}" for k, v in info.items())
            print(f"train-heads step {step}/{self.config.steps} {items} ({rate:.2f} steps/s)",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _sequence_heads_forward(heads: MTPHeads, feat, s, t) -> torch.Tensor:
    """Logits ``[P, H, V']`` of ``"transformer"`` heads (which attend over the sequence) at
    positions ``(s[P], t[P])`` of cached features ``feat`` (``[N, T, D]``, or ``[L + 1, N, T, D]``
    for WHS): the heads run on the distinct sequences among ``s``, cut after the last position
    asked for (causal attention: later positions change nothing before them), and only the ``P``
    gathered block outputs go through the norm and the unembedding."""
    device = heads.lm_head_weight.device
    uniq, inv = torch.unique(s, return_inverse=True)
    end = int(t.max()) + 1
    if heads.config.layer == "whs":
        x = tuple(a.to(device) for a in feat[:, uniq.to(feat.device), :end])
    else:
        x = feat[uniq.to(feat.device), :end].to(device)
    z = heads.block_outputs(x)  # [n, end, H, D]
    return heads.unembed(z[inv.to(device), t.to(device)])


def _heads_forward(heads: MTPHeads, feat, ids, s, t):
    """Heads' logits for positions ``(s, t)`` of cached features."""
    if heads.config.kind == "transformer":
        return _sequence_heads_forward(heads, feat, s, t)
    device = heads.lm_head_weight.device
    if heads.config.layer == "whs":
        x = tuple(a.to(device) for a in feat[:, s, t])
    else:
        x = feat[s, t].to(device)
    nt = None
    if heads.config.kind == "conditioned":
        nt = _teacher_tokens(ids, s, t, heads.config.num_heads).to(heads.lm_head_weight.device)
    return heads(x, nt)


@torch.no_grad()
def evaluate(heads: MTPHeads, cache: dict, config: TrainConfig) -> dict:
    """Per-head top-1 / top-5 accuracy on every position of a cache (chunks of ``eval_batch``),
    against the text and against the backbone's greedy prediction; plus the backbone's own
    next-token accuracy and the mean MTP loss (per head) for the configured target."""
    ids, greedy = cache["ids"], cache["greedy"]
    N, T = ids.shape
    H = heads.config.num_heads
    s_all = torch.arange(N).repeat_interleave(T - 2)
    t_all = torch.arange(T - 2).repeat(N)
    sums = {k: torch.zeros(H, dtype=torch.float64) for k in ("t1", "t5", "g1", "g5")}
    counts = torch.zeros(H, dtype=torch.float64)
    loss_sum = torch.zeros(H, dtype=torch.float64)
    was_training = heads.training
    heads.eval()
    for i in range(0, s_all.numel(), config.eval_batch):
        s, t = s_all[i : i + config.eval_batch], t_all[i : i + config.eval_batch]
        logits = _heads_forward(heads, cache["feat"], ids, s, t).cpu()
        tt, valid = head_targets(ids, greedy, s, t, H, "text")
        tg, _ = head_targets(ids, greedy, s, t, H, "greedy")
        v = valid.double()
        counts += v.sum(0)
        sums["t1"] += (_topk_hits(heads, logits, tt, 1).double() * v).sum(0)
        sums["t5"] += (_topk_hits(heads, logits, tt, 5).double() * v).sum(0)
        sums["g1"] += (_topk_hits(heads, logits, tg, 1).double() * v).sum(0)
        sums["g5"] += (_topk_hits(heads, logits, tg, 5).double() * v).sum(0)
        tl = None
        if config.target == "kl":
            tl = _teacher_logits(heads, cache, s, t, valid).cpu()
        targets = tt if config.target == "text" else tg
        _, per = mtp_loss(heads, logits, targets, valid, tl)
        loss_sum += torch.tensor([0.0 if math.isnan(p) else p for p in per], dtype=torch.float64) * v.sum(0)
    heads.train(was_training)
    c = counts.clamp(min=1)
    res = {
        "top1_text": (sums["t1"] / c).tolist(),
        "top5_text": (sums["t5"] / c).tolist(),
        "top1_greedy": (sums["g1"] / c).tolist(),
        "top5_greedy": (sums["g5"] / c).tolist(),
        "loss": (loss_sum / c).tolist(),
        "positions": counts.tolist(),
        "ntp_top1_text": float((greedy[:, :-1] == ids[:, 1:]).double().mean()),
    }
    return res


def _teacher_logits(heads: MTPHeads, cache: dict, s, t, valid) -> torch.Tensor:
    """The backbone's logits ``[P, H, V]`` at positions ``t + h`` (from the last hidden state)."""
    last = cache.get("last")
    if last is None:
        last = cache["feat"]  # the heads read the last hidden state itself
    T = last.shape[1]
    H = heads.config.num_heads
    pos = (t[:, None] + torch.arange(1, H + 1)[None]).clamp(max=T - 1)
    x = last[s[:, None], pos].to(heads.lm_head_weight.device).float()
    return x @ heads.lm_head_weight.float().T


# ----------------------------------------------------------------------------------------------
# Checkpoints and log
# ----------------------------------------------------------------------------------------------


def _save_checkpoint(dirpath, heads, optimizer, scheduler, step, gen, history, model=None):
    tmp = dirpath + ".tmp"
    heads.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": gen.get_state(),
        "history": history,
    }
    if model is not None:
        state["backbone"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(tmp, "trainer.pt"))
    if os.path.isdir(dirpath):
        import shutil

        shutil.rmtree(dirpath)
    os.replace(tmp, dirpath)


def _load_checkpoint(dirpath, heads, optimizer, scheduler, gen, model=None) -> tuple[int, dict]:
    from safetensors.torch import load_file

    from .heads import WEIGHTS_NAME

    state = load_file(os.path.join(dirpath, WEIGHTS_NAME), device=str(heads.lm_head_weight.device))
    heads.load_state_dict(state, strict=True)
    tr = torch.load(os.path.join(dirpath, "trainer.pt"), map_location="cpu", weights_only=False)
    if model is not None and "backbone" in tr:
        model.load_state_dict(tr["backbone"])
    optimizer.load_state_dict(tr["optimizer"])
    scheduler.load_state_dict(tr["scheduler"])
    gen.set_state(tr["generator"])
    return int(tr["step"]), tr.get("history", {})


def _log(config: TrainConfig, record: dict) -> None:
    if config.out_dir:
        os.makedirs(config.out_dir, exist_ok=True)
        with open(os.path.join(config.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _uncached_features(model, heads, ids, s, config):
    """Recomputes the needed sequences (``cache_hidden=False``); returns a mini-cache and the
    remapped sequence indices."""
    uniq, inv = torch.unique(s, return_inverse=True)
    cache = build_cache(
        model, heads, ids[uniq], dataclasses.replace(config, cache_dir=None), "step"
    )
    return cache, inv


def _eval_record(step, res, config, extra=None) -> dict:
    rec = {"step": step, "time": time.time()}
    rec.update(res)
    if extra:
        rec.update(extra)
    return rec


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
    """Trains ``heads`` on ``model``'s hidden states (see the module docstring).

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
    same arguments and trains its share of each global batch (see the module docstring); all ranks
    return the same history (global-batch losses) and evaluations. Raises ``ValueError`` when
    ``batch_positions`` (``joint_seqs`` in joint mode) is not divisible by the world size.
    """
    config = config or TrainConfig()
    rank, world = _dist_info()
    _check_distributed(config, world)
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
    lambdas = [lambda st: _lr_factor(st, config)]
    if config.joint:
        lambdas.append(
            lambda st: _lr_factor(st, config) if st >= config.head_warmup_steps else 0.0
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)

    history = {"step": [], "loss": [], "lr": [], "backbone_lr": []}
    evals: list[dict] = []
    step = 0
    ckpt = os.path.join(config.out_dir, "checkpoint") if config.out_dir else None
    if ckpt and config.resume and os.path.isfile(os.path.join(ckpt, "trainer.pt")):
        step, history = _load_checkpoint(
            ckpt, heads, optimizer, scheduler, gen, model if config.joint else None
        )
        if rank == 0:
            print(f"train-heads: resumed from {ckpt} at step {step}", file=sys.stderr)
    device = heads.lm_head_weight.device
    _check_same_step(step, world, device)

    # Caches (frozen mode): train once, validation once.
    t0 = time.perf_counter()
    if config.joint and (train_cache is not None or val_cache is not None):
        raise ValueError("train_cache and val_cache are for frozen mode; joint mode recomputes")
    if train_cache is not None:
        train_ids = train_cache["ids"]
    elif not config.joint and config.cache_hidden:
        train_cache = _shared_cache(model, heads, train_ids, config, "train", rank, world)
    timing["cache_train_s"] = time.perf_counter() - t0
    if step == 0:  # a resumed run keeps the vocabulary its checkpoint holds
        _set_draft_vocab(heads, train_ids, train_cache, config)
    t0 = time.perf_counter()
    if val_cache is not None:
        val_ids = val_cache["ids"]
    elif not config.joint:
        val_cache = _shared_cache(model, heads, val_ids, config, "val", rank, world)
    timing["cache_val_s"] = time.perf_counter() - t0
    if world > 1:  # every rank starts from rank 0's parameters
        _broadcast_params(head_params + (backbone_params if config.joint else []))

    def run_eval(at_step):
        if config.joint:
            vc = build_cache(model, heads, val_ids, dataclasses.replace(config, cache_dir=None), "v")
        else:
            vc = val_cache
        res = evaluate(heads, vc, config)
        rec = _eval_record(at_step, res, config)
        evals.append(rec)
        if rank == 0:
            _log(config, rec)
        return res

    bar = _Progress(config.steps, step,
                    config if rank == 0 else dataclasses.replace(config, progress=False))
    t0 = time.perf_counter()
    heads.train()
    trainable = head_params + (backbone_params if config.joint else [])
    while step < config.steps:
        if config.joint:
            loss, info = _joint_step(model, heads, train_ids, gen, step, config, backbone_params,
                                     rank, world)
        else:
            loss, info = _frozen_step(model, heads, train_ids, train_cache, gen, config,
                                      rank, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # this rank's share of the global-batch gradient: sum the shares
            info = _all_reduce_grads(trainable, info, device)
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
            _save_checkpoint(ckpt, heads, optimizer, scheduler, step, gen, history,
                             model if config.joint else None)
        if config.stop_at is not None and step >= config.stop_at:
            break
    bar.close()
    timing["train_s"] = time.perf_counter() - t0
    for p in backbone_params:
        p.requires_grad_(False)
    heads.eval()
    finished = step >= config.steps
    if ckpt and rank == 0 and config.stop_at is not None and not finished:
        _save_checkpoint(ckpt, heads, optimizer, scheduler, step, gen, history,
                         model if config.joint else None)
    t0 = time.perf_counter()
    final = run_eval(step)
    timing["eval_s"] = time.perf_counter() - t0
    if config.out_dir and finished and rank == 0:
        heads.save_pretrained(os.path.join(config.out_dir, "heads"))
    if world > 1:  # on return, rank 0's files are written on every rank
        dist.barrier()
    return {
        "history": history,
        "evals": evals,
        "final": final,
        "step": step,
        "timing": timing,
        "train_tokens": train_ids.numel(),
        "val_tokens": val_ids.numel(),
    }


def _frozen_step(model, heads: MTPHeads, train_ids: torch.Tensor, train_cache: dict | None,
                 gen: torch.Generator, config: TrainConfig, rank: int = 0, world: int = 1):
    """One frozen-mode step's loss on ``batch_positions`` sampled positions (this rank's share of
    them when distributed: its loss terms are scaled so that the ranks' losses sum to the global
    batch's). Returns ``(loss, {"loss": global-batch loss on one process, this rank's share
    otherwise})``."""
    H = heads.config.num_heads
    device = heads.lm_head_weight.device
    N, T = train_ids.shape
    whole = heads.config.kind == "transformer"
    s, t = _sample_positions(N, T, config.batch_positions, gen, whole)  # the same on every rank
    if world > 1:
        mine = _rank_slice(config.batch_positions, rank, world, "batch_positions")
        s, t = s[mine], t[mine]
    if train_cache is not None:
        cache, si = train_cache, s
    else:
        cache, si = _uncached_features(model, heads, train_ids, s, config)
    logits = _heads_forward(heads, cache["feat"], cache["ids"], si, t)
    targets, valid = head_targets(cache["ids"], cache["greedy"], si, t, H, config.target)
    targets, valid = targets.to(device), valid.to(device)
    kl = config.target == "kl"
    tl = _teacher_logits(heads, cache, si, t, valid.cpu()) if kl else None
    scale = _global_scale(_head_counts(heads, targets, valid, kl), world) if world > 1 else None
    loss, _ = mtp_loss(heads, logits, targets, valid, tl, scale)
    return loss, {"loss": float(loss.detach())}


def _joint_step(model, heads, train_ids, gen, step, config, backbone_params, rank=0, world=1):
    """One joint step: NTP + lambda * MTP on ``joint_seqs`` sequences (the backbone frozen during
    the head warm-up); distributed, on this rank's share of them, its loss scaled so that the
    ranks' losses (and the returned ``loss`` / ``ntp`` / ``mtp`` values) sum to the global
    batch's."""
    H = heads.config.num_heads
    device = heads.lm_head_weight.device
    unfrozen = step >= config.head_warmup_steps
    for p in backbone_params:
        p.requires_grad_(unfrozen)
    idx = torch.randint(0, train_ids.shape[0], (config.joint_seqs,), generator=gen)
    if world > 1:
        idx = idx[_rank_slice(config.joint_seqs, rank, world, "joint_seqs")]
    x = train_ids[idx].to(device)
    with torch.set_grad_enabled(unfrozen):
        out = model(x, output_hidden_states=True)
    hs = out.hidden_states
    if not unfrozen:
        hs = tuple(h.detach() for h in hs)
    n, T = x.shape
    ntp = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                          x[:, 1:].reshape(-1))
    s = torch.arange(n).repeat_interleave(T - 2)
    t = torch.arange(T - 2).repeat(n)
    if heads.config.layer == "whs":
        feat = torch.stack(hs, 0)
    else:
        feat = hs[heads.config.layer]
    greedy = out.logits.detach().argmax(-1).cpu()
    logits = _heads_forward(heads, feat, x.cpu(), s, t)
    targets, valid = head_targets(x.cpu(), greedy, s, t, H, config.target)
    tl = None
    if config.target == "kl":
        pos = (t[:, None] + torch.arange(1, H + 1)[None]).clamp(max=T - 1)
        tl = out.logits.detach()[s[:, None], pos]
    targets, valid = targets.to(device), valid.to(device)
    scale = None
    if world > 1:  # equal shares of equal-length sequences: the NTP mean scales by 1 / world
        ntp = ntp / world
        scale = _global_scale(_head_counts(heads, targets, valid, tl is not None), world)
    mtp, _ = mtp_loss(heads, logits, targets, valid, tl, scale)
    loss = (ntp if unfrozen else ntp.detach()) + config.mtp_lambda * mtp
    return loss, {"loss": float(loss.detach()), "ntp": float(ntp.detach()), "mtp": float(mtp.detach())}
