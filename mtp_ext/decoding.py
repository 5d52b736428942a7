"""Drop-in ``generate``: lossless self-speculative decoding with MTP heads.

``mtp_ext.generate`` and ``mtp_ext.MTPModel`` live here (module ``mtp_ext.decoding``).

``generate(model, input_ids, heads, ...)`` returns what ``model.generate(input_ids, ...)`` returns
for the same settings: greedy decoding gives the same tokens, sampling gives tokens with the same
distribution. Each step:

1. the heads draft a tree (:mod:`mtp_ext.trees`) from the hidden state of the last accepted
   position, rooted at the last accepted token;
2. the backbone runs once over the tree's ``T`` nodes on top of its key/value cache, with a 4-D
   additive attention mask (:func:`mtp_ext.ops.tree_attention_mask`) and explicit position ids;
3. :func:`mtp_ext.ops.verify_tree_from_hidden` (greedy: final norm, output layer and argmax fused,
   the logits never written) or :func:`mtp_ext.ops.verify_tree` (sampling) picks the accepted path
   and the bonus token;
4. :func:`mtp_ext.ops.compact_kv` moves the accepted path's cache entries into place and the rest
   is dropped.

Rows of a batch accept different numbers of tokens: the cache keeps one length for all rows, and a
per-row validity mask (left padding, and the slots a row did not fill in a step) goes into every
attention mask. There is one host synchronization per step: the accepted counts and tokens,
read in one copy (:mod:`mtp_ext.tree_step` holds the step and its state).

On CPU the backbone's linear layers run through :func:`mtp_ext.fast_cpu` (small-row kernels) during
tree steps, which is what makes a tree of a few nodes cost about one plain step there.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch

from . import ops as _kernel_ops
from . import reference as _reference_ops
from .cpu_linear import fast_cpu
from .hf_compat import cache_kwarg, last_logits_kwarg
from .heads import MTPHeads
from .tree_step import HostContexts, run_step, start_state
from .trees import DynamicTree, StaticTree, TreeSpec, chain

__all__ = ["generate", "MTPModel", "MTPGenerateOutput", "GenerationSettings"]

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


@dataclasses.dataclass
class MTPGenerateOutput:
    """Output of :func:`generate` with ``return_dict_in_generate=True``.

    Attributes:
        sequences: ``[B, P + N]`` int64, as ``model.generate`` returns them.
        steps: tree steps run (the prefill not counted).
        accepted_per_step: ``[steps, B]`` int64 (on the host, as the statistics below), draft
            tokens accepted per step and row (each step also emits one bonus token); -1 for rows
            that had already finished.
        accepted_histogram: ``[T]`` int64, how many (step, row) pairs accepted 0, 1, ... tokens
            (rows still generating only).
        tokens_per_step: mean tokens emitted per step and row (accepted + 1).
        new_tokens: ``[B]`` int64, tokens generated per row (up to and including EOS).
        seconds: wall time of the call.
        tokens_per_second: ``new_tokens.sum() / seconds``.
        tree_size: nodes per tree.
    """

    sequences: torch.Tensor
    steps: int
    accepted_per_step: torch.Tensor
    accepted_histogram: torch.Tensor
    tokens_per_step: float
    new_tokens: torch.Tensor
    seconds: float
    tokens_per_second: float
    tree_size: int

    def __getitem__(self, key: str):
        return getattr(self, key)


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


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


def _default_attention_mask(input_ids: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """As transformers infers it: pad positions masked when the pad token is not the EOS token."""
    pad = settings.pad_token_id
    if pad is not None and pad not in settings.eos_token_ids and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


# ----------------------------------------------------------------------------------------------
# Output bookkeeping
# ----------------------------------------------------------------------------------------------


class _Output:
    """Per-row emitted tokens, stopping at EOS or ``max_new_tokens``; streams as it goes."""

    def __init__(self, B: int, settings: GenerationSettings, streamer):
        self.rows: list[list[int]] = [[] for _ in range(B)]
        self.done = [settings.max_new_tokens == 0] * B
        self.settings = settings
        self.streamer = streamer
        self.eos = set(settings.eos_token_ids)

    def emit(self, tokens: list[list[int]]) -> list[list[int]]:
        """Appends each row's new tokens up to its end; returns what each row took."""
        limit = self.settings.max_new_tokens
        pushed = []
        for b, new in enumerate(tokens):
            taken = []
            if not self.done[b]:
                for t in new:
                    taken.append(t)
                    self.rows[b].append(t)
                    if t in self.eos or len(self.rows[b]) >= limit:
                        self.done[b] = True
                        break
            pushed.append(taken)
        if self.streamer is not None and any(pushed):
            if len(pushed) == 1:
                self.streamer.put(torch.tensor(pushed[0], dtype=torch.long))
            else:
                width = max(len(p) for p in pushed)
                pad = self.settings.pad_token_id if self.settings.pad_token_id is not None else 0
                self.streamer.put(torch.tensor([p + [pad] * (width - len(p)) for p in pushed]))
        return pushed

    @property
    def finished(self) -> bool:
        return all(self.done)

    def sequences(self, input_ids: torch.Tensor) -> torch.Tensor:
        width = max((len(r) for r in self.rows), default=0)
        if width and any(len(r) < width for r in self.rows) and self.settings.pad_token_id is None:
            raise ValueError("rows ended at different lengths and no pad_token_id is set")
        pad = self.settings.pad_token_id
        new = torch.tensor(
            [r + [pad] * (width - len(r)) for r in self.rows], dtype=torch.long
        ).view(len(self.rows), width)
        return torch.cat([input_ids, new.to(input_ids.device)], 1)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

