"""Multi-token prediction heads on a frozen backbone (``mtp_ext.heads``).

``MTPHeads`` holds ``H`` heads; head ``h`` (``h = 1..H``) reads the feature of position ``t`` and
predicts the token at ``t + 1 + h`` (the backbone itself predicts ``t + 1``). The unembedding
(``lm_head`` weight ``[V, D]``), the final RMSNorm weight ``[D]`` and, for conditioned heads, the
input embedding ``[V, D]`` are the backbone's own: they are held as non-persistent buffers that
share storage with the backbone (detached: never trained, never saved in the heads file).

Which hidden state feeds the heads (``config.layer``), indexing the tuple a transformers model
returns with ``output_hidden_states=True`` (``L + 1`` tensors: the embeddings, then one per layer):

- an int (default ``-1``, the last element). In transformers, the last element of
  ``hidden_states`` is the model's ``last_hidden_state``, which Llama-style models return *after*
  their final norm; every other element is a residual-stream state before any norm.
- ``"whs"``: weighted hidden states, ``x = sum_l softmax(a)_l * hidden_states[l]`` over all
  ``L + 1`` elements, with learned scalars ``a[L + 1]`` (or ``a[L + 1, D]``, a softmax per channel,
  with ``whs_per_channel``), initialized to zero (a uniform average).

Final norm rule (the final norm is applied when the input is not the last layer's output): the
backbone's final RMSNorm is applied to each head's output feature before the unembedding unless the heads read the last element of ``hidden_states`` alone (which is already
normed), so a zero-initialized residual head on the last layer reproduces the backbone's own
next-token logits exactly. With ``"whs"``, and for ``"transformer"`` heads (whose decoder block
outputs a residual stream), the norm is always applied.

Kinds (``config.kind``):

- ``"resblock"`` (Medusa): ``z = x + SiLU(x W_h^T + b_h)``, ``W`` and ``b`` initialized to zero,
  so a fresh head predicts what the backbone predicts. :meth:`MTPHeads.draft` runs all heads in one
  call of :func:`mtp_ext.ops.fused_mtp_heads` (one pass over ``lm_head``).
- ``"linear"``: ``z = W_h x``, ``W`` initialized to the identity.
- ``"conditioned"`` (DeepSeek-V3 MTP / EAGLE style): depth ``d`` computes
  ``p = P_d [RMSNorm_h(f_{d-1}); RMSNorm_e(embed(tok_d))]`` and ``f_d = p + SiLU(p W_d^T + b_d)``
  with ``f_0 = x``; ``P_d: 2D -> D`` starts as the identity on the hidden half and zero on the
  embedding half, ``W_d``, ``b_d`` start at zero and the two RMSNorm weights at one. ``tok_1`` is
  the token at ``t + 1`` (``next_tokens``); ``tok_{d+1}`` is the token at ``t + 1 + d``: the true
  one under teacher forcing (:meth:`MTPHeads.forward` with ``next_tokens[..., H]``), or depth
  ``d``'s own top-1 draft (:meth:`MTPHeads.draft`, and ``forward`` with ``next_tokens[...]``).
- ``"transformer"`` (Gloeckle et al. 2024, "Better & Faster LLMs via multi-token prediction"):
  head ``h`` is one decoder block, a copy of the backbone's last decoder layer (trainable, saved as
  ``blocks.{h-1}.*``), with causal self-attention over the positions of the input sequence ``x``
  (rotary position embeddings computed by the backbone's own rotary module, which is shared, not
  trained and not saved). The block's output is a residual stream, so the backbone's final norm is
  always applied before the unembedding. The heads are independent (each block reads ``x``). These
  heads need a sequence axis: ``forward`` and ``draft`` take ``[B, S, D]`` features and return
  ``[B, S, H, *]``; incremental decoding keeps one key/value cache per head
  (:meth:`MTPHeads.new_draft_state`, then ``draft(..., state=...)`` on the new positions only).

Draft vocabulary: with ``config.draft_vocab_size = N`` the heads project onto ``N`` rows of the
unembedding only (buffer ``vocab_ids[N]``, set by :meth:`MTPHeads.set_draft_vocab`, saved in the
heads file); ``forward`` then returns logits over those ``N`` tokens (column ``j`` is token
``vocab_ids[j]``; :meth:`MTPHeads.draft_index` maps full-vocabulary targets to columns), and
``draft`` returns full-vocabulary ids.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import weakref
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .hf_compat import cache_kwarg, crop_cache
from .reference import stable_topk

__all__ = ["MTPHeadsConfig", "MTPHeads", "TransformerDraftState", "KINDS"]

KINDS = ("resblock", "linear", "conditioned", "transformer")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "heads.safetensors"


@dataclasses.dataclass
class MTPHeadsConfig:
    """Configuration of :class:`MTPHeads` (saved as ``config.json``).

    Attributes:
        num_heads: ``H >= 1``; head ``h`` predicts the token at ``t + 1 + h``.
        hidden_size: the backbone's ``D``.
        vocab_size: the backbone's ``V`` (rows of its unembedding).
        kind: ``"resblock"``, ``"linear"``, ``"conditioned"`` or ``"transformer"`` (one decoder
            block per head, initialized from the backbone's last decoder layer; needs inputs with a
            sequence axis ``[B, S, D]``).
        layer: index into the backbone's ``hidden_states`` tuple (default -1, the last), or
            ``"whs"`` (learned softmax-weighted sum over all of them).
        num_layers: the backbone's number of decoder layers ``L`` (``hidden_states`` has ``L + 1``
            elements); required for ``"whs"`` and for a non-negative ``layer``, recorded otherwise.
        whs_per_channel: with ``"whs"``, one softmax per channel (weights ``[L + 1, D]``).
        draft_vocab_size: ``N`` to draft over ``N`` tokens only, or None for the whole vocabulary.
        backbone: the backbone's name (``model.name_or_path``), checked on loading when recorded.
        rms_norm_eps: epsilon of the backbone's final RMSNorm (also used by the conditioned heads'
            own RMSNorms).
    """

    num_heads: int
    hidden_size: int
    vocab_size: int
    kind: str = "resblock"
    layer: Union[int, str] = -1
    num_layers: int | None = None
    whs_per_channel: bool = False
    draft_vocab_size: int | None = None
    backbone: str = ""
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if int(self.num_heads) < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if int(self.hidden_size) < 1 or int(self.vocab_size) < 1:
            raise ValueError(
                f"hidden_size and vocab_size must be >= 1, got {self.hidden_size}, "
                f"{self.vocab_size}"
            )
        if isinstance(self.layer, str):
            if self.layer != "whs":
                raise ValueError(f"layer must be an int or 'whs', got {self.layer!r}")
            if self.num_layers is None:
                raise ValueError("layer='whs' needs num_layers (the backbone's layer count)")
        elif isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int or 'whs', got {self.layer!r}")
        elif self.num_layers is not None:
            n = self.num_layers + 1
            if not -n <= self.layer < n:
                raise ValueError(
                    f"layer must be in [-{n}, {n}) for a backbone with {self.num_layers} layers "
                    f"({n} hidden states), got {self.layer}"
                )
        elif self.layer >= 0:
            raise ValueError(f"layer={self.layer} (non-negative) needs num_layers")
        if self.whs_per_channel and self.layer != "whs":
            raise ValueError("whs_per_channel needs layer='whs'")
        if self.draft_vocab_size is not None and not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, vocab_size={self.vocab_size}], "
                f"got {self.draft_vocab_size}"
            )

    @property
    def reads_last(self) -> bool:
        """True when the heads read the last element of ``hidden_states`` alone (already normed)."""
        if self.layer == "whs":
            return False
        if self.layer < 0:
            return self.layer == -1
        return self.layer == self.num_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MTPHeadsConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: computed in float32, cast back, times ``weight``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    return str(name or "")


def _backbone_parts(model):
    """``(lm_head [V, D], final norm weight [D] or None, eps, input embedding [V, D])``."""
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ValueError("model has no output embeddings (get_output_embeddings() is None)")
    emb = model.get_input_embeddings()
    norm = None
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "norm"):
        norm = inner.norm
    elif hasattr(model, "get_decoder"):
        norm = getattr(model.get_decoder(), "norm", None)
    cfg = getattr(model, "config", None)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
    norm_w = getattr(norm, "weight", None) if norm is not None else None
    if norm_w is not None and type(norm).__name__.startswith("Gemma"):
        # Gemma's RMSNorm scales by (1 + weight).
        norm_w = (1.0 + norm_w.detach().float()).to(norm_w.dtype)
    return out.weight, norm_w, float(eps), (emb.weight if emb is not None else None)


class _Unregistered:
    """Holds a module without registering it as a submodule of its owner: its parameters and
    buffers are neither trained, nor saved, nor moved by the owner's ``.to()``."""

    def __init__(self, module: nn.Module):
        self.module = module


