"""Side-by-side runs of ``mtp_ext.generate`` and ``model.generate`` (the CLI's ``--compare``, the
demo and the generation benchmark)."""

from __future__ import annotations

import dataclasses
import time

import torch

from ..decoding import generate
from ..heads import MTPHeads

__all__ = ["Comparison", "compare_generate", "encode_prompt"]


@dataclasses.dataclass
class Comparison:
    """One prompt, both decoders, same settings.

    Attributes:
        sequences: ``[B, P + N]`` from ``mtp_ext.generate``.
        reference: ``[B, P + N']`` from ``model.generate`` (None when not run).
        identical: whether the two are equal (None when not compared).
        seconds, reference_seconds: wall times.
        new_tokens: tokens generated (all rows).
        tokens_per_step: mean tokens emitted per tree step.
    """

    sequences: torch.Tensor
    reference: torch.Tensor | None
    identical: bool | None
    seconds: float
    reference_seconds: float | None
    new_tokens: int
    tokens_per_step: float

    @property
    def speedup(self) -> float | None:
        if self.reference_seconds is None or self.seconds <= 0:
            return None
        return self.reference_seconds / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """``[1, P]`` int64 ids of ``prompt`` (wrapped in the tokenizer's chat template if ``chat``)."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def compare_generate(
    model, heads: MTPHeads, input_ids: torch.Tensor, *, reference: bool = True, streamer=None,
    **settings,
) -> Comparison:
    """Runs ``mtp_ext.generate`` (and ``model.generate`` with ``reference``) with ``settings``
    (``max_new_tokens``, ``do_sample``, ``tree``, ...; ``tree`` goes to ours only)."""
    ours_only = {"tree", "backend", "generator"}
    t0 = time.perf_counter()
    out = generate(model, input_ids, heads, return_dict_in_generate=True, streamer=streamer,
                   **settings)
    seconds = time.perf_counter() - t0
    ref = ref_s = same = None
    if reference:
        hf = {k: v for k, v in settings.items() if k not in ours_only}
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = model.generate(input_ids, **hf)
        ref_s = time.perf_counter() - t0
        same = bool(ref.shape == out.sequences.shape and torch.equal(ref, out.sequences))
    return Comparison(
        sequences=out.sequences, reference=ref, identical=same, seconds=seconds,
        reference_seconds=ref_s, new_tokens=int(out.new_tokens.sum()),
        tokens_per_step=out.tokens_per_step,
    )
