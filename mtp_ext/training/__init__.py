"""Training of MTP heads (``mtp_ext.training``, CLI ``mtp-ext train-heads``).

Two modes:

- **frozen** (default): the backbone is frozen. The texts are tokenized into fixed-length sequences
  (``seq_len``, :mod:`.tokens`); the backbone runs once per batch of sequences and what the heads
  need is cached (:mod:`.cache`). Each step samples ``batch_positions`` positions from the cached
  states (a generator seeded with ``seed``). With ``cache_hidden=False`` the backbone recomputes
  the sequences that hold the sampled positions at every step (same sampling, same losses; much
  slower).
- **joint** (``joint=True``): the backbone is trainable; each step runs it on ``joint_seqs``
  sequences and the loss is ``NTP + mtp_lambda * MTP``; two AdamW parameter groups (heads ``lr``,
  backbone ``backbone_lr``); during the first ``head_warmup_steps`` steps the backbone is frozen.

Targets and the MTP loss: :mod:`.losses`. Validation (every ``eval_every`` steps and at the end,
:mod:`.validation`) reports per head top-1 and top-5 accuracy against the text and against the
backbone's greedy prediction (and, in joint mode, the backbone's next-token accuracy); each
evaluation is one JSON line in ``log.jsonl`` (:mod:`.progress`). Checkpoints (:mod:`.checkpoint`)
are written every ``checkpoint_every`` steps and resumed from when ``resume`` is set. Several
processes (``torchrun``) train data-parallel on shares of one global batch: :mod:`.distributed`.

Modules: :mod:`.config` (:class:`TrainConfig`), :mod:`.tokens`, :mod:`.cache`, :mod:`.forward`
(the heads' logits at chosen positions), :mod:`.losses`, :mod:`.validation`, :mod:`.steps` (one
step's loss), :mod:`.distributed`, :mod:`.checkpoint`, :mod:`.progress` and :mod:`.loop`
(:func:`train_heads`).
"""

from .cache import build_cache, select_layer
from .config import TARGETS, TrainConfig
from .distributed import dist_info
from .loop import train_heads
from .losses import head_targets, mtp_loss
from .tokens import frequent_tokens, tokenize_texts
from .validation import evaluate

__all__ = [
    "TARGETS", "TrainConfig", "train_heads", "tokenize_texts", "build_cache", "evaluate",
    "frequent_tokens", "select_layer", "mtp_loss", "head_targets", "dist_info",
]