_BACKEND_FUNCTIONS = ("tree_attention_mask", "verify_tree", "verify_tree_from_hidden", "compact_kv")


def _resolve_backend(backend):
    """``"kernels"``, ``"reference"``, or any object with the four functions the loop calls."""
    if isinstance(backend, str):
        if backend not in ("kernels", "reference"):
            raise ValueError(f"backend must be 'kernels' or 'reference', got {backend!r}")
        return _kernel_ops if backend == "kernels" else _reference_ops
    missing = [f for f in _BACKEND_FUNCTIONS if not callable(getattr(backend, f, None))]
    if missing:
        raise ValueError(f"backend object lacks {missing}")
    return backend


_SUPPORTED = {
    "attention_mask", "max_new_tokens", "max_length", "do_sample", "temperature", "top_k",
    "top_p", "eos_token_id", "pad_token_id", "tree", "generator", "streamer",
    "return_dict_in_generate", "use_cache", "generation_config",
}


def _check_unsupported(kwargs: dict) -> None:
    unknown = sorted(k for k in kwargs if k not in _SUPPORTED)
    if unknown:
        raise TypeError(
            f"mtp_ext.generate does not support the argument(s) {unknown}; supported: "
            f"{sorted(_SUPPORTED)}"
        )
    if kwargs.get("use_cache") is False:
        raise ValueError("mtp_ext.generate always uses the key/value cache (use_cache=False given)")


def _tree_spec(tree, model, heads: MTPHeads, input_ids: torch.Tensor) -> TreeSpec:
    if tree is None or (isinstance(tree, str) and tree == "auto"):
        from .tree_tuning import auto_tree

        return auto_tree(model, heads, input_ids)
    if isinstance(tree, (StaticTree, DynamicTree)):
        return tree
    if isinstance(tree, int):
        if tree < 1:
            raise ValueError(f"tree must be >= 1 nodes, got {tree}")
        return DynamicTree(size=tree, width=min(4, max(1, tree - 1)))
    if isinstance(tree, str) and tree == "chain":
        return chain(heads.config.num_heads)
    if isinstance(tree, Sequence):
        return StaticTree(tree)
    raise TypeError(
        "tree must be None, a node count, 'chain', a list of paths, a StaticTree or a DynamicTree, "
        f"got {type(tree).__name__}"
    )


LOOKUP_GROWTH = 4  # tokens the lookup branch grows by after a step that accepted all of it


