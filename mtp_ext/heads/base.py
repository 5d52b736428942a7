"""What every kind of heads shares: the backbone's frozen buffers, the input selection, the draft
vocabulary, the unembedding, saving and loading, and the drafting entry points.

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

Final norm rule: the backbone's final RMSNorm is applied to each head's output feature before the
unembedding unless the heads read the last element of ``hidden_states`` alone (which is already
normed), so a zero-initialized residual head on the last layer reproduces the backbone's own
next-token logits exactly. With ``"whs"``, and for ``"transformer"`` heads (whose decoder block
outputs a residual stream), the norm is always applied.

Draft vocabulary: with ``config.draft_vocab_size = N`` the heads project onto ``N`` rows of the
unembedding only (buffer ``vocab_ids[N]``, set by :meth:`MTPHeads.set_draft_vocab`, saved in the
heads file); ``forward`` then returns logits over those ``N`` tokens (column ``j`` is token
``vocab_ids[j]``; :meth:`MTPHeads.draft_index` maps full-vocabulary targets to columns), and
``draft`` returns full-vocabulary ids.

Each kind is a subclass in its own module (:mod:`mtp_ext.heads.registry` lists them);
``MTPHeads(config, ...)`` builds the subclass of ``config.kind``.
"""

from __future__ import annotations

import json
import os
import weakref
from typing import Sequence, Union

import torch
from torch import nn

from .. import ops
from ..reference import stable_topk
from .backbone import backbone_parts, model_name
from .config import CONFIG_NAME, WEIGHTS_NAME, MTPHeadsConfig
from .registry import kind_class

