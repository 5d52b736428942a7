"""The settings of one ``generate`` call, resolved as ``model.generate`` resolves them, and the
checks of its arguments (``mtp_ext.settings``)."""

from __future__ import annotations

import dataclasses
import warnings

import torch

__all__ = ["GenerationSettings", "resolve_settings", "default_attention_mask", "check_arguments",
           "check_input_ids", "resolve_attention_mask", "lookup_length"]


# generation_config fields that change model.generate's output and that this loop does not
# implement: a non-default value is an error, never silently ignored.
_UNSUPPORTED_CONFIG = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "min_p": None,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "guidance_scale": None,
    "num_return_sequences": 1,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "watermarking_config": None,
}


# The smallest sampling temperature generate takes: the smallest normal float32. The ops accept
# down to about 2.9e-39 (1 / temperature finite in float32); below the smallest normal float32 a
# temperature is subnormal and far from any use, so generate refuses it with its own message.
_MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)


@dataclasses.dataclass
class GenerationSettings:
    """The settings one call runs with, resolved as ``model.generate`` resolves them: an argument
    given to the call wins, then the model's ``generation_config``, then transformers' defaults."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


def _config_value(gc, name: str, default):
    value = getattr(gc, name, None) if gc is not None else None
    return default if value is None else value


def resolve_settings(model, input_len: int, generation_config=None, **given) -> GenerationSettings:
    """Resolves the call's settings as ``model.generate`` does (see :class:`GenerationSettings`):
    the arguments given, then ``generation_config`` (default: ``model.generation_config``), then
    transformers' defaults. The length: ``max_new_tokens`` (given, then the config's), else
    ``max_length`` (given, then the config's) minus the prompt. Raises ValueError naming any
    output-changing option the config sets and this loop does not implement."""
    own = generation_config is None
    gc = getattr(model, "generation_config", None) if own else generation_config
    where = "the model's generation_config" if own else "the generation_config passed"
    for name, default in _UNSUPPORTED_CONFIG.items():
        value = getattr(gc, name, default) if gc is not None else default
        if value is not None and value != default and not (default is None and value == 0):
            raise ValueError(
                f"{where} sets {name}={value!r}, which mtp_ext.generate does not support; reset it "
                f"({name} = {default!r})"
            )

    def pick(name, default):
        v = given.get(name)
        return _config_value(gc, name, default) if v is None else v

    max_new = given.get("max_new_tokens")
    if max_new is None:
        max_new = getattr(gc, "max_new_tokens", None) if gc is not None else None
    if max_new is None:
        max_length = given.get("max_length")
        if max_length is None:
            max_length = _config_value(gc, "max_length", 20)
        max_new = int(max_length) - input_len
    max_new = int(max_new)
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
    do_sample = bool(pick("do_sample", False))
    temperature = float(pick("temperature", 1.0))
    top_k = int(pick("top_k", 50))
    top_p = float(pick("top_p", 1.0))
    if do_sample:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if temperature < _MIN_TEMPERATURE:
            raise ValueError(
                f"temperature must be at least {_MIN_TEMPERATURE:.4g} (the smallest normal float32) "
                f"when sampling, got {temperature}"
            )
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
    eos = pick("eos_token_id", None)
    if eos is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos, (list, tuple)):
        eos_ids = tuple(int(e) for e in eos)
    elif isinstance(eos, torch.Tensor):
        eos_ids = tuple(int(e) for e in eos.flatten().tolist())
    else:
        eos_ids = (int(eos),)
    pad = pick("pad_token_id", None)
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return GenerationSettings(
        max_new_tokens=max_new, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_token_ids=eos_ids, pad_token_id=None if pad is None else int(pad),
    )


def default_attention_mask(input_ids: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """As transformers infers it: pad positions masked when the pad token is not the EOS token."""
    pad = settings.pad_token_id
    if pad is not None and pad not in settings.eos_token_ids and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


_SUPPORTED = {
    "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k",
    "top_p", "eos_token_id", "pad_token_id", "tree", "generator", "streamer",
    "return_dict_in_generate", "use_cache", "generation_config",
}


def check_arguments(kwargs: dict) -> None:
    """Raises for a keyword argument of ``generate`` that the loop does not implement."""
    unknown = sorted(k for k in kwargs if k not in _SUPPORTED)
    if unknown:
        raise TypeError(
            f"mtp_ext.generate does not support the argument(s) {unknown}; supported: "
            f"{sorted(_SUPPORTED)}"
        )
    if kwargs.get("use_cache") is False:
        raise ValueError("mtp_ext.generate always uses the key/value cache (use_cache=False given)")


def check_input_ids(input_ids, vocab_size: int | None = None) -> None:
    """Raises ValueError unless ``input_ids`` is an int64 ``[B, P]`` tensor with ``B, P >= 1``
    holding token ids in ``[0, vocab_size)`` (when given; one host read of its minimum and
    maximum)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be an int64 tensor [B, P], got "
            f"{getattr(input_ids, 'dtype', type(input_ids))} {list(getattr(input_ids, 'shape', []))}"
        )
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids must hold at least one row, got an empty batch [0, P]")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    if vocab_size is not None:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids must be token ids in [0, {vocab_size}) (the model's vocabulary), got "
                f"{bad}"
            )


def resolve_attention_mask(attention_mask, input_ids: torch.Tensor,
                           settings: GenerationSettings) -> torch.Tensor:
    """The call's ``[B, P]`` int64 attention mask of 0 and 1: the one given (checked against
    ``input_ids``; any non-zero value is a token, as transformers reads it), or inferred as
    transformers does (:func:`default_attention_mask`). Warns, as transformers does, when a row
    is right-padded (its last position masked): decoder-only models continue from the last
    position, so such a row generates from padding."""
    if attention_mask is None:
        attention_mask = default_attention_mask(input_ids, settings)
    elif not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
            f"got {list(getattr(attention_mask, 'shape', [type(attention_mask).__name__]))}"
        )
    attention_mask = (attention_mask != 0).long()
    if not bool(attention_mask[:, -1].all()):
        warnings.warn(
            "right-padding was detected (a row's last position is masked): decoder-only models "
            "generate after the last position, so pad on the left (tokenizer padding_side='left')",
            UserWarning, stacklevel=3,
        )
    return attention_mask


def lookup_length(prompt_lookup_num_tokens) -> int:
    """The prompt-lookup branch's set length (0: off)."""
    lookup = int(prompt_lookup_num_tokens or 0)
    if lookup < 0:
        raise ValueError(f"prompt_lookup_num_tokens must be >= 0, got {lookup}")
    return lookup