def _next_lookup_length(length: int, base: int, branch: torch.Tensor | None,
                        emitted: list[list[int]], active: list[bool]) -> int:
    """The prompt-lookup branch's length for the next step: ``LOOKUP_GROWTH`` longer (at most
    ``2 * base``) when some live row accepted the whole branch, else back to ``base`` (the
    heuristic of transformers' assisted decoding, applied to the lookup drafts)."""
    if branch is None:
        return base
    drafts = branch.tolist()
    whole = any(on and len(e) > length and e[:length] == d
                for on, e, d in zip(active, emitted, drafts))
    return min(length + LOOKUP_GROWTH, 2 * base) if whole else base


def _prefill(model, input_ids, attention_mask, cache):
    """Runs the prompt as ``model.generate`` does (the output layer on the last position only,
    where the model allows it); returns the last position's logits ``[B, V]``, the output (with
    every hidden state) and the prompt's position ids ``[B, P]``."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 0)
    out = model(
        input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True,
        output_hidden_states=True, **cache_kwarg(model, cache), **last_logits_kwarg(model),
    )
    return out.logits[:, -1], out, pos


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    heads: MTPHeads,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    tree: Any = None,
    generator: torch.Generator | None = None,
    streamer=None,
    return_dict_in_generate: bool = False,
    prompt_lookup_num_tokens: int | None = 8,
    backend: Any = "kernels",
    max_length: int | None = None,
    generation_config=None,
    **kwargs,
):
    """``model.generate`` with MTP drafting and tree verification: same arguments, same result.

    Args:
        model: a transformers causal LM (Llama-family, Qwen2, Gemma 3, or any whose decoder
            accepts a 4-D additive attention mask and explicit position ids).
        input_ids: ``[B, P]`` int64 prompts (left-padded for ``B > 1``).
        heads: :class:`~mtp_ext.heads.MTPHeads` trained for ``model``.
        attention_mask: ``[B, P]`` (1 = token, 0 = padding); inferred as transformers does.
        max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id: as in
            ``model.generate``; unset values come from ``model.generation_config``.
        tree: the draft tree: None or ``"auto"`` (a dynamic tree of the size that measured
            fastest for this model, device, dtype and heads: :func:`mtp_ext.tree_tuning.auto_tree`,
            profiled on the first call and cached), a node count (dynamic tree), a list of rank
            paths or a :class:`~mtp_ext.trees.StaticTree`, ``"chain"``, or a
            :class:`~mtp_ext.trees.DynamicTree`. One node decodes plainly.
        generator: ``torch.Generator`` for sampling (the uniforms of the verification).
        streamer: e.g. transformers' ``TextStreamer``; gets the prompt, then the tokens of each
            step as they are accepted, then ``end()``.
        return_dict_in_generate: return an :class:`MTPGenerateOutput` instead of the sequences.
        max_length: prompt plus new tokens, used when no ``max_new_tokens`` is set (as in
            transformers, ``max_new_tokens`` wins when both are).
        generation_config: a ``transformers.GenerationConfig`` used instead of
            ``model.generation_config`` (the arguments above still override it).
        prompt_lookup_num_tokens: (transformers' name for it) also draft, as one more branch
            (continuing the heads' tree where it drafts the same first tokens; see
            :func:`~mtp_ext.trees.add_branch`), the tokens that followed the last earlier
            occurrence of the context's final 1-3 tokens (prompt-lookup drafting, which pays on
            repetitive text: quotes, code, translations); added only on steps where some row has
            a match; 0 or None turns it off. After a step in which a row accepted the whole
            branch, the next one is 4 tokens longer (up to twice this), and otherwise back to
            this length.
        backend: ``"kernels"`` (``mtp_ext.ops``), ``"reference"`` (``mtp_ext.reference``) for
            the tree mask, the verification and the cache compaction, or an object with those
            four functions (the heads draft with the kernels either way).
    Returns:
        ``[B, P + N]`` int64 (prompt then new tokens, padded with ``pad_token_id`` after a row's
        EOS), or an :class:`MTPGenerateOutput`.
    """
    on_step = kwargs.pop("_on_step", None)  # internal: called with (tree, num_accepted, path)
    _check_unsupported(kwargs)
    t_start = time.perf_counter()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            f"input_ids must be an int64 tensor [B, P], got "
            f"{getattr(input_ids, 'dtype', type(input_ids))} {list(getattr(input_ids, 'shape', []))}"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    ops = _resolve_backend(backend)
    lookup = int(prompt_lookup_num_tokens or 0)
    if lookup < 0:
        raise ValueError(f"prompt_lookup_num_tokens must be >= 0, got {lookup}")
    settings = resolve_settings(
        model, input_ids.shape[1], generation_config, max_new_tokens=max_new_tokens,
        max_length=max_length, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    spec = _tree_spec(tree, model, heads, input_ids)
    if attention_mask is None:
        attention_mask = _default_attention_mask(input_ids, settings)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, "
            f"got {list(attention_mask.shape)}"
        )
    B = input_ids.shape[0]
    device = input_ids.device
    output = _Output(B, settings, streamer)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def uniforms(shape):
        return torch.rand(shape, generator=generator, device=device)

    from transformers import DynamicCache

    cache = DynamicCache()
    steps, accepted = 0, []
    if settings.max_new_tokens > 0:
        logits, prompt_out, prompt_pos = _prefill(model, input_ids, attention_mask, cache)
        # The first token: a one-node "tree" verified on the prompt's last logits.
        root_draft = torch.full((B, 1), -1, dtype=torch.long, device=device)
        parents1 = torch.full((1,), -1, dtype=torch.long, device=device)
        temp = settings.temperature if settings.do_sample else 0.0
        _, first, _ = ops.verify_tree(
            root_draft, parents1, logits[:, None], temp, settings.top_k, settings.top_p,
            uniforms((B, 1)) if settings.do_sample else None,
        )
        state = start_state(model, heads, cache, prompt_out, attention_mask.bool(), prompt_pos,
                            first[:, 0])
        del prompt_out
        contexts = HostContexts(input_ids, attention_mask, settings.max_new_tokens) if lookup else None
        taken = output.emit([[t] for t in first[:, 0].tolist()])
        patch = fast_cpu(model) if device.type == "cpu" else None
        try:
            lookup_len = lookup
            while not output.finished:
                active = [not d for d in output.done]
                if contexts is not None:
                    for b, new in enumerate(taken):
                        if new:
                            contexts.extend(b, new)
                branch = (contexts.lookup(lookup_len, active, pin=device.type == "cuda")
                          if contexts is not None else None)
                res = run_step(model, heads, state, spec, settings, uniforms, ops, branch, active)
                lookup_len = _next_lookup_length(lookup_len, lookup, branch, res.emitted, active)
                if on_step is not None:
                    on_step(res.tree, res.num_accepted, res.path)
                steps += 1
                accepted.append([n if a else -1 for n, a in zip(res.accepted, active)])
                taken = output.emit(res.emitted)
        finally:
            if patch is not None:
                patch.restore()
    if streamer is not None:
        streamer.end()
    sequences = output.sequences(input_ids)
    if not return_dict_in_generate:
        return sequences
    seconds = time.perf_counter() - t_start
    new_tokens = torch.tensor([len(r) for r in output.rows], dtype=torch.long)
    acc = torch.tensor(accepted, dtype=torch.long).view(len(accepted), B)
    T = spec.size
    live = acc[acc >= 0]
    hist = torch.bincount(live, minlength=T)[:T]
    return MTPGenerateOutput(
        sequences=sequences, steps=steps, accepted_per_step=acc, accepted_histogram=hist,
        tokens_per_step=float((live.float() + 1).mean()) if live.numel() else 0.0,
        new_tokens=new_tokens, seconds=seconds,
        tokens_per_second=float(new_tokens.sum()) / seconds if seconds > 0 else 0.0, tree_size=T,
    )


class MTPModel:
    """Wraps a causal LM and its heads so that ``MTPModel(model, heads).generate(...)`` is
    :func:`generate`; every other attribute is the model's own."""

    def __init__(self, model, heads: MTPHeads, tree: Any = None):
        self.model = model
        self.heads = heads
        self.tree = tree

    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        kwargs.setdefault("tree", self.tree)
        return generate(self.model, input_ids, self.heads, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)
