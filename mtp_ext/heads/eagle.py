"""``"eagle"`` heads: the EAGLE drafter layout (Li et al. 2024, "EAGLE: speculative sampling
requires rethinking feature uncertainty"; EAGLE-3, Li et al. 2025), one decoder block shared by
every depth, attending over the features of the whole sequence, with its own key/value cache.

Layouts (``config.fuse_layers``):

- EAGLE-1 (None): the feature ``f_t`` is the backbone's last hidden state (after its final norm).
  The block's input at position ``t`` is ``fc([embed(x_{t+1}); f_t])`` (``fc: 2D -> D``), and the
  block is a Llama decoder layer without its input norm (as the EAGLE-1 checkpoints have it). Its
  output ``g_t`` predicts the feature at ``t + 1``; the backbone's output layer turns it into the
  logits of ``x_{t+2}`` directly (no norm).
- EAGLE-3 (a list of hidden-state indices, e.g. low, middle and high layers): ``fc: kD -> D``
  fuses those (pre-norm) hidden states into ``h_t``; the attention reads
  ``[input_layernorm(embed(x_{t+1})); hidden_norm(h_t)]`` (``2D`` wide) and the residual stream
  starts at ``h_t``; the output ``g_t`` goes through the backbone's final norm, then the output
  layer (its draft-vocabulary rows with ``draft_vocab_size``, EAGLE-3's ``d2t`` map).

Depth ``d > 1`` feeds the block's own output back: the input at ``t + d - 1`` is built from
``g_{t+d-2}`` (instead of the backbone's feature, unknown there) and the drafted token
``x_{t+d}``; it attends to the depth-1 entries of positions ``<= t`` (the real features) and to
its own chain's deeper entries. Training runs every depth that way (EAGLE-3's "training-time
test": ``forward`` with teacher tokens ``[B, S, H]``); decoding drafts trees of depth up to
``num_heads`` with the same weights at every depth.

Decoding state (:class:`EagleFeatures`): one key/value entry per backbone cache slot, computed
after each step for the accepted path (the slot's feature and the token after it), so the drafter
attends to the same valid slots as the backbone. Drafting a tree (:func:`mtp_ext.trees.draft_pool`)
goes depth by depth through :meth:`MTPHeads.draft_step`: a node's features carry its output
``g`` and the keys and values of its drafted ancestors, ``[P, D + 2 (H - 1) n_kv d_head]``.
:meth:`EagleHeads.draft_input` binds the rows' context (their cached keys and values) for the
tree being drafted: draft one tree at a time per heads object.

Backbones: Llama-architecture decoder layers (``q/k/v/o_proj`` without bias, a gated MLP, no
query/key norms, no sliding window). The block starts as a copy of the backbone's last layer
whose output projections are zero (the identity), ``fc`` passes the (last) feature through.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ..growing import GrowingColumns
from ..reference import stable_topk
from .base import MTPHeads, rms_norm
from .transformer import _Unregistered, block_parts

__all__ = ["EagleHeads", "EagleBlock", "EagleContext", "EagleFeatures", "default_fuse_layers"]


def default_fuse_layers(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high features of a backbone of ``num_layers`` decoder layers:
    hidden states ``[2, L // 2, L - 3]`` (indices into ``hidden_states``), the default of both
    vLLM and SGLang."""
    L = int(num_layers)
    return [2, L // 2, L - 3]


class _Norm(nn.Module):
    """Llama RMSNorm with a ``weight [D]`` parameter (the name the engines' checkpoints use)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def _check_llama_layer(layer: nn.Module) -> None:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    need += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
    missing = [n for owner, n in need if not isinstance(getattr(owner, n, None), nn.Linear)]
    extra = [n for n in ("q_norm", "k_norm") if getattr(attn, n, None) is not None]
    biased = [n for owner, n in need if getattr(getattr(owner, n, None), "bias", None) is not None]
    window = getattr(attn, "sliding_window", None)
    if missing or extra or biased or window or not hasattr(layer, "post_attention_layernorm"):
        raise ValueError(
            "kind='eagle' needs a Llama-architecture backbone (q/k/v/o and gate/up/down "
            "projections without bias, no query/key norms, no sliding window); "
            f"{type(layer).__name__} has missing={missing} norms={extra} biased={biased} "
            f"sliding_window={window}"
        )


class EagleBlock(nn.Module):
    """One Llama decoder layer with the checkpoint names of the EAGLE drafters
    (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``post_attention_layernorm``; for
    EAGLE-3 also ``input_layernorm`` on the embedding and ``hidden_norm`` on the feature, and an
    attention input ``2D`` wide), started from the backbone's decoder layer ``layer`` with its two
    output projections (``o_proj``, ``down_proj``) at zero: the identity on the residual stream,
    so that fresh heads draft what the backbone's output layer reads from their input (a
    copied block would feed a post-norm feature into a layer made for the pre-norm stream)."""

    def __init__(self, layer: nn.Module, eagle3: bool, kw: dict):
        super().__init__()
        _check_llama_layer(layer)
        src_attn, src_mlp = layer.self_attn, layer.mlp
        q = src_attn.q_proj.weight.detach().to(**kw)
        k = src_attn.k_proj.weight.detach().to(**kw)
        v = src_attn.v_proj.weight.detach().to(**kw)
        D = q.shape[1]
        self.head_dim = int(src_attn.head_dim)
        self.num_heads = q.shape[0] // self.head_dim
        self.num_kv = k.shape[0] // self.head_dim
        self.scale = float(getattr(src_attn, "scaling", self.head_dim ** -0.5))
        self.eagle3 = eagle3
        ln = layer.post_attention_layernorm
        eps = float(getattr(ln, "variance_epsilon", None) or getattr(ln, "eps", 1e-6))
        if eagle3:  # the attention reads [embedding; feature]: start with the feature half only
            q, k, v = (torch.cat([torch.zeros_like(w), w], 1) for w in (q, k, v))
            in_norm = layer.input_layernorm.weight.detach().to(**kw)
            self.input_layernorm = _Norm(in_norm, eps)
            self.hidden_norm = _Norm(in_norm, eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj, self.self_attn.k_proj, self.self_attn.v_proj = (
            _linear(q), _linear(k), _linear(v))
        self.self_attn.o_proj = _linear(src_attn.o_proj.weight.detach().to(**kw))
        self.post_attention_layernorm = _Norm(ln.weight.detach().to(**kw), eps)
        self.mlp = nn.Module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self.mlp, name, _linear(getattr(src_mlp, name).weight.detach().to(**kw)))
        self._act = _Unregistered(src_mlp.act_fn)
        self.hidden_size = D
        with torch.no_grad():  # the block starts as the identity on its residual stream
            self.self_attn.o_proj.weight.zero_()
            self.mlp.down_proj.weight.zero_()

    @property
    def kv_width(self) -> int:
        """``n_kv * d_head``: the columns of one key (or value) entry."""
        return self.num_kv * self.head_dim

    def attention_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What the projections read: ``hidden`` (EAGLE-1, whose ``hidden`` is already ``fc``'s
        output), or ``[input_layernorm(embeds); hidden_norm(hidden)]`` (EAGLE-3)."""
        if not self.eagle3:
            return hidden
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], -1)

    def qkv(self, a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries ``[..., nH, hd]`` and keys ``[..., nKV, hd]``, values ``[..., nKV, hd]``
        of attention inputs ``a [..., Din]`` (``cos``/``sin [..., hd]`` at their positions)."""
        lead = a.shape[:-1]
        q = self.self_attn.q_proj(a).view(*lead, self.num_heads, self.head_dim)
        k = self.self_attn.k_proj(a).view(*lead, self.num_kv, self.head_dim)
        v = self.self_attn.v_proj(a).view(*lead, self.num_kv, self.head_dim)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def finish(self, residual: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The layer's output from its residual input ``[..., D]`` and the attention's output
        ``[..., nH, hd]``: ``o_proj``, the residual add, then the MLP block."""
        h = residual + self.self_attn.o_proj(attn.flatten(-2))
        x = self.post_attention_layernorm(h)
        m = self.mlp.down_proj(self._act.module(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))
        return h + m


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (``rotate_half`` convention) of ``x [..., heads, hd]`` with
    ``cos``/``sin [..., hd]``."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _attend(q, ctx_k, ctx_v, ctx_ok, own_k=None, own_v=None, scale: float = 1.0):
    """Attention of ``n`` queries per row over a shared context and each query's own keys.

    Args:
        q: ``[B, n, nH, hd]``.
        ctx_k, ctx_v: ``[B, S, nKV, hd]`` the context's keys and values.
        ctx_ok: ``[B, n, S]`` bool, which context entries each query may attend to.
        own_k, own_v: ``[B, n, E, nKV, hd]`` keys and values only that query attends to (its
            chain of drafted ancestors and itself), all allowed; or None.
    Returns:
        ``[B, n, nH, hd]`` of ``q``'s dtype (softmax in float32; a query with nothing allowed
        gets a uniform average instead of NaN).
    """
    B, n, nH, hd = q.shape
    rep = nH // ctx_k.shape[2]
    qf = q.float().view(B, n, ctx_k.shape[2], rep, hd)  # [B, n, nKV, rep, hd]
    s_ctx = torch.einsum("bngrd,bsgd->bngrs", qf, ctx_k.float()) * scale
    s_ctx = s_ctx.masked_fill(~ctx_ok[:, :, None, None, :], torch.finfo(torch.float32).min)
    parts = [s_ctx]
    if own_k is not None:
        s_own = torch.einsum("bngrd,bnegd->bngre", qf, own_k.float()) * scale
        parts.append(s_own)
    w = torch.softmax(torch.cat(parts, -1), -1)
    S = ctx_k.shape[1]
    out = torch.einsum("bngrs,bsgd->bngrd", w[..., :S], ctx_v.float())
    if own_k is not None:
        out = out + torch.einsum("bngre,bnegd->bngrd", w[..., S:], own_v.float())
    return out.reshape(B, n, nH, hd).to(q.dtype)


@dataclasses.dataclass
class EagleContext:
    """What :class:`EagleHeads` draft a tree from: ``g [B, D]`` the block's output at each row's
    last accepted position (the depth-1 feature), the rows' cached ``keys`` / ``values``
    ``[B, S, nKV, hd]`` with ``valid [B, S]`` bool, and ``next_pos [B]`` int64, the position of
    each row's root token."""

    g: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    next_pos: torch.Tensor


class EagleHeads(MTPHeads):
    """One decoder block shared by every depth (see the module docstring); parameters ``fc``
    (``[D, 2D]`` or ``[D, kD]``, and ``fc.bias`` with ``fc_bias``) and ``layer.*``
    (:class:`EagleBlock`); the backbone's input embedding is the buffer ``embed_weight [V, D]``."""

    reads_sequence = True

    def _check_parts(self, embed, decoder_layer, rotary) -> None:
        if embed is None or decoder_layer is None or rotary is None:
            raise ValueError("kind='eagle' needs the backbone's input embedding, its last decoder "
                             "layer and its rotary module (MTPHeads.for_model finds them)")
        _check_llama_layer(decoder_layer)
        if embed.shape[-1] != self.config.hidden_size:
            raise ValueError(f"embed must have shape [*, {self.config.hidden_size}], got "
                             f"{list(embed.shape)}")

    def _make_parameters(self, kw, embed, decoder_layer, rotary) -> None:
        D = self.config.hidden_size
        fused = self.config.fuse_layers
        self.embed_weight = embed.detach()
        width = D * (len(fused) if fused else 2)
        fc = torch.zeros(D, width, **kw)
        fc[:, width - D:] = torch.eye(D, **kw)  # start by passing the (last) feature through
        self.fc = nn.Linear(width, D, bias=self.config.fc_bias, **kw)
        with torch.no_grad():
            self.fc.weight.copy_(fc)
            if self.fc.bias is not None:
                self.fc.bias.zero_()
        self.layer = EagleBlock(decoder_layer, fused is not None, kw)
        self._rotary = _Unregistered(rotary)
        self._context: EagleContext | None = None

    @classmethod
    def _backbone_kwargs(cls, model) -> dict:
        return block_parts(model)

    @property
    def param_dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def eagle3(self) -> bool:
        return self.config.fuse_layers is not None

    @property
    def _applies_norm(self) -> bool:
        return self.eagle3 and self.norm_weight is not None

    @property
    def feature_width(self) -> int:
        return self.config.hidden_size + 2 * (self.config.num_heads - 1) * self.layer.kv_width

    def decode_features(self) -> "EagleFeatures":
        return EagleFeatures(self)

    # ------------------------------------------------------------------------------------------
    # The block on inputs
    # ------------------------------------------------------------------------------------------

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_weight).to(self.param_dtype)

    def _inputs(self, tokens: torch.Tensor, hidden: torch.Tensor, first: bool):
        """``(attention input [..., Din], residual [..., D])`` of entries carrying ``tokens``
        (int64) after ``hidden``: the backbone's feature (``first``; ``fc`` applies) or the
        block's own output at the parent."""
        e = self._embed(tokens)
        if self.eagle3:
            h = self.fc(hidden) if first else hidden
            return self.layer.attention_input(e, h), h
        h = self.fc(torch.cat([e, hidden], -1))  # EAGLE-1: g takes the feature's place in fc
        return h, h

    def _cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor):
        """``(cos, sin)`` ``[*position_ids.shape, hd]`` from the backbone's rotary module."""
        flat = position_ids.reshape(1, -1)
        cos, sin = self._rotary.module(x, flat)
        return cos.view(*position_ids.shape, -1), sin.view(*position_ids.shape, -1)

    def _sequence(self, x: torch.Tensor, tokens: torch.Tensor, teacher: bool):
        """Every depth over whole sequences: ``x [B, S, Din]`` the backbone's features,
        ``tokens`` int64 ``[B, S, H]`` (teacher tokens: ``tokens[b, t, d]`` is the token at
        ``t + 1 + d``) or ``[B, S]`` (the token at ``t + 1``; deeper depths chain through their
        own argmax). Returns logits ``[B, S, H, V']`` of the heads' dtype."""
        B, S, _ = x.shape
        H = self.config.num_heads
        dev = x.device
        pos = torch.arange(S, device=dev)
        allowed = (pos[None, :] <= pos[:, None])[None].expand(B, S, S)
        tok = tokens[..., 0] if teacher else tokens
        a, h = self._inputs(tok, x, True)
        cos, sin = self._cos_sin(a, pos.expand(B, S))
        q, k1, v1 = self.layer.qkv(a, cos, sin)
        g = self.layer.finish(h, _attend(q, k1, v1, allowed, scale=self.layer.scale))
        out = [self._unembed(g)]
        own_k, own_v = [], []
        for d in range(2, H + 1):
            if teacher:
                tok = tokens[..., d - 1]
            else:
                tok = stable_topk(out[-1].detach().float(), 1)[1][..., 0]
                if self.vocab_ids is not None:
                    tok = self.vocab_ids[tok]
            a, h = self._inputs(tok, g, False)
            cos, sin = self._cos_sin(a, (pos + d - 1).expand(B, S))
            q, k, v = self.layer.qkv(a, cos, sin)
            own_k.append(k)
            own_v.append(v)
            attn = _attend(q, k1, v1, allowed, torch.stack(own_k, 2), torch.stack(own_v, 2),
                           self.layer.scale)
            g = self.layer.finish(h, attn)
            out.append(self._unembed(g))
        return torch.stack(out, -2)

    def _check_sequence_inputs(self, x: torch.Tensor, tokens, allow_per_head: bool) -> bool:
        if x.dim() != 3:
            raise ValueError("kind='eagle' needs features with a sequence axis [B, S, "
                             f"{x.shape[-1]}], got shape {list(x.shape)}")
        if tokens is None:
            raise ValueError("kind='eagle' needs next_tokens (the token after each position)")
        if tokens.dtype != torch.long:
            raise ValueError(f"next_tokens must be int64, got {tokens.dtype}")
        lead = tuple(x.shape[:2])
        if tuple(tokens.shape) == lead:
            return False
        if allow_per_head and tuple(tokens.shape) == (*lead, self.config.num_heads):
            return True
        want = f"{list(lead)}" + (f" or {list(lead) + [self.config.num_heads]}"
                                  if allow_per_head else "")
        raise ValueError(f"next_tokens must have shape {want}, got {list(tokens.shape)}")

    def forward(self, hidden_states, next_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Training path over whole sequences: ``hidden_states`` as for :meth:`MTPHeads.forward`
        with a sequence axis (each ``[B, S, D]``, or one fused ``[B, S, kD]`` tensor for EAGLE-3),
        ``next_tokens`` ``[B, S, H]`` teacher tokens (:meth:`MTPHeads.teacher_tokens`; depths
        ``> 1`` still read the block's own outputs: training-time test) or ``[B, S]`` (the
        token after each position; deeper tokens are the drafter's own argmax). Returns logits
        ``[B, S, H, V']`` of the heads' dtype, causal over the ``S`` positions."""
        x = self.select_input(hidden_states)
        teacher = self._check_sequence_inputs(x, next_tokens, allow_per_head=True)
        return self._sequence(x, next_tokens, teacher)

    @torch.no_grad()
    def draft(self, hidden_states, k: int, next_tokens=None, state=None, position_ids=None):
        """Inference path over whole sequences: top-``k`` ``(logprobs [B, S, H, k] float32,
        ids [B, S, H, k] int64)``, each depth chaining on the previous depth's top-1 from
        ``next_tokens [B, S]`` (the token after each position)."""
        self._check_k(k)
        if state is not None or position_ids is not None:
            raise ValueError("eagle heads keep their decoding state in EagleFeatures; "
                             "state and position_ids are not taken")
        x = self.select_input(hidden_states)
        self._check_sequence_inputs(x, next_tokens, allow_per_head=False)
        return self._topk_logprobs(self._sequence(x, next_tokens, False), k)

    # ------------------------------------------------------------------------------------------
    # Drafting trees (see the module docstring)
    # ------------------------------------------------------------------------------------------

    def draft_input(self, hidden_states) -> torch.Tensor:
        """Binds ``hidden_states`` (an :class:`EagleContext`, what :class:`EagleFeatures` keeps
        during decoding) as the context of the tree about to be drafted and returns the depth-1
        features ``[B, feature_width]`` (``g``, no ancestors)."""
        if not isinstance(hidden_states, EagleContext):
            raise ValueError("eagle heads draft trees from an EagleContext (their decoding state, "
                             f"EagleFeatures), got {type(hidden_states).__name__}")
        ctx = hidden_states
        self._context = ctx
        B = ctx.g.shape[0]
        pad = ctx.g.new_zeros(B, self.feature_width - self.config.hidden_size)
        return torch.cat([ctx.g.to(self.param_dtype), pad], 1)

    def _draft_head(self, h, f, tokens):
        D = self.config.hidden_size
        if h == 0:  # the roots: their entry is cached already, g is their output
            return f[:, :D], None, None, f
        ctx = self._context
        if ctx is None:
            raise ValueError("eagle heads draft depth > 1 only inside a tree started by "
                             "draft_input(EagleContext)")
        if tokens is None or tokens.dtype != torch.long or tuple(tokens.shape) != f.shape[:1]:
            raise ValueError(f"tokens must be int64 of shape [{f.shape[0]}]")
        B = ctx.g.shape[0]
        P = f.shape[0]
        if P % B:
            raise ValueError(f"{P} nodes do not split over the context's {B} rows")
        n = P // B
        H = self.config.num_heads
        nkv, hd = self.layer.num_kv, self.layer.head_dim
        E = h - 1  # drafted ancestors with an entry (tree depths 1 .. h - 1)
        anc = f[:, D:].view(P, 2, H - 1, nkv, hd)
        a, res = self._inputs(tokens, f[:, :D], False)
        pos = (ctx.next_pos.view(B, 1) + (h - 1)).expand(B, n)  # the entry's position
        cos, sin = self._cos_sin(a, pos.reshape(P))
        q, k, v = self.layer.qkv(a, cos, sin)  # [P, nH, hd], [P, nKV, hd] x 2
        own_k = torch.cat([anc[:, 0, :E], k[:, None]], 1).view(B, n, E + 1, nkv, hd)
        own_v = torch.cat([anc[:, 1, :E], v[:, None]], 1).view(B, n, E + 1, nkv, hd)
        ok = ctx.valid[:, None, :].expand(B, n, ctx.valid.shape[1])
        attn = _attend(q.view(B, n, *q.shape[1:]), ctx.keys, ctx.values, ok, own_k, own_v,
                       self.layer.scale)
        g = self.layer.finish(res, attn.view(P, *attn.shape[2:]))
        out = f.clone()
        out[:, :D] = g
        out_anc = out[:, D:].view(P, 2, H - 1, nkv, hd)
        if E < H - 1:
            out_anc[:, 0, E] = k
            out_anc[:, 1, E] = v
        return g, None, None, out

    # ------------------------------------------------------------------------------------------
    # Entries of the decoding context
    # ------------------------------------------------------------------------------------------

    def context_entries(self, x: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
                        valid: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                        cache_valid: torch.Tensor):
        """Depth-1 entries of ``n`` new positions per row after a cache.

        Args:
            x: ``[B, n, Din]`` the backbone's features there (:meth:`select_input`).
            tokens: ``[B, n]`` int64, the token after each position.
            pos: ``[B, n]`` int64 positions; ``valid [B, n]`` bool.
            keys, values: ``[B, S, nKV, hd]`` the cached entries; ``cache_valid [B, S]`` bool.
        Returns:
            ``(g [B, n, D], k [B, n, nKV, hd], v [B, n, nKV, hd])``: the block's outputs (each new
            entry attends to the valid cached ones and, causally, the valid new ones) and the new
            entries' keys and values.
        """
        B, n, _ = x.shape
        # Past a row's accepted path the verifier's tokens may be -1: those entries are invalid.
        a, h = self._inputs(tokens.clamp(min=0), x.to(self.param_dtype), True)
        cos, sin = self._cos_sin(a, pos)
        q, k, v = self.layer.qkv(a, cos, sin)
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril_()
        ok = torch.cat([cache_valid[:, None, :].expand(B, n, cache_valid.shape[1]),
                        causal[None] & valid[:, None, :]], 2)
        attn = _attend(q, torch.cat([keys, k], 1), torch.cat([values, v], 1), ok,
                       scale=self.layer.scale)
        return self.layer.finish(h, attn), k, v


class EagleFeatures:
    """Decoding state of ``"eagle"`` heads: their key/value entries, one per backbone cache slot
    (slot ``i`` holds the entry of the slot's position, built from the backbone's feature there
    and the token after it), in buffers that grow by doubling; and the :class:`EagleContext` to
    draft the next tree from."""

    def __init__(self, heads: EagleHeads):
        self._entries = GrowingColumns()
        self._kv_shape = (heads.layer.num_kv, heads.layer.head_dim)

    @property
    def length(self) -> int:
        return self._entries.length

    def _cached(self, B: int, like: torch.Tensor):
        if self._entries.empty:
            empty = like.new_zeros(B, 0, *self._kv_shape)
            return empty, empty
        return self._entries["k"], self._entries["v"]

    def _update(self, heads: EagleHeads, x, tokens, pos, valid, slots, last, next_pos):
        B = x.shape[0]
        keys, values = self._cached(B, heads.fc.weight)
        cache_valid = (slots.valid if slots is not None
                       else torch.zeros(B, 0, dtype=torch.bool, device=x.device))
        if cache_valid.shape[1] != self.length:
            raise RuntimeError(f"eagle entries ({self.length}) out of step with the cache "
                               f"slots ({cache_valid.shape[1]})")
        g, k, v = heads.context_entries(x, tokens, pos, valid, keys, values, cache_valid)
        self._entries.append(k=k, v=v)
        all_valid = torch.cat([cache_valid, valid], 1)
        rows = torch.arange(B, device=x.device)
        return EagleContext(g[rows, last], self._entries["k"], self._entries["v"], all_valid,
                            next_pos)

    def at_prompt(self, heads: EagleHeads, out, slots, next_tokens: torch.Tensor | None = None):
        """After the prefill: ``next_tokens [B, P]`` int64, the token after each prompt slot (the
        prompt shifted by one, then the first new token)."""
        if next_tokens is None:
            raise ValueError("eagle heads need the token after each prompt position "
                             "(next_tokens) to start decoding")
        x = heads.select_input(heads.input_at(out, slice(None)))
        P = x.shape[1]
        last = torch.full((x.shape[0],), P - 1, dtype=torch.long, device=x.device)
        next_pos = slots.valid.long().sum(1)
        return self._update(heads, x, next_tokens, slots.pos, slots.valid, None, last, next_pos)

    def after_step(self, heads: EagleHeads, out, path: torch.Tensor, num_acc: torch.Tensor,
                   keep: int, slots, next_pos: torch.Tensor, tokens: torch.Tensor | None = None):
        """After a step: the entries of the ``keep`` slots each row added (its accepted path; the
        slots past ``num_acc`` are invalid); ``tokens [B, >= keep]`` int64, the verifier's tokens
        (``tokens[:, i]`` follows path node ``i``)."""
        if tokens is None:
            raise ValueError("eagle heads need the verifier's tokens after each step")
        kept = torch.arange(keep, device=path.device)[None]
        x = heads.select_input(heads.input_at(out, path[:, :keep].clamp(min=0)))
        valid = kept <= num_acc[:, None]
        return self._update(heads, x, tokens[:, :keep], next_pos[:, None] + kept, valid, slots,
                            num_acc, next_pos + num_acc + 1)
