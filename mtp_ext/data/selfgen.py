"""Self-distillation data: the backbone's own greedy continuations of prompts cut from a text
(``mtp_ext.data.selfgen``).

Heads draft the backbone's own text at decoding time, and the backbone's generations differ from
human text (an instruct model answers, lists and repeats itself). Training on a mix of the texts
and the model's own continuations of their prefixes puts the heads on the distribution they
serve. Half of the prompts (``chat_fraction``) go through the tokenizer's chat template, as a
user asking to continue the text, so that the assistant style is covered too.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

__all__ = ["self_generated"]


def _prompt_ids(tokenizer, text: str, prompt_tokens: int, chat: bool) -> list[int] | None:
    ids = tokenizer(text[: 20 * prompt_tokens], add_special_tokens=False)["input_ids"][:prompt_tokens]
    if len(ids) < prompt_tokens:
        return None
    if not chat:
        return ids
    prefix = tokenizer.decode(ids)
    msg = [{"role": "user", "content": f"Continue this text:\n\n{prefix}"}]
    text = tokenizer.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def self_generated(
    model,
    tokenizer,
    texts: Sequence[str],
    num_sequences: int,
    new_tokens: int = 224,
    prompt_tokens: int = 32,
    batch_size: int = 32,
    chat_fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> list[list[int]]:
    """``num_sequences`` token lists: a prompt (the first ``prompt_tokens`` tokens of a randomly
    chosen text, or that prefix in a chat request) followed by the backbone's greedy continuation
    of up to ``new_tokens`` tokens (ending at EOS when it comes). Feed them to training beside the
    texts (:func:`mtp_ext.training.tokenize_texts` takes token lists).

    Args:
        model, tokenizer: the backbone and its tokenizer.
        texts: candidate texts (strings); those shorter than ``prompt_tokens`` are skipped.
        num_sequences: how many continuations.
        chat_fraction: share of prompts wrapped in the chat template (0 without a template).
    """
    if num_sequences < 0 or new_tokens < 1 or prompt_tokens < 1 or batch_size < 1:
        raise ValueError("num_sequences >= 0, new_tokens, prompt_tokens and batch_size >= 1 required")
    rng = random.Random(seed)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    order = list(range(len(texts)))
    rng.shuffle(order)
    prompts: list[list[int]] = []
    for i in order:
        if len(prompts) == num_sequences:
            break
        chat = has_chat and rng.random() < chat_fraction
        ids = _prompt_ids(tokenizer, texts[i], prompt_tokens, chat)
        if ids is not None:
            prompts.append(ids)
    if len(prompts) < num_sequences:
        raise ValueError(f"only {len(prompts)} texts hold {prompt_tokens} tokens; asked for {num_sequences}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = model.get_output_embeddings().weight.device
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_sequences, desc="self-generated continuations", unit="seq")
        except ImportError:
            bar = None
    out: list[list[int]] = []
    for start in range(0, num_sequences, batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=eos)
        for row, p in zip(gen[:, width:].tolist(), chunk):
            cont = []
            for t in row:
                cont.append(t)
                if t == eos:
                    break
            out.append(p + cont)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return out
