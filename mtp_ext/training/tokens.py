"""Token data for head training: texts cut into fixed-length sequences, and the draft vocabulary
(the most frequent tokens) chosen from them."""

from __future__ import annotations

import torch

from ..heads import MTPHeads
from .config import TrainConfig


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


def set_draft_vocab(
    heads: MTPHeads, train_ids: torch.Tensor, cache: dict | None, config: TrainConfig
) -> None:
    """Gives heads built with a draft vocabulary the most frequent tokens of
    ``config.draft_vocab_from``: the training text ``train_ids`` (``[N, T]`` int64) or the
    backbone's greedy predictions (``cache["greedy"]``, when there is a cache); ``"keep"``, or heads
    over the full vocabulary, change nothing."""
    if heads.vocab_ids is None or config.draft_vocab_from == "keep":
        return
    src = train_ids
    if config.draft_vocab_from == "greedy" and cache is not None:
        src = cache["greedy"]
    heads.set_draft_vocab(
        frequent_tokens(src, heads.config.draft_vocab_size, heads.config.vocab_size)
    )