def _decoder_layers(model) -> Sequence[nn.Module]:
    """The backbone's decoder layers (``model.model.layers`` for Llama / Qwen2 / Gemma3 text
    models, or found through ``get_decoder()`` / ``language_model``)."""
    candidates = [getattr(model, "model", None)]
    if hasattr(model, "get_decoder"):
        candidates.append(model.get_decoder())
    for c in list(candidates):
        candidates.append(getattr(c, "language_model", None))
    for c in candidates:
        layers = getattr(c, "layers", None)
        if isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
            return layers
    raise ValueError(
        "kind='transformer' needs the backbone's decoder layers: found none at model.model.layers, "
        "model.get_decoder().layers or *.language_model.layers"
    )


def _transformer_parts(model) -> tuple[nn.Module, nn.Module]:
    """``(last decoder layer, rotary embedding module)`` of a transformers causal LM."""
    layers = _decoder_layers(model)
    inner = [getattr(model, "model", None)]
    if hasattr(model, "get_decoder"):
        inner.append(model.get_decoder())
    owners = inner + [getattr(c, "language_model", None) for c in inner]
    found = [getattr(o, "rotary_emb", None) for o in owners if o is not None]
    rotary = next((r for r in found if r is not None), None)
    if rotary is None:
        raise ValueError(
            "kind='transformer' needs the backbone's rotary embedding module (rotary_emb), "
            "found none next to its decoder layers"
        )
    return layers[-1], rotary