__all__ = ["MTPHeads", "PointFeatures", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm: computed in float32, cast back, times ``weight``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


class PointFeatures:
    """Decoding state of heads that read one position: what they draft from is their input
    (:meth:`MTPHeads.input_at`) at the last accepted position of each row."""

    def at_prompt(self, heads: "MTPHeads", out, slots, next_tokens=None):
        """After the prefill ``out`` over the prompt (``slots`` its cache slots; ``next_tokens
        [B, P]`` int64 the token after each prompt slot, for kinds that read tokens)."""
        return heads.input_at(out, None)

    def after_step(self, heads: "MTPHeads", out, path: torch.Tensor, num_acc: torch.Tensor,
                   keep: int, slots, next_pos: torch.Tensor, tokens: torch.Tensor | None = None):
        """After a tree step: ``out`` the backbone over the tree, ``path [B, T]`` /
        ``num_acc [B]`` the verification, ``keep`` the slots each row adds, ``slots`` and
        ``next_pos`` the cache as it was before the step; ``tokens [B, >= keep]`` int64 the
        verifier's tokens (``tokens[:, i]`` follows path node ``i``)."""
        rows = torch.arange(path.shape[0], device=path.device)
        return heads.input_at(out, path[rows, num_acc])


class MTPHeads(nn.Module):
    """``H`` multi-token prediction heads sharing the backbone's frozen unembedding.

    ``reads_sequence`` (class attribute): the kind attends over the positions of its input
    sequence (``"transformer"``, ``"eagle"``), so training runs it on whole sequences.

    ``MTPHeads(config, ...)`` returns the subclass for ``config.kind``
    (:func:`~mtp_ext.heads.registry.kind_class`).

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

    reads_sequence = False

    def __new__(cls, *args, **kwargs):
        if cls is MTPHeads:
            config = args[0] if args else kwargs.get("config")
            if not isinstance(config, MTPHeadsConfig):
                raise TypeError(f"config must be an MTPHeadsConfig, got {type(config).__name__}")
            cls = kind_class(config.kind)
        return super().__new__(cls)

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
        D, V = config.hidden_size, config.vocab_size
        if tuple(lm_head.shape) != (V, D):
            raise ValueError(f"lm_head must have shape [{V}, {D}], got {list(lm_head.shape)}")
        if norm_weight is not None and tuple(norm_weight.shape) != (D,):
            raise ValueError(f"norm_weight must have shape [{D}], got {list(norm_weight.shape)}")
        self._check_parts(embed, decoder_layer, rotary)
        dtype = dtype or lm_head.dtype
        device = lm_head.device
        # Shared, frozen, not saved: detached views of the backbone's own tensors.
        self.register_buffer("lm_head_weight", lm_head.detach(), persistent=False)
        self.register_buffer(
            "norm_weight", None if norm_weight is None else norm_weight.detach(), persistent=False
        )
        self.register_buffer("embed_weight", None, persistent=False)
        self._make_parameters(dict(device=device, dtype=dtype), embed, decoder_layer, rotary)
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
    # What each kind defines
    # ------------------------------------------------------------------------------------------

    def _check_parts(self, embed, decoder_layer, rotary) -> None:
        """Raises ValueError when a backbone part this kind needs is missing or mis-shaped."""

    def _make_parameters(self, kw: dict, embed, decoder_layer, rotary) -> None:
        """Creates the kind's own parameters (``kw``: device and dtype)."""
        raise NotImplementedError

    @classmethod
    def _backbone_kwargs(cls, model) -> dict:
        """Extra constructor arguments this kind takes from the backbone (none by default)."""
        return {}

    def _forward(self, x: torch.Tensor, next_tokens: torch.Tensor | None) -> torch.Tensor:
        """Training path on the selected input ``x[..., D]``: logits ``[..., H, V']``."""
        raise NotImplementedError

    def _draft_flat(self, x: torch.Tensor, k: int, next_tokens, lead) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path on ``x[N, D]`` (``lead`` the shape ``N`` was flattened from):
        ``(logprobs [N, H, k], ids [N, H, k])``."""
        raise NotImplementedError

    def _draft_head(self, h: int, f: torch.Tensor, tokens: torch.Tensor | None):
        """Head ``h`` (0-based) on node features ``f[P, width]``: ``(z [P, D], weight, bias,
        features)``: the output feature, or with ``weight [1, D, D]`` / ``bias [1, D]`` the
        input of one residual block that :func:`mtp_ext.ops.fused_mtp_heads` runs; and the
        features to pass to the next depth."""
        raise NotImplementedError

    @property
    def feature_width(self) -> int:
        """Columns of the features :meth:`draft_step` takes."""
        return self.config.hidden_size

    def decode_features(self):
        """How what the heads draft from follows the decoding steps (a new object per call):
        here :class:`PointFeatures`."""
        return PointFeatures()

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
        fuse_layers: Sequence[int] | None = None,
        fc_bias: bool = False,
    ) -> "MTPHeads":
        """Fresh heads for a transformers causal LM (its lm_head, final norm and embeddings; for
        ``kind="transformer"`` and ``"eagle"`` also copies of its last decoder layer and its
        rotary module). ``fuse_layers`` / ``fc_bias``: ``"eagle"`` only (see
        :class:`MTPHeadsConfig`)."""
        lm_head, norm_w, eps, embed = backbone_parts(model)
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
            backbone=model_name(model),
            rms_norm_eps=eps,
            fuse_layers=None if fuse_layers is None else [int(i) for i in fuse_layers],
            fc_bias=fc_bias,
        )
        extra = kind_class(kind)._backbone_kwargs(model)
        return MTPHeads(config, lm_head, norm_w, embed, dtype=dtype, **extra)

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
        lm_head, norm_w, eps, embed = backbone_parts(model)
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
        name = model_name(model)
        if config.backbone and name and config.backbone != name:
            raise ValueError(
                f"heads in {str(directory)!r} were trained for backbone {config.backbone!r}, "
                f"but this model is {name!r}"
            )
        heads = MTPHeads(
            config, lm_head, norm_w, embed, dtype=dtype,
            **kind_class(config.kind)._backbone_kwargs(model),
        )
        path = os.path.join(directory, WEIGHTS_NAME)
        state = load_file(path, device=str(lm_head.device))
        heads.load_state_dict(state, strict=True)
        if heads.vocab_ids is not None:
            try:
                heads.set_draft_vocab(heads.vocab_ids.clone())
            except ValueError as e:
                raise ValueError(f"{path!r} holds an invalid draft vocabulary (vocab_ids): {e}") from None
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
    # Inputs and the unembedding
    # ------------------------------------------------------------------------------------------

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the heads' parameters (what they compute in)."""
        return self.weight.dtype

    @property
    def _applies_norm(self) -> bool:
        return self.norm_weight is not None and not self.config.reads_last

    def whs_weights(self) -> torch.Tensor:
        """The WHS mixing weights: ``[L + 1]`` (or ``[L + 1, D]``), a softmax over layers."""
        if self.config.layer != "whs":
            raise ValueError("whs_weights needs layer='whs'")
        return torch.softmax(self.whs_logits, dim=0)

    def fused_states(self, hidden_states, dtype: torch.dtype) -> torch.Tensor:
        """The ``fuse_layers`` hidden states of the backbone's ``hidden_states`` tuple side by
        side, ``[..., kD]`` of ``dtype`` (what EAGLE-3 heads read and a training cache stores)."""
        if self.config.fuse_layers is None:
            raise ValueError("fused_states needs heads with fuse_layers")
        return torch.cat([hidden_states[i].to(dtype) for i in self.config.fuse_layers], -1)

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
            if self.config.fuse_layers is not None:
                x = self.fused_states(hs, self.param_dtype)
            elif self.config.layer == "whs":
                w = self.whs_weights()
                stacked = torch.stack([h.float() for h in hs], 0)  # [L+1, ..., D]
                if w.dim() == 1:
                    w = w.view(-1, *([1] * (stacked.dim() - 1)))
                else:
                    w = w.view(w.shape[0], *([1] * (stacked.dim() - 2)), w.shape[1])
                x = (w * stacked).sum(0)
            else:
                x = hs[self.config.layer]
        width = self.config.hidden_size * len(self.config.fuse_layers or [None])
        if x.shape[-1] != width:
            what = ("hidden_size" if width == self.config.hidden_size
                    else "len(fuse_layers) * hidden_size")
            raise ValueError(f"hidden states must end in {what}={width}, got shape {list(x.shape)}")
        return x.to(self.param_dtype)

    def input_at(self, out, index: torch.Tensor | slice | None):
        """What the heads read at some positions of a backbone output ``out`` (with
        ``last_hidden_state`` or ``hidden_states``): ``index [B]`` int64 (one position per row:
        ``[B, D]``), ``[B, K]`` (``K`` per row: ``[B, K, D]``), a slice of positions
        (``[B, S', D]``) or None (the last position: ``[B, D]``). A tensor, or a tuple of them (one
        per hidden state) for heads that read several layers."""
        def at(h):
            if index is None:
                return h[:, -1]
            if isinstance(index, slice):
                return h[:, index]
            rows = torch.arange(h.shape[0], device=h.device).view(-1, *([1] * (index.dim() - 1)))
            return h[rows, index]

        if self.config.reads_last:
            last = out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]
            return at(last)
        return tuple(at(h) for h in out.hidden_states)

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
            z = rms_norm(z, self.norm_weight.to(z.dtype), self.config.rms_norm_eps)
        return z @ self._table().T

    def unembed(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., V']`` (the heads' parameter dtype) of head output features ``z[..., D]``:
        the backbone's final norm (when the heads apply it, see the module docstring), then its
        unembedding (the draft vocabulary's rows only, when set)."""
        return self._unembed(z.to(self.param_dtype))

    def _topk_logprobs(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of ``log_softmax(logits[..., V'])``: float32 log-probabilities (descending,
        ties toward the lower column) and full-vocabulary ids int64, each ``[..., k]``."""
        logits = logits.float()
        top_v, top_i = stable_topk(logits, k)
        lp = top_v - torch.logsumexp(logits, -1, keepdim=True)
        return lp, (top_i if self.vocab_ids is None else self.vocab_ids[top_i])

    # ------------------------------------------------------------------------------------------
    # Sequence heads only (the ``"transformer"`` kind overrides these)
    # ------------------------------------------------------------------------------------------

    def _require_transformer(self, what: str) -> None:
        raise ValueError(f"{what} needs kind='transformer', got kind={self.config.kind!r}")

    @property
    def block_window(self) -> int | None:
        """``"transformer"`` heads only: the sliding window of their blocks' attention."""
        self._require_transformer("block_window")

    def new_draft_state(self):
        """``"transformer"`` heads only: an empty incremental drafting state."""
        self._require_transformer("new_draft_state")

    def block_outputs(self, hidden_states, position_ids=None, state=None, attention_mask=None):
        """``"transformer"`` heads only: each head's decoder block on the input sequence."""
        self._require_transformer("block_outputs")

    # ------------------------------------------------------------------------------------------
    # Computation
    # ------------------------------------------------------------------------------------------

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
        return self._forward(self.select_input(hidden_states), next_tokens)

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

    def draft_input(self, hidden_states) -> torch.Tensor:
        """What :meth:`draft_step` takes at depth 1, one position per row: ``[B, D]`` from the
        backbone's hidden states (:meth:`select_input`); for ``"transformer"`` heads
        ``hidden_states`` are their blocks' outputs there, ``[B, H, D]``, flattened to
        ``[B, H * D]``."""
        return self.select_input(hidden_states)

    def _check_k(self, k: int) -> None:
        n_vocab = self.config.draft_vocab_size or self.config.vocab_size
        if not 1 <= k <= n_vocab:
            raise ValueError(f"k must be in [1, {n_vocab}], got {k}")

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
        H = self.config.num_heads
        if not 1 <= depth <= H:
            raise ValueError(f"depth must be in [1, {H}], got {depth}")
        self._check_k(k)
        width = self.feature_width
        if features.dim() != 2 or features.shape[1] != width:
            raise ValueError(f"features must have shape [P, {width}], got {list(features.shape)}")
        f = features.to(self.param_dtype)
        z, w, b, features = self._draft_head(depth - 1, f, tokens)
        norm_w = self.norm_weight.to(z.dtype) if self._applies_norm else None
        lp, ids = ops.fused_mtp_heads(
            z, w, b, self._table(), k, norm_w, self.config.rms_norm_eps, self.vocab_ids
        )
        return features, lp[:, 0], ids[:, 0]

    @torch.no_grad()
    def draft(
        self,
        hidden_states,
        k: int,
        next_tokens: torch.Tensor | None = None,
        state=None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path: top-``k`` log-probabilities and full-vocabulary ids per head.

        Args:
            hidden_states: the backbone's ``hidden_states`` tuple (``output_hidden_states=True``),
                each ``[..., D]`` (or one tensor for an int ``layer``).
            k: ``1 <= k <= V`` (``<= N`` with a draft vocabulary).
            next_tokens: ``[...]`` int64, the token after each position (in decoding, the root
                token); required by conditioned heads, which chain through their own top-1.
            state: ``"transformer"`` heads only: a
                :class:`~mtp_ext.heads.transformer.TransformerDraftState`
                (:meth:`new_draft_state`); ``hidden_states`` then holds the new positions only
                (``[B, S_new, D]``), which attend to the cached ones and are added to the caches.
            position_ids: ``"transformer"`` heads only: rotary positions ``[B, S]`` or ``[S]``
                (default: continuing after the cached positions).
        Returns:
            ``logprobs[..., H, k]`` float32 (descending, ties toward the lower id) and
            ``ids[..., H, k]`` int64; ``[B, S, H, k]`` for ``"transformer"`` heads.
        """
        self._check_k(k)
        if state is not None or position_ids is not None:
            raise ValueError(
                f"state and position_ids need kind='transformer', got kind={self.config.kind!r}"
            )
        x = self.select_input(hidden_states)
        lead = x.shape[:-1]
        lp, ids = self._draft_flat(x.reshape(-1, self.config.hidden_size), k, next_tokens, lead)
        H = self.config.num_heads
        return lp.reshape(*lead, H, k), ids.reshape(*lead, H, k)
