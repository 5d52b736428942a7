"""Scored token samples of the project's texts for teacher-forced evaluation.

A :class:`Sample` is one token sequence ``ids[L]`` with ``scored[L]``: ``scored[j]`` says whether
token ``j`` counts as a target (a method predicting offset ``d`` from position ``t`` is scored at
``t + d`` when ``scored[t + d]``). Datasets:

- ``"en-es"``: one aligned verse pair per sample, ``"English: <en>\\nSpanish:"`` followed by
  ``" <es>"``; the model sees the English verse and the start of the Spanish one, and only the
  Spanish tokens are scored.
- ``"web"`` (World English Bible), ``"austen"`` (Jane Austen's novels), ``"python"`` (standard
  library code): the split's items, shuffled with a fixed seed, separated by the EOS token and cut
  into windows of ``seq_len`` tokens, at most ``max_windows_per_item`` windows from any one item;
  every token but the first is scored.

The same builders give the training windows of the heads study (:func:`training_windows`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Callable, Sequence

import torch

__all__ = ["DATASETS", "Sample", "build_samples", "format_pair", "training_windows", "load_items"]

DATASETS = ("en-es", "web", "austen", "python")


@dataclasses.dataclass
class Sample:
    """``ids[L]`` int64 tokens and ``scored[L]`` bool targets of one evaluation sequence."""

    ids: torch.Tensor
    scored: torch.Tensor

    def __post_init__(self):
        if self.ids.dim() != 1 or self.scored.shape != self.ids.shape:
            raise ValueError(
                f"ids and scored must be 1-D of one length, got {list(self.ids.shape)} and "
                f"{list(self.scored.shape)}"
            )


def format_pair(en: str, es: str) -> tuple[str, str]:
    """The en-es prompt (``"English: <en>\\nSpanish:"``) and the scored continuation (``" <es>"``)."""
    return f"English: {en.strip()}\nSpanish:", " " + es.strip()


def load_items(name: str, split: str) -> list[str]:
    """Items of one split of a project text (see :mod:`mtp_ext.data.texts`)."""
    from ..data.texts import load_text

    return load_text(name, split)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _pair_sample(tokenizer, item: str, seq_len: int) -> Sample | None:
    if "\t" not in item:
        raise ValueError("en-es items must be 'English\\tSpanish'")
    en, es = item.split("\t", 1)
    prompt, target = format_pair(en, es)
    a, b = _encode(tokenizer, prompt), _encode(tokenizer, target)
    ids = (a + b)[:seq_len]
    if len(ids) <= len(a):
        return None
    scored = [False] * len(a) + [True] * (len(ids) - len(a))
    return Sample(torch.tensor(ids, dtype=torch.long), torch.tensor(scored))


def _stream_windows(
    tokenizer, items: Sequence[str], seq_len: int, count: int, max_windows_per_item: int
) -> list[torch.Tensor]:
    eos = getattr(tokenizer, "eos_token_id", None)
    cap = max_windows_per_item * seq_len
    stream: list[int] = []
    windows: list[torch.Tensor] = []
    for item in items:
        toks = _encode(tokenizer, item)[:cap]
        stream.extend(toks)
        if eos is not None:
            stream.append(int(eos))
        while len(stream) >= seq_len and len(windows) < count:
            windows.append(torch.tensor(stream[:seq_len], dtype=torch.long))
            stream = stream[seq_len:]
        if len(windows) >= count:
            break
    return windows


def build_samples(
    tokenizer,
    name: str,
    split: str = "test",
    count: int = 16,
    seq_len: int = 128,
    seed: int = 0,
    max_windows_per_item: int = 2,
    items: Sequence[str] | None = None,
) -> list[Sample]:
    """``count`` scored samples of dataset ``name`` (see the module docstring).

    Args:
        tokenizer: the model's tokenizer.
        name: ``"en-es"`` or a text evaluated as a stream of windows (``"web"``, ``"austen"``,
            ``"python"``, or any name when ``items`` is given).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        count: number of samples (fewer when the split runs out).
        seq_len: window length (en-es: the longest sample; longer pairs are cut).
        seed: shuffles the items.
        items: the items themselves instead of the project's text (``"English\\tSpanish"`` pairs
            for ``"en-es"``).
    """
    if count < 1 or seq_len < 4:
        raise ValueError(f"count must be >= 1 and seq_len >= 4, got {count} and {seq_len}")
    items = list(items) if items is not None else load_items(name, split)
    random.Random(seed).shuffle(items)
    if name == "en-es":
        out = []
        for item in items:
            s = _pair_sample(tokenizer, item, seq_len)
            if s is not None:
                out.append(s)
            if len(out) >= count:
                break
        return out
    windows = _stream_windows(tokenizer, items, seq_len, count, max_windows_per_item)
    out = []
    for w in windows:
        scored = torch.ones(seq_len, dtype=torch.bool)
        scored[0] = False
        out.append(Sample(w, scored))
    return out


def training_windows(
    tokenizer,
    names: Sequence[str],
    split: str,
    tokens_per_dataset: int,
    seq_len: int,
    seed: int = 0,
    items_for: Callable[[str, str], list[str]] | None = None,
) -> torch.Tensor:
    """``[N, seq_len]`` int64 windows mixing datasets (``tokens_per_dataset`` each), for training
    heads: en-es pairs as the evaluation formats them, the others as streams, then shuffled."""
    items_for = items_for or load_items
    windows: list[torch.Tensor] = []
    count = max(1, tokens_per_dataset // seq_len)
    for name in names:
        items = list(items_for(name, split))
        if name == "en-es":
            items = ["".join(format_pair(*it.split("\t", 1))) for it in items]
        random.Random(seed).shuffle(items)
        windows.extend(_stream_windows(tokenizer, items, seq_len, count, max_windows_per_item=4))
    if not windows:
        raise ValueError(f"no training windows of {seq_len} tokens in {list(names)}")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
    return torch.stack([windows[i] for i in order.tolist()])