def _block_copy(layer: nn.Module) -> nn.Module:
    """An independent, trainable copy of a decoder layer, reading cache layer 0 (each head keeps its
    own one-layer cache). Forward hooks are dropped: transformers installs output-capturing hooks on
    the backbone's layers, which must not record the heads' blocks."""
    block = copy.deepcopy(layer)
    for m in block.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        if hasattr(m, "layer_idx"):
            m.layer_idx = 0
    block.requires_grad_(True)
    return block


def _block_causal_mask(
    batch: int, q_len: int, past: int, dtype: torch.dtype, device, sliding_window: int | None
) -> torch.Tensor:
    """Additive attention mask ``[B, 1, q_len, past + q_len]`` of ``dtype``: 0 where query ``i``
    (at cache index ``past + i``) may attend key ``j`` (``j <= past + i``, and within
    ``sliding_window`` when the block has one), ``finfo(dtype).min`` elsewhere."""
    q = torch.arange(past, past + q_len, device=device)[:, None]
    kv = torch.arange(past + q_len, device=device)[None, :]
    allowed = kv <= q
    if sliding_window:
        allowed = allowed & (q - kv < int(sliding_window))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.expand(batch, 1, q_len, past + q_len)


class TransformerDraftState:
    """Incremental drafting state of ``"transformer"`` heads: one key/value cache per head
    (transformers ``DynamicCache``), holding the positions drafted so far (made by
    :meth:`MTPHeads.new_draft_state`; pass it as ``draft(..., state=...)``)."""

    def __init__(self, num_heads: int):
        from transformers import DynamicCache

        self.caches = [DynamicCache() for _ in range(num_heads)]

    @property
    def length(self) -> int:
        """Number of cached positions (the same in every head's cache)."""
        return int(self.caches[0].get_seq_length())

    def crop(self, length: int) -> None:
        """Drops cached positions beyond the first ``length`` (e.g. after rejected draft tokens)."""
        for c in self.caches:
            crop_cache(c, length)


