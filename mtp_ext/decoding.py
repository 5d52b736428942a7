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
read in one copy (:mod:`mtp_ext.tree_step` holds the step, the prefill and their state).

On CPU the backbone's linear layers run through :func:`mtp_ext.fast_cpu` (small-row kernels) during
tree steps, which is what makes a tree of a few nodes cost about one plain step there.

Trees (``generate``'s ``tree``): None or ``"auto"`` (the default), a size chosen at every step
by :class:`~mtp_ext.controller.Controller` (:mod:`mtp_ext.controlled_steps`): the machine's
measured step costs (:mod:`mtp_ext.step_costs`, measured once per machine, model, dtype, heads,
threads and batch size, and cached) against the acceptance estimated while generating, from the
heads' own probabilities and what the steps so far accepted; plain decoding (no drafting, no tree
mask: what ``model.generate`` does per token) whenever no tree pays. Or a fixed tree: a node count
(a dynamic tree); a list of rank paths or a :class:`~mtp_ext.trees.StaticTree`; ``"chain"``; or a
:class:`~mtp_ext.trees.DynamicTree`.

Prompt lookup (``prompt_lookup_num_tokens``, transformers' name for it): one more branch drafts the
tokens that followed the last earlier occurrence of the context's final 1-3 tokens, continuing the
heads' tree where it drafts the same first tokens (:func:`~mtp_ext.trees.add_branch`). It pays on
repetitive text (quotes, code, translations) and is added only on steps where some row has a match.
With the default tree the controller picks its length each step, up to twice
``prompt_lookup_num_tokens``. With a fixed tree, after a step in which a row accepted the whole
branch the next one is 4 tokens longer (up to twice the set length), and otherwise back to the set
length.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import torch

from . import ops as _kernel_ops
from . import reference as _reference_ops
from .heads import MTPHeads
from .settings import (GenerationSettings, check_arguments, check_input_ids, lookup_length,
                       resolve_attention_mask, resolve_settings)
from .controlled_steps import ControlledSteps
from .tree_step import DecodeState, HostContexts, StepResult, prefill, run_step, step_linears
from .trees import DynamicTree, StaticTree, TreeSpec, chain

__all__ = ["generate", "MTPModel", "MTPGenerateOutput", "GenerationSettings"]


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
        tree_size: nodes per tree (with the default tree: the most any step ran, lookup
            branch included).
        plans: per step, ``(tree nodes, lookup tokens)`` as the controller chose them (empty
            with a fixed tree); ``(1, 0)`` is a plain step.
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
    plans: list = dataclasses.field(default_factory=list)

    def __getitem__(self, key: str):
        return getattr(self, key)


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


def _tree_spec(tree, heads: MTPHeads) -> TreeSpec | None:
    """The fixed tree ``tree`` asks for, or None for the controller (None or ``"auto"``)."""
    if tree is None or (isinstance(tree, str) and tree == "auto"):
        return None
    if isinstance(tree, (StaticTree, DynamicTree)):
        return tree
    if isinstance(tree, int):
        if tree < 1:
            raise ValueError(f"tree must be >= 1 nodes, got {tree}")
        return DynamicTree(size=tree, width=min(4, max(1, tree - 1)))
    if isinstance(tree, str):
        if tree != "chain":
            raise ValueError(f"tree must be None, 'auto', 'chain', a node count or a list of paths, "
                             f"got {tree!r}")
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


class _LookupBranch:
    """The prompt-lookup branch across steps: each row's context on the host
    (:class:`~mtp_ext.tree_step.HostContexts`), the branch's current length and the drafts of the
    last step; None-valued drafts when turned off (``base = 0``)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, base: int, reserve: int):
        self.base = self.length = base
        self.contexts = HostContexts(input_ids, attention_mask, reserve) if base else None
        self.pin = input_ids.device.type == "cuda"
        self.drafts: torch.Tensor | None = None

    def next(self, taken: list[list[int]], active: list[bool]) -> torch.Tensor | None:
        """Adds the tokens each row took last step to its context; the ``[B, K]`` drafts of this
        step (None when off or no live row has a match)."""
        if self.contexts is None:
            return None
        for b, new in enumerate(taken):
            if new:
                self.contexts.extend(b, new)
        self.drafts = self.contexts.lookup(self.length, active, pin=self.pin)
        return self.drafts

    def update(self, emitted: list[list[int]], active: list[bool]) -> None:
        self.length = _next_lookup_length(self.length, self.base, self.drafts, emitted, active)


class _FixedSteps:
    """Steps with a fixed tree (``generate``'s ``tree`` given) and the lookup branch's growth
    heuristic; ``step`` as :meth:`~mtp_ext.controlled_steps.ControlledSteps.step`."""

    def __init__(self, model, heads: MTPHeads, state: DecodeState, spec: TreeSpec, settings,
                 uniforms, ops, branch: _LookupBranch):
        self.args = (model, heads, state, spec, settings, uniforms, ops)
        self.branch = branch
        self.plans: list[tuple[int, int]] = []

    def step(self, taken: list[list[int]], active: list[bool]) -> StepResult:
        drafts = self.branch.next(taken, active)
        res = run_step(*self.args, drafts, active)
        self.branch.update(res.emitted, active)
        return res


@torch.no_grad()
def generate(
    model, input_ids: torch.Tensor, heads: MTPHeads, *,
    attention_mask: torch.Tensor | None = None, max_new_tokens: int | None = None,
    do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
    top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None, tree: Any = None, generator: torch.Generator | None = None,
    streamer=None, return_dict_in_generate: bool = False, prompt_lookup_num_tokens: int | None = 8,
    backend: Any = "kernels", max_length: int | None = None, generation_config=None, **kwargs,
):
    """``model.generate`` with MTP drafting and tree verification: same arguments, same result.

    Args:
        model: a transformers causal LM (Llama-family, Qwen2, Gemma 3, or any whose decoder
            accepts a 4-D additive attention mask and explicit position ids).
        input_ids: ``[B, P]`` int64 prompts (left-padded for ``B > 1``).
        heads: :class:`~mtp_ext.heads.MTPHeads` trained for ``model``.
        attention_mask, max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
            eos_token_id, pad_token_id, generation_config, streamer: as in ``model.generate``
            (``attention_mask [B, P]``, 1 = token; unset values come from
            ``model.generation_config``; ``streamer`` gets the prompt, each step's tokens, then
            ``end()``).
        tree: None or ``"auto"``, a node count, ``"chain"``, a list of rank paths, a
            :class:`~mtp_ext.trees.StaticTree` or a :class:`~mtp_ext.trees.DynamicTree` (see
            "Trees" in the module docstring). One node decodes plainly.
        generator: ``torch.Generator`` for sampling (the uniforms of the verification).
        return_dict_in_generate: return an :class:`MTPGenerateOutput` instead of the sequences.
        prompt_lookup_num_tokens: length of the prompt-lookup branch (see the module
            docstring); 0 or None turns it off.
        backend: ``"kernels"`` (``mtp_ext.ops``), ``"reference"`` (``mtp_ext.reference``) or an
            object with ``tree_attention_mask``, ``verify_tree``, ``verify_tree_from_hidden`` and
            ``compact_kv`` (the heads draft with the kernels either way).
    Returns:
        ``[B, P + N]`` int64 (prompt then new tokens, padded with ``pad_token_id`` after a row's
        EOS), or an :class:`MTPGenerateOutput`.
    """
    on_step = kwargs.pop("_on_step", None)  # internal: called with (tree, num_accepted, path)
    t_start = time.perf_counter()
    check_arguments(kwargs)
    if not isinstance(heads, MTPHeads):
        raise TypeError(f"heads must be MTPHeads (mtp_ext.load_heads or MTPHeads.from_pretrained), "
                        f"got {type(heads).__name__}; model.generate decodes without heads")
    check_input_ids(input_ids, model.get_input_embeddings().weight.shape[0])
    ops = _resolve_backend(backend)
    lookup = lookup_length(prompt_lookup_num_tokens)
    settings = resolve_settings(
        model, input_ids.shape[1], generation_config, max_new_tokens=max_new_tokens,
        max_length=max_length, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    spec = _tree_spec(tree, heads)
    attention_mask = resolve_attention_mask(attention_mask, input_ids, settings)
    output = _Output(input_ids.shape[0], settings, streamer)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    uniforms = functools.partial(_uniforms, generator=generator, device=input_ids.device)
    accepted: list[list[int]] = []
    plans: list[tuple[int, int]] = []
    size = spec.size if spec is not None else 1
    if settings.max_new_tokens > 0:
        state, first = prefill(model, heads, input_ids, attention_mask, settings, uniforms, ops)
        with step_linears(model, input_ids.device):
            if spec is None:
                contexts = (HostContexts(input_ids, attention_mask, settings.max_new_tokens)
                            if lookup else None)
                steps = ControlledSteps(model, heads, state, settings, uniforms, ops, contexts,
                                        2 * lookup)
            else:
                branch = _LookupBranch(input_ids, attention_mask, lookup, settings.max_new_tokens)
                steps = _FixedSteps(model, heads, state, spec, settings, uniforms, ops, branch)
            accepted = _decode(steps, output, output.emit([[t] for t in first.tolist()]), on_step)
            if spec is None:
                steps.finish()
        plans = steps.plans
        if spec is None:
            size = max((t + k for t, k in plans), default=1)
    if streamer is not None:
        streamer.end()
    sequences = output.sequences(input_ids)
    if not return_dict_in_generate:
        return sequences
    return _result(sequences, output, accepted, size, time.perf_counter() - t_start, plans)


def _uniforms(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device)


def _decode(steps, output: "_Output", taken: list[list[int]], on_step) -> list[list[int]]:
    """Steps (``steps.step``) until every row has finished; returns the draft tokens each step
    accepted per row (-1 for rows already finished)."""
    accepted = []
    while not output.finished:
        active = [not d for d in output.done]
        res = steps.step(taken, active)
        if on_step is not None:
            on_step(res.tree, res.num_accepted, res.path)
        accepted.append([n if a else -1 for n, a in zip(res.accepted, active)])
        taken = output.emit(res.emitted)
    return accepted


def _result(sequences: torch.Tensor, output: "_Output", accepted: list[list[int]], T: int,
            seconds: float, plans: list[tuple[int, int]]) -> MTPGenerateOutput:
    """The statistics of a call (:class:`MTPGenerateOutput`)."""
    B = sequences.shape[0]
    new_tokens = torch.tensor([len(r) for r in output.rows], dtype=torch.long)
    acc = torch.tensor(accepted, dtype=torch.long).view(len(accepted), B)
    live = acc[acc >= 0]
    hist = torch.bincount(live, minlength=T)[:T]
    return MTPGenerateOutput(
        sequences=sequences, steps=len(accepted), accepted_per_step=acc, accepted_histogram=hist,
        tokens_per_step=float((live.float() + 1).mean()) if live.numel() else 0.0,
        new_tokens=new_tokens, seconds=seconds,
        tokens_per_second=float(new_tokens.sum()) / seconds if seconds > 0 else 0.0, tree_size=T,
        plans=list(plans),
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
