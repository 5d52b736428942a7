"""The hyper-parameters of head training (:class:`TrainConfig`) and the accepted targets."""

from __future__ import annotations

import dataclasses

TARGETS = ("text", "greedy", "kl")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of :func:`mtp_ext.training.train_heads`."""

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
            raise ValueError(
                f"steps must be >= 0 and batch_positions >= 1, got steps={self.steps}, "
                f"batch_positions={self.batch_positions}"
            )