class MTPHeads(nn.Module):
    """``H`` multi-token prediction heads sharing the backbone's frozen unembedding.

    Args:
        config: an :class:`MTPHeadsConfig`.
        lm_head: ``[V, D]`` the backbone's output embedding weight (shared, frozen).
        norm_weight: ``[D]`` the backbone's final RMSNorm weight, or None (no final norm).
        embed: ``[V, D]`` the backbone's input embedding weight; required for ``"conditioned"``.
        dtype: dtype of the heads' parameters (default: ``lm_head``'s).
        decoder_layer: ``"transformer"`` only (required): the template decoder block (the
            backbone's last decoder layer), deep-copied into ``H`` trainable blocks.
        rotary: ``"transformer"`` only (required): the backbone's rotary embedding module,
            ``rotary(x, position_ids) -> (cos, sin)``; kept unregistered (shared, frozen, not
            saved).
    """

    def __init__(
        self,
        config: MTPHeadsConfig,
        lm_head: torch.Tensor,
        norm_weight: torch.Tensor | None = None,
        embed: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        decoder_layer: nn.Module | None = None,
        rotary: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config
        H, D, V = config.num_heads, config.hidden_size, config.vocab_size
        if tuple(lm_head.shape) != (V, D):
            raise ValueError(f"lm_head must have shape [{V}, {D}], got {list(lm_head.shape)}")
        if norm_weight is not None and tuple(norm_weight.shape) != (D,):
            raise ValueError(f"norm_weight must have shape [{D}], got {list(norm_weight.shape)}")
        if config.kind == "conditioned":
            if embed is None:
                raise ValueError("kind='conditioned' needs the backbone's input embedding (embed)")
            if embed.shape[-1] != D:
                raise ValueError(f"embed must have shape [*, {D}], got {list(embed.shape)}")
        if config.kind == "transformer":
            if decoder_layer is None or rotary is None:
                missing = [n for n, v in (("decoder_layer", decoder_layer), ("rotary", rotary))
                           if v is None]
                raise ValueError(
                    "kind='transformer' needs the backbone's last decoder layer (decoder_layer) "
                    f"and its rotary embedding module (rotary); missing: {missing} "
                    "(MTPHeads.for_model finds both)"
                )
            layer_d = getattr(decoder_layer, "hidden_size", D)
            if layer_d != D:
                raise ValueError(
                    f"decoder_layer must have hidden_size={D}, got hidden_size={layer_d}"
                )
        dtype = dtype or lm_head.dtype
        device = lm_head.device
        # Shared, frozen, not saved: detached views of the backbone's own tensors.
        self.register_buffer("lm_head_weight", lm_head.detach(), persistent=False)
        self.register_buffer(
            "norm_weight", None if norm_weight is None else norm_weight.detach(), persistent=False
        )
        self.register_buffer(
            "embed_weight",
            None if (embed is None or config.kind != "conditioned") else embed.detach(),
            persistent=False,
        )
        kw = dict(device=device, dtype=dtype)
        if config.kind == "resblock":
            self.weight = nn.Parameter(torch.zeros(H, D, D, **kw))
            self.bias = nn.Parameter(torch.zeros(H, D, **kw))
        elif config.kind == "linear":
            self.weight = nn.Parameter(torch.eye(D, **kw).expand(H, D, D).clone())
        elif config.kind == "conditioned":
            proj = torch.zeros(H, D, 2 * D, **kw)
            proj[:, :, :D] = torch.eye(D, **kw)
            self.proj = nn.Parameter(proj)
            self.hnorm = nn.Parameter(torch.ones(H, D, **kw))
            self.enorm = nn.Parameter(torch.ones(H, D, **kw))
            self.weight = nn.Parameter(torch.zeros(H, D, D, **kw))
            self.bias = nn.Parameter(torch.zeros(H, D, **kw))
        elif config.kind == "transformer":
            self.blocks = nn.ModuleList(
                _block_copy(decoder_layer).to(device=device, dtype=dtype) for _ in range(H)
            )
            self._rotary = _Unregistered(rotary)
        if config.layer == "whs":
            n = config.num_layers + 1
            shape = (n, D) if config.whs_per_channel else (n,)
            self.whs_logits = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))
        if config.draft_vocab_size is not None:
            self.register_buffer(
                "vocab_ids", torch.arange(config.draft_vocab_size, device=device, dtype=torch.long)
            )
        else:
            self.vocab_ids = None

    # ------------------------------------------------------------------------------------------
    # Construction and persistence
    # ------------------------------------------------------------------------------------------

    @classmethod
    def for_model(
        cls,
        model,
        num_heads: int,
        kind: str = "resblock",
        layer: Union[int, str] = -1,
        whs_per_channel: bool = False,
        draft_vocab_size: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> "MTPHeads":
        """Fresh heads for a transformers causal LM (its lm_head, final norm and embeddings; for
        ``kind="transformer"`` also copies of its last decoder layer and its rotary module)."""
        lm_head, norm_w, eps, embed = _backbone_parts(model)
        cfg = model.config
        config = MTPHeadsConfig(
            num_heads=num_heads,
            hidden_size=int(lm_head.shape[1]),
            vocab_size=int(lm_head.shape[0]),
            kind=kind,
            layer=layer,
            num_layers=getattr(cfg, "num_hidden_layers", None),
            whs_per_channel=whs_per_channel,
            draft_vocab_size=draft_vocab_size,
            backbone=_model_name(model),
            rms_norm_eps=eps,
        )
        extra = cls._transformer_kwargs(model, kind)
        return cls(config, lm_head, norm_w, embed, dtype=dtype, **extra)

    @staticmethod
    def _transformer_kwargs(model, kind: str) -> dict:
        """``decoder_layer`` and ``rotary`` for the transformer kind, nothing for the others."""
        if kind != "transformer":
            return {}
        layer, rotary = _transformer_parts(model)
        return {"decoder_layer": layer, "rotary": rotary}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``heads.safetensors`` (the heads' own parameters and draft vocabulary ids only)
        and ``config.json``."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, model, dtype: torch.dtype | None = None
    ) -> "MTPHeads":
        """Load heads saved by :meth:`save_pretrained` onto ``model`` (a transformers causal LM).

        Raises ValueError naming what differs when the backbone's hidden size, vocabulary size,
        number of layers or (when both are recorded) name do not match the saved config.
        """
        from safetensors.torch import load_file

        with open(os.path.join(directory, CONFIG_NAME)) as f:
            config = MTPHeadsConfig.from_dict(json.load(f))
        lm_head, norm_w, eps, embed = _backbone_parts(model)
        found = {
            "hidden_size": int(lm_head.shape[1]),
            "vocab_size": int(lm_head.shape[0]),
            "num_layers": getattr(model.config, "num_hidden_layers", None),
        }
        for key, value in found.items():
            want = getattr(config, key)
            if want is not None and value is not None and want != value:
                raise ValueError(
                    f"heads in {str(directory)!r} were trained for a backbone with {key}={want}, "
                    f"but this model has {key}={value}"
                )
        name = _model_name(model)
        if config.backbone and name and config.backbone != name:
            raise ValueError(
                f"heads in {str(directory)!r} were trained for backbone {config.backbone!r}, "
                f"but this model is {name!r}"
            )
        heads = cls(
            config, lm_head, norm_w, embed, dtype=dtype,
            **cls._transformer_kwargs(model, config.kind),
        )
        state = load_file(os.path.join(directory, WEIGHTS_NAME), device=str(lm_head.device))
        heads.load_state_dict(state, strict=True)
        return heads

    # ------------------------------------------------------------------------------------------
    # Draft vocabulary
    # ------------------------------------------------------------------------------------------

    def set_draft_vocab(self, ids: torch.Tensor | Sequence[int]) -> None:
        """Set the ``N`` full-vocabulary token ids the heads draft over (e.g. the most frequent)."""
        if self.vocab_ids is None:
            raise ValueError("set_draft_vocab needs a config with draft_vocab_size set")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.vocab_ids.device).flatten()
        n, v = self.config.draft_vocab_size, self.config.vocab_size
        if ids.numel() != n:
            raise ValueError(f"ids must hold draft_vocab_size={n} token ids, got {ids.numel()}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"ids must be in [0, vocab_size={v})")
        if torch.unique(ids).numel() != n:
            raise ValueError("ids must be distinct")
        self.vocab_ids.copy_(ids)

    def draft_index(self, token_ids: torch.Tensor, missing: int = -100) -> torch.Tensor:
        """Column of each full-vocabulary id in ``forward``'s logits (``missing`` when outside the
        draft vocabulary, -100 by default: ``cross_entropy``'s ignore index). Identity without a
        draft vocabulary."""
        if self.vocab_ids is None:
            return token_ids
        table = torch.full(
            (self.config.vocab_size,), missing, dtype=torch.long, device=token_ids.device
        )
        table[self.vocab_ids.to(token_ids.device)] = torch.arange(
            self.vocab_ids.numel(), device=token_ids.device
        )
        return table[token_ids]

    # ------------------------------------------------------------------------------------------
    # Computation
    # ------------------------------------------------------------------------------------------

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the heads' parameters (what they compute in)."""
        if self.config.kind == "transformer":
            return next(self.blocks.parameters()).dtype
        return self.weight.dtype

    @property
    def _applies_norm(self) -> bool:
        if self.norm_weight is None:
            return False
        return self.config.kind == "transformer" or not self.config.reads_last

    def whs_weights(self) -> torch.Tensor:
        """The WHS mixing weights: ``[L + 1]`` (or ``[L + 1, D]``), a softmax over layers."""
        if self.config.layer != "whs":
            raise ValueError("whs_weights needs layer='whs'")
        return torch.softmax(self.whs_logits, dim=0)

    def select_input(self, hidden_states) -> torch.Tensor:
        """The heads' input ``[..., D]`` from the backbone's ``hidden_states`` tuple (a single
        tensor is taken as the one to read, which only makes sense for an int ``layer``)."""
        if isinstance(hidden_states, torch.Tensor):
            if self.config.layer == "whs":
                raise ValueError("layer='whs' needs the whole hidden_states tuple, got one tensor")
            x = hidden_states
        else:
            hs = tuple(hidden_states)
            if self.config.num_layers is not None and len(hs) != self.config.num_layers + 1:
                raise ValueError(
                    f"hidden_states must hold num_layers + 1 = {self.config.num_layers + 1} "
                    f"tensors, got {len(hs)}"
                )
            if self.config.layer == "whs":
                w = self.whs_weights()
                stacked = torch.stack([h.float() for h in hs], 0)  # [L+1, ..., D]
                if w.dim() == 1:
                    w = w.view(-1, *([1] * (stacked.dim() - 1)))
                else:
                    w = w.view(w.shape[0], *([1] * (stacked.dim() - 2)), w.shape[1])
                x = (w * stacked).sum(0)
            else:
                x = hs[self.config.layer]
        if x.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden states must end in hidden_size={self.config.hidden_size}, "
                f"got shape {list(x.shape)}"
            )
        return x.to(self.param_dtype)

    def _table(self) -> torch.Tensor:
        """The unembedding rows the heads project onto (``[N, D]`` with a draft vocabulary), in
        the heads' dtype. Gathered once and kept until the output layer, the vocabulary ids or the
        dtype change (the gather copies ``N x D`` values, as much as a head's whole matmul)."""
        lm, ids, dtype = self.lm_head_weight, self.vocab_ids, self.param_dtype
        # Keyed by the tensors themselves (held weakly) and their versions: an in-place change, a
        # replaced weight or a new vocabulary rebuilds the table.
        key = (lm._version, dtype, None if ids is None else ids._version)
        cached = self.__dict__.get("_table_cache")
        if (cached is not None and cached[0] == key and cached[1]() is lm
                and (ids is None or cached[2]() is ids)):
            return cached[3]
        t = lm if ids is None else lm[ids]
        t = t.to(dtype)
        self.__dict__["_table_cache"] = (
            key, weakref.ref(lm), None if ids is None else weakref.ref(ids), t
        )
        return t

    def _unembed(self, z: torch.Tensor) -> torch.Tensor:
        if self._applies_norm:
            z = _rms_norm(z, self.norm_weight.to(z.dtype), self.config.rms_norm_eps)
        return z @ self._table().T

    def unembed(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V']`` (the heads' parameter dtype) of head output features ``z[..., D]``:
        the backbone's final norm (when the heads apply it, see the module docstring), then its
        unembedding (the draft vocabulary's rows only, when set)."""
        return self._unembed(z.to(self.param_dtype))

    # ------------------------------------------------------------------------------------------
    # Transformer heads
    # ------------------------------------------------------------------------------------------

    @property
    def block_window(self) -> int | None:
        """``"transformer"`` heads: the sliding window of their blocks' attention, None when they
        attend fully (all blocks copy one decoder layer, so they share it)."""
        self._require_transformer("block_window")
        windows = {getattr(getattr(b, "self_attn", None), "sliding_window", None) for b in self.blocks}
        windows.discard(None)
        if len(windows) > 1:
            raise ValueError(f"the heads' blocks have different sliding windows {sorted(windows)}")
        return int(windows.pop()) if windows else None

    def new_draft_state(self) -> TransformerDraftState:
        """An empty incremental drafting state (one key/value cache per head) for
        ``draft(..., state=...)``; ``"transformer"`` heads only."""
        self._require_transformer("new_draft_state")
        return TransformerDraftState(self.config.num_heads)

    def _require_transformer(self, what: str) -> None:
        if self.config.kind != "transformer":
            raise ValueError(f"{what} needs kind='transformer', got kind={self.config.kind!r}")

    def _check_sequence(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(
                "kind='transformer' needs features with a sequence axis [B, S, "
                f"{self.config.hidden_size}], got shape {list(x.shape)}"
            )

    def _position_embeddings(
        self, block: nn.Module, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` from the backbone's rotary module for ``position_ids [B, S]`` (Gemma3's
        rotary module also takes the block's ``layer_type``)."""
        rotary = self._rotary.module
        params = inspect.signature(rotary.forward).parameters
        if "layer_type" in params:
            layer_type = getattr(getattr(block, "self_attn", None), "layer_type", None)
            return rotary(x, position_ids, layer_type or "full_attention")
        return rotary(x, position_ids)

    def block_outputs(
        self,
        hidden_states,
        position_ids: torch.Tensor | None = None,
        state: TransformerDraftState | None = None,
        attention_mask=None,
    ) -> torch.Tensor:
        """``"transformer"`` heads: each head's decoder block on the input sequence.

        Args:
            hidden_states: as for :meth:`forward`, with a sequence axis: each ``[B, S, D]``.
            position_ids: ``[B, S]`` or ``[S]`` int64 rotary positions (default: ``past + 0 ..
                past + S - 1``, ``past`` the number of positions cached in ``state``, 0 without).
            state: a :class:`TransformerDraftState` (:meth:`new_draft_state`): the ``S`` positions
                attend to the cached ones and are appended to the caches.
            attention_mask: instead of the causal mask, an additive ``[B, 1, S, past + S]`` mask of
                the heads' dtype (0 = attend, ``finfo.min`` = masked; decoding masks padding and
                rejected cache slots with it), or a dict with one such mask under
                ``"full_attention"`` and ``"sliding_attention"``, picked per block by whether its
                attention has a sliding window.
        Returns:
            ``[B, S, H, D]`` of the heads' parameter dtype: the blocks' outputs (residual streams,
            not normed; :meth:`unembed` gives the logits).
        """
        self._require_transformer("block_outputs")
        x = self.select_input(hidden_states)
        self._check_sequence(x)
        B, S, _ = x.shape
        past = 0 if state is None else state.length
        if state is not None and len(state.caches) != self.config.num_heads:
            raise ValueError(
                f"state must hold num_heads={self.config.num_heads} caches, got {len(state.caches)}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=x.device)
        position_ids = torch.as_tensor(position_ids, device=x.device)
        if position_ids.dtype != torch.long or position_ids.shape not in ((S,), (B, S)):
            raise ValueError(
                f"position_ids must be int64 of shape [{S}] or [{B}, {S}], got "
                f"{position_ids.dtype} {list(position_ids.shape)}"
            )
        position_ids = position_ids.expand(B, S)
        outs = []
        for h, block in enumerate(self.blocks):
            window = getattr(getattr(block, "self_attn", None), "sliding_window", None)
            if attention_mask is None:
                mask = _block_causal_mask(B, S, past, x.dtype, x.device, window)
            elif isinstance(attention_mask, dict):
                mask = attention_mask["sliding_attention" if window else "full_attention"]
            else:
                mask = attention_mask
            if tuple(mask.shape) != (B, 1, S, past + S):
                raise ValueError(
                    f"attention_mask must have shape [{B}, 1, {S}, {past + S}], got {list(mask.shape)}"
                )
            cache = None if state is None else state.caches[h]
            out = block(
                x,
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=self._position_embeddings(block, x, position_ids),
                **cache_kwarg(block, cache),
            )
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.stack(outs, -2)

    def _cond_feature(self, h: int, f: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        e = F.embedding(tok, self.embed_weight).to(f.dtype)
        cat = torch.cat([_rms_norm(f, self.hnorm[h], eps), _rms_norm(e, self.enorm[h], eps)], -1)
        p = cat @ self.proj[h].T
        return p + F.silu(p @ self.weight[h].T + self.bias[h])

    def _check_tokens(self, next_tokens, lead, allow_per_head: bool) -> bool:
        """Validates ``next_tokens``; returns True when it holds one token per head."""
        if next_tokens is None:
            raise ValueError("kind='conditioned' needs next_tokens (the token after each position)")
        if next_tokens.dtype != torch.long:
            raise ValueError(f"next_tokens must be int64, got {next_tokens.dtype}")
        shape = tuple(next_tokens.shape)
        if shape == tuple(lead):
            return False
        if allow_per_head and shape == (*lead, self.config.num_heads):
            return True
        want = f"{list(lead)}" + (
            f" or {list(lead) + [self.config.num_heads]}" if allow_per_head else ""
        )
        raise ValueError(f"next_tokens must have shape {want}, got {list(shape)}")

    def forward(self, hidden_states, next_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Training path: logits ``[..., H, V]`` (``[..., H, N]`` with a draft vocabulary).

        Args:
            hidden_states: the backbone's ``hidden_states`` tuple (each ``[..., D]``), or one
                ``[..., D]`` tensor for an int ``layer``; ``"transformer"`` heads need a sequence
                axis: ``[B, S, D]`` (logits ``[B, S, H, V']``, causal over the ``S`` positions).
            next_tokens: conditioned heads only, int64. ``[..., H]``: teacher forcing,
                ``next_tokens[..., d]`` is the true token at ``t + 1 + d`` (see
                :meth:`teacher_tokens`); ``[...]``: the token at ``t + 1`` only, deeper heads chain
                through the previous head's argmax (as :meth:`draft` does).
        Returns:
            logits of the heads' parameter dtype; ``logits[..., h - 1, :]`` predicts ``t + 1 + h``.
        """
        kind = self.config.kind
        if kind == "transformer":
            return self._unembed(self.block_outputs(hidden_states))
        x = self.select_input(hidden_states)
        if kind == "resblock":
            z = x.unsqueeze(-2) + F.silu(
                torch.einsum("...d,hed->...he", x, self.weight) + self.bias
            )
            return self._unembed(z)
        if kind == "linear":
            return self._unembed(torch.einsum("...d,hed->...he", x, self.weight))
        per_head = self._check_tokens(next_tokens, x.shape[:-1], allow_per_head=True)
        f, out = x, []
        tok = next_tokens[..., 0] if per_head else next_tokens
        for h in range(self.config.num_heads):
            f = self._cond_feature(h, f, tok)
            logits = self._unembed(f)
            out.append(logits)
            if h + 1 < self.config.num_heads:
                if per_head:
                    tok = next_tokens[..., h + 1]
                else:
                    tok = stable_topk(logits.detach().float(), 1)[1][..., 0]
                    if self.vocab_ids is not None:
                        tok = self.vocab_ids[tok]
        return torch.stack(out, -2)

    @staticmethod
    def teacher_tokens(input_ids: torch.Tensor, num_heads: int, pad_id: int = 0) -> torch.Tensor:
        """``next_tokens[..., T, H]`` for teacher forcing from ``input_ids[..., T]``:
        ``next_tokens[..., t, d] = input_ids[..., t + 1 + d]``, ``pad_id`` past the end (those
        positions have no target for head ``d + 1`` anyway and must be masked from the loss)."""
        T = input_ids.shape[-1]
        cols = []
        for d in range(num_heads):
            shifted = input_ids[..., 1 + d :]
            pad = input_ids.new_full((*input_ids.shape[:-1], min(T, 1 + d)), pad_id)
            cols.append(torch.cat([shifted, pad], -1)[..., :T])
        return torch.stack(cols, -1)

    def draft_tree(self, hidden_states, root_tokens: torch.Tensor, tree=8):
        """Draft trees for a batch of rows: :func:`mtp_ext.trees.build_tree` with these heads.

        Args:
            hidden_states: the heads' input at the position before each root, ``[B, D]`` per
                element of the backbone's ``hidden_states`` tuple (or one ``[B, D]`` tensor).
            root_tokens: ``[B]`` int64, the last accepted token of each row.
            tree: a node count (a :class:`~mtp_ext.trees.DynamicTree`), a
                :class:`~mtp_ext.trees.StaticTree` or a :class:`~mtp_ext.trees.DynamicTree`.
        Returns:
            a :class:`~mtp_ext.trees.DraftTree` (tokens, parents, depths, scores ``[B, T]``).
        """
        from .trees import DynamicTree, build_tree

        spec = DynamicTree(tree) if isinstance(tree, int) else tree
        return build_tree(self, hidden_states, root_tokens, spec)

    def draft_input(self, hidden_states) -> torch.Tensor:
        """What :meth:`draft_step` takes at depth 1, one position per row: ``[B, D]`` from the
        backbone's hidden states (:meth:`select_input`); for ``"transformer"`` heads
        ``hidden_states`` are their blocks' outputs there, ``[B, H, D]``, flattened to
        ``[B, H * D]``."""
        if self.config.kind != "transformer":
            return self.select_input(hidden_states)
        H, D = self.config.num_heads, self.config.hidden_size
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 or tuple(
            hidden_states.shape[1:]
        ) != (H, D):
            raise ValueError(
                f"transformer heads draft from their block outputs [B, {H}, {D}], got "
                f"{list(getattr(hidden_states, 'shape', [type(hidden_states).__name__]))}"
            )
        return hidden_states.flatten(1)

    @torch.no_grad()
    def draft_step(
        self, depth: int, features: torch.Tensor, tokens: torch.Tensor | None, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One head at a time, for building trees: head ``depth`` (1-based) on ``P`` nodes.

        Args:
            depth: ``1 <= depth <= H``.
            features: ``[P, D]``; for ``depth = 1`` the heads' input (:meth:`select_input`), deeper
                the ``features`` this method returned for the parent nodes (conditioned heads) or
                the same input again (independent heads, which ignore the parents).
                ``"transformer"`` heads: ``[P, H * D]``, every head's block output (see
                :meth:`block_outputs`) at the position before the root, flattened; head ``depth``
                reads its own ``D`` columns and the features pass on unchanged.
            tokens: ``[P]`` int64, the token each node carries (the parent's drafted token, the root
                token at depth 1); required by conditioned heads, ignored by the others.
            k: children per node, ``1 <= k <= V`` (``<= N`` with a draft vocabulary).
        Returns:
            ``(features [P, D], logprobs [P, k] float32 descending, ids [P, k] int64)``: the node
            features to pass at ``depth + 1`` and the top-``k`` children with full-vocabulary ids.
        """
        H, D = self.config.num_heads, self.config.hidden_size
        if not 1 <= depth <= H:
            raise ValueError(f"depth must be in [1, {H}], got {depth}")
        n_vocab = self.config.draft_vocab_size or self.config.vocab_size
        if not 1 <= k <= n_vocab:
            raise ValueError(f"k must be in [1, {n_vocab}], got {k}")
        width = H * D if self.config.kind == "transformer" else D
        if features.dim() != 2 or features.shape[1] != width:
            raise ValueError(f"features must have shape [P, {width}], got {list(features.shape)}")
        f = features.to(self.param_dtype)
        norm_w = self.norm_weight.to(f.dtype) if self._applies_norm else None
        eps = self.config.rms_norm_eps
        h = depth - 1
        kind = self.config.kind
        if kind == "resblock":  # the fused op runs the residual block itself
            z, w, b = f, self.weight[h : h + 1], self.bias[h : h + 1]
        else:
            # The head's output is computed here; a zero residual block leaves the fused op the
            # norm, the unembedding and the top-k.
            if kind == "conditioned":
                self._check_tokens(tokens, f.shape[:1], allow_per_head=False)
                z = features = self._cond_feature(h, f, tokens)
            elif kind == "transformer":
                z = f[:, h * D : (h + 1) * D]
            else:  # linear
                z = f @ self.weight[h].T
            w, b = z.new_zeros(1, D, D), None
        lp, ids = ops.fused_mtp_heads(z, w, b, self._table(), k, norm_w, eps, self.vocab_ids)
        return features, lp[:, 0], ids[:, 0]

    @torch.no_grad()
    def draft(
        self,
        hidden_states,
        k: int,
        next_tokens: torch.Tensor | None = None,
        state: TransformerDraftState | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path: top-``k`` log-probabilities and full-vocabulary ids per head.

        Args:
            hidden_states: the backbone's ``hidden_states`` tuple (``output_hidden_states=True``),
                each ``[..., D]`` (or one tensor for an int ``layer``).
            k: ``1 <= k <= V`` (``<= N`` with a draft vocabulary).
            next_tokens: ``[...]`` int64, the token after each position (in decoding, the root
                token); required by conditioned heads, which chain through their own top-1.
            state: ``"transformer"`` heads only: a :class:`TransformerDraftState`
                (:meth:`new_draft_state`); ``hidden_states`` then holds the new positions only
                (``[B, S_new, D]``), which attend to the cached ones and are added to the caches.
            position_ids: ``"transformer"`` heads only: rotary positions ``[B, S]`` or ``[S]``
                (default: continuing after the cached positions).
        Returns:
            ``logprobs[..., H, k]`` float32 (descending, ties toward the lower id) and
            ``ids[..., H, k]`` int64; ``[B, S, H, k]`` for ``"transformer"`` heads.
        """
        n_vocab = self.config.draft_vocab_size or self.config.vocab_size
        if not 1 <= k <= n_vocab:
            raise ValueError(f"k must be in [1, {n_vocab}], got {k}")
        if self.config.kind == "transformer":
            z = self.block_outputs(hidden_states, position_ids=position_ids, state=state)
            return self._topk_logprobs(self._unembed(z), k)
        if state is not None or position_ids is not None:
            raise ValueError(
                f"state and position_ids need kind='transformer', got kind={self.config.kind!r}"
            )
        x = self.select_input(hidden_states)
        lead = x.shape[:-1]
        H, D = self.config.num_heads, self.config.hidden_size
        flat = x.reshape(-1, D)
        norm_w = self.norm_weight.to(x.dtype) if self._applies_norm else None
        eps = self.config.rms_norm_eps
        table = self._table()
        kind = self.config.kind
        if kind == "resblock":
            lp, ids = ops.fused_mtp_heads(
                flat, self.weight, self.bias, table, k, norm_w, eps, self.vocab_ids
            )
        elif kind == "linear":
            logits = self._unembed(torch.einsum("nd,hed->nhe", flat, self.weight))
            lp, ids = self._topk_logprobs(logits, k)
        else:
            self._check_tokens(next_tokens, lead, allow_per_head=False)
            tok = next_tokens.reshape(-1)
            f = flat
            lps, idss = [], []
            for depth in range(1, H + 1):  # each depth chains on the previous one's top-1
                f, lp_h, ids_h = self.draft_step(depth, f, tok, k)
                lps.append(lp_h)
                idss.append(ids_h)
                tok = ids_h[:, 0]
            lp, ids = torch.stack(lps, 1), torch.stack(idss, 1)
        return lp.reshape(*lead, H, k), ids.reshape(*lead, H, k)

    def _topk_logprobs(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of ``log_softmax(logits[..., V'])``: float32 log-probabilities (descending,
        ties toward the lower column) and full-vocabulary ids int64, each ``[..., k]``."""
        logits = logits.float()
        top_v, top_i = stable_topk(logits, k)
        lp = top_v - torch.logsumexp(logits, -1, keepdim=True)
        return lp, (top_i if self.vocab_ids is None else self.vocab_ids[top_i])
