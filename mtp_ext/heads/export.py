"""Export ``"eagle"`` heads as the drafter checkpoints vLLM and SGLang load, and read them back.

Three formats, one folder each (``config.json`` + ``model.safetensors``; a token map beside them
for SGLang's EAGLE with a draft vocabulary):

- ``"vllm-eagle"``: EAGLE-1 heads (``config.fuse_layers`` None) for vLLM's
  ``EagleLlamaForCausalLM`` (``--speculative-config '{"method": "eagle", ...}'``).
- ``"sglang-eagle"``: EAGLE-1 heads for SGLang's ``LlamaForCausalLMEagle``
  (``--speculative-algorithm EAGLE``).
- ``"eagle3"``: EAGLE-3 heads (``config.fuse_layers``, three layers) in the layout of the
  EAGLE-3 checkpoints, which both vLLM's ``Eagle3LlamaForCausalLM`` and SGLang's
  ``LlamaForCausalLMEagle3`` load (``"method": "eagle3"`` / ``--speculative-algorithm EAGLE3``).

Why EAGLE-1 needs two formats: the engines' loaders differ. vLLM's drafter ``fc`` has no bias
and its loader takes the names it has only (an ``fc.bias`` fails the load, or is dropped,
depending on the version), and vLLM maps the architecture ``"LlamaForCausalLM"`` or
``"EagleLlamaForCausalLM"`` to its drafter, while SGLang's ``fc`` always has a bias (its loader
skips what a checkpoint lacks, so an absent bias would keep its initial values: zeros are
written) and SGLang dispatches on ``"LlamaForCausalLMEagle"``. vLLM's EAGLE-1 drafter shares the target's whole output layer, so
heads with a draft vocabulary export to SGLang only (its ``--speculative-token-map``, EAGLE's
"FR-Spec" hot tokens); EAGLE-3 carries its draft vocabulary in the checkpoint (``d2t``, ``t2d``,
``lm_head.weight [N, D]``).

Sources (read for this module; the engines' names and conventions, not their code):

- vLLM (``vllm-project/vllm``): ``vllm/model_executor/models/llama_eagle.py`` (commits
  ``e1c4a55`` and ``00da923``), ``vllm/model_executor/models/llama_eagle3.py`` (commit
  ``00bd149``), ``vllm/transformers_utils/configs/eagle.py`` (``EAGLEConfig``: the architecture
  mapping ``X -> EagleX`` / ``Eagle3X``; names starting with ``Eagle`` or ending in ``Eagle3``
  are kept),
  ``vllm/model_executor/models/registry.py`` (``_SPECULATIVE_DECODING_MODELS``: both
  ``Eagle3LlamaForCausalLM`` and ``LlamaForCausalLMEagle3`` load ``llama_eagle3``),
  ``vllm/v1/worker/gpu_model_runner.py`` (``_get_eagle3_aux_layers_from_config``: the top-level
  ``eagle_aux_hidden_state_layer_ids`` first, then ``eagle_config[...]``) and
  ``vllm/model_executor/models/llama.py`` (the target appends ``hidden_states + residual`` *before*
  decoder layer ``i`` when ``i`` is an aux layer id: id ``i`` is transformers'
  ``hidden_states[i]``).
- SGLang (``sgl-project/sglang``): ``python/sglang/srt/models/llama_eagle.py`` (commit
  ``034b3be``), ``python/sglang/srt/models/llama_eagle3.py`` (commit ``03d5a77``),
  ``python/sglang/srt/speculative/eagle_worker.py`` (commit ``00559ea``: EAGLE shares the target's
  embedding and output layer, restricted to the token map's rows; EAGLE-3 shares the embedding and
  keeps its own ``lm_head``), ``python/sglang/srt/speculative/spec_utils.py`` (``load_token_map``:
  ``torch.load(path, weights_only=True)`` of the hot token ids),
  ``python/sglang/srt/models/llama.py``
  (``set_eagle3_layers_to_capture``: ids from the draft config's
  ``eagle_config["eagle_aux_hidden_state_layer_ids"]`` are captured at ``id + 1``, i.e. id ``j``
  is the output of decoder layer ``j``, transformers' ``hidden_states[j + 1]``; the default
  ``[2, L // 2, L - 3]`` is used as is) and ``python/sglang/srt/model_executor/model_runner.py``.

Conventions checked against :mod:`mtp_ext.heads.eagle`: EAGLE-1 reads the backbone's last hidden
state after its final norm, ``fc`` takes ``[embedding; feature]``, the layer has no input norm and
its output (the residual sum) meets the output layer with no norm; EAGLE-3's residual stream starts
at ``fc``'s output before ``hidden_norm`` (vLLM's default ``norm_before_residual: false``, SGLang's
only behaviour), its output goes through the final norm (``norm.weight``, a copy of the
backbone's) and ``lm_head.weight`` (the backbone's rows ``vocab_ids``); deeper draft steps feed
the layer's output back without ``fc``, as both engines do.

EAGLE-3 fused layers: both engines concatenate the captured states in increasing layer order and
the fused width is ``3 D``, so the export takes exactly three layers, strictly inside the stack
(``1 <= i <= L - 1``: the embeddings and the final, normed state are not captured), and reorders
``fc``'s column blocks when ``fuse_layers`` is not increasing. The layer ids differ by one between
the engines, so ``config.json`` carries both: the top-level ``eagle_aux_hidden_state_layer_ids``
(vLLM's convention, read first by vLLM) equal to ``fuse_layers``, and
``eagle_config.eagle_aux_hidden_state_layer_ids`` (SGLang's, the only one SGLang reads) equal to
``fuse_layers - 1``.

Each folder's ``config.json`` also records the heads' own settings under ``"mtp_ext_heads"``
(ignored by the engines), so that :func:`import_heads` restores them exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, NamedTuple

import torch

__all__ = [
    "FORMATS", "TABLES", "VLLM_EAGLE", "SGLANG_EAGLE", "EAGLE3", "Dims", "Entry",
    "CONFIG_FILE", "WEIGHTS_FILE", "TOKEN_MAP_FILE", "METADATA_KEY",
    "model_dims", "expected_tensors", "export_heads", "import_heads", "detect_format",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# SGLang's EAGLE (not EAGLE-3) draft vocabulary: a torch file of the hot token ids, passed as
# --speculative-token-map (sglang spec_utils.load_token_map).
TOKEN_MAP_FILE = "hot_token_map.pt"
# The heads' own settings inside config.json (the engines keep unknown keys as attributes).
METADATA_KEY = "mtp_ext_heads"


@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes the tables' shapes are functions of.

    Attributes:
        D: hidden size; ``n_heads`` / ``n_kv`` attention and key/value heads; ``head_dim``;
        inter: the MLP's intermediate size; ``vocab`` the backbone's ``V``; ``draft_vocab``:
        ``N`` (``V`` without a draft vocabulary).
    """

    D: int
    n_heads: int
    n_kv: int
    head_dim: int
    inter: int
    vocab: int
    draft_vocab: int


class Entry(NamedTuple):
    """Where one of our tensors goes: ``name`` in the engine's checkpoint, ``shape(dims)``, its
    ``dtype`` (None: the heads' parameter dtype) and the ``file`` holding it."""

    name: str
    shape: Callable[[Dims], tuple]
    dtype: torch.dtype | None = None
    file: str = WEIGHTS_FILE


def _layer(prefix: str, eagle3: bool) -> dict:
    """The decoder layer's entries, ours ``layer.*`` -> theirs ``{prefix}*``."""
    a = 2 if eagle3 else 1  # the attention reads [embedding; feature] in EAGLE-3
    t = {
        "layer.self_attn.q_proj.weight": Entry(
            prefix + "self_attn.q_proj.weight", lambda d: (d.n_heads * d.head_dim, a * d.D)),
        "layer.self_attn.k_proj.weight": Entry(
            prefix + "self_attn.k_proj.weight", lambda d: (d.n_kv * d.head_dim, a * d.D)),
        "layer.self_attn.v_proj.weight": Entry(
            prefix + "self_attn.v_proj.weight", lambda d: (d.n_kv * d.head_dim, a * d.D)),
        "layer.self_attn.o_proj.weight": Entry(
            prefix + "self_attn.o_proj.weight", lambda d: (d.D, d.n_heads * d.head_dim)),
        "layer.post_attention_layernorm.weight": Entry(
            prefix + "post_attention_layernorm.weight", lambda d: (d.D,)),
        "layer.mlp.gate_proj.weight": Entry(
            prefix + "mlp.gate_proj.weight", lambda d: (d.inter, d.D)),
        "layer.mlp.up_proj.weight": Entry(prefix + "mlp.up_proj.weight", lambda d: (d.inter, d.D)),
        "layer.mlp.down_proj.weight": Entry(
            prefix + "mlp.down_proj.weight", lambda d: (d.D, d.inter)),
    }
    if eagle3:
        t["layer.input_layernorm.weight"] = Entry(
            prefix + "input_layernorm.weight", lambda d: (d.D,))
        t["layer.hidden_norm.weight"] = Entry(prefix + "hidden_norm.weight", lambda d: (d.D,))
    return t


# vLLM EagleLlamaForCausalLM (vllm/model_executor/models/llama_eagle.py, commits e1c4a55 and
# 00da923): fc = Linear(2D, D, bias=False) over cat(embed_tokens(ids), hidden); layers.0 is
# vLLM's LlamaDecoderLayer with input_layernorm replaced by Identity (no weight to load); the
# output is hidden + residual, no norm. Names are loaded with a "model." prefix, q/k/v and
# gate/up stacked into qkv_proj / gate_up_proj. Not in the checkpoint: embed_tokens (skipped by
# the loader without pipeline parallelism: the target's is shared) and lm_head (the class has
# none: the target's is shared, the whole vocabulary). fc.bias: no parameter to load into.
VLLM_EAGLE: dict[str, Entry] = {
    "fc.weight": Entry("fc.weight", lambda d: (d.D, 2 * d.D)),
    **_layer("layers.0.", eagle3=False),
}

# SGLang LlamaForCausalLMEagle (python/sglang/srt/models/llama_eagle.py, commit 034b3be):
# fc = torch.nn.Linear(2D, D) (bias always), layers.0 = SGLang's LlamaDecoderLayer with
# input_layernorm deleted for layer 0; output hidden + residual, no norm; weights loaded with a
# "model." prefix by LlamaForCausalLM.load_weights, lm_head.* skipped. The eagle worker
# (speculative/eagle_worker.py, commit 00559ea) replaces embed_tokens and lm_head by the target's
# (lm_head restricted to the --speculative-token-map rows: our vocab_ids, written as a torch file).
SGLANG_EAGLE: dict[str, Entry] = {
    "fc.weight": Entry("fc.weight", lambda d: (d.D, 2 * d.D)),
    "fc.bias": Entry("fc.bias", lambda d: (d.D,)),  # zeros when the heads have none
    **_layer("layers.0.", eagle3=False),
    "vocab_ids": Entry("hot_token_ids", lambda d: (d.draft_vocab,), torch.int64, TOKEN_MAP_FILE),
}

# EAGLE-3 checkpoints: vLLM Eagle3LlamaForCausalLM (vllm/model_executor/models/llama_eagle3.py,
# commit 00bd149: "midlayer." renamed "layers.0.", d2t loaded as draft_id_to_target_id, t2d
# skipped, fc = ReplicatedLinear(3 * target_hidden_size, D, bias=False), norm, lm_head
# [draft_vocab_size, D]; embed_tokens shared with the target when absent) and SGLang
# LlamaForCausalLMEagle3 (python/sglang/srt/models/llama_eagle3.py, commit 03d5a77: midlayer.*,
# d2t -> hot_token_id = d2t + arange(N), t2d skipped, fc bias = config "bias" (default False;
# "bias" would also give o_proj a bias in SGLang's attention, so it is never set), lm_head
# [draft_vocab_size, D] unless tie_word_embeddings; the eagle worker shares the embedding only).
# The pseudo-keys on the left name what the tensor is made of: the backbone's final norm weight
# and output rows (frozen copies, not in our state dict), and our vocab_ids as offsets and mask.
EAGLE3: dict[str, Entry] = {
    "fc.weight": Entry("fc.weight", lambda d: (d.D, 3 * d.D)),
    **_layer("midlayer.", eagle3=True),
    "norm_weight": Entry("norm.weight", lambda d: (d.D,)),
    "lm_head_weight[vocab_ids]": Entry("lm_head.weight", lambda d: (d.draft_vocab, d.D)),
    "vocab_ids -> d2t": Entry("d2t", lambda d: (d.draft_vocab,), torch.int64),  # target - index
    "vocab_ids -> t2d": Entry("t2d", lambda d: (d.vocab,), torch.bool),  # target in draft vocab
}


@dataclasses.dataclass(frozen=True)
class _Format:
    layout: str  # "eagle1" or "eagle3"
    architectures: tuple[str, ...]
    table: dict
    fc_bias: str  # "none": refused unless zero (then dropped); "always": written (zeros if none)
    draft_vocab: str  # "refused", "token_map" or "d2t"


FORMATS: dict[str, _Format] = {
    # vLLM keeps an architecture starting with "Eagle" and registers EagleLlamaForCausalLM.
    "vllm-eagle": _Format("eagle1", ("EagleLlamaForCausalLM",), VLLM_EAGLE, "none", "refused"),
    # SGLang's model registry: EntryClass = [LlamaForCausalLMEagle].
    "sglang-eagle": _Format("eagle1", ("LlamaForCausalLMEagle",), SGLANG_EAGLE, "always",
                            "token_map"),
    # Both: vLLM's registry maps LlamaForCausalLMEagle3 to llama_eagle3, SGLang's EntryClass.
    "eagle3": _Format("eagle3", ("LlamaForCausalLMEagle3",), EAGLE3, "none", "d2t"),
}

TABLES: dict[str, dict[str, Entry]] = {name: f.table for name, f in FORMATS.items()}

# The EAGLE-3 table's pseudo-keys: tensors made from the backbone or from vocab_ids, not state keys.
_DERIVED = frozenset({"norm_weight", "lm_head_weight[vocab_ids]", "vocab_ids -> d2t",
                      "vocab_ids -> t2d"})


def _format(name: str) -> _Format:
    if name not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {name!r}")
    return FORMATS[name]


def _get(cfg, name: str, default=None):
    value = getattr(cfg, name, None)
    return default if value is None else value


def model_dims(model, draft_vocab: int | None = None) -> Dims:
    """The :class:`Dims` of a transformers causal LM's config (``draft_vocab``: ``N``, default
    ``V``). Raises ValueError naming a missing size."""
    cfg = getattr(model, "config", model)
    need = {}
    for key in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        value = getattr(cfg, key, None)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"the backbone's config has no usable {key} (got {value!r})")
        need[key] = value
    D, nH = need["hidden_size"], need["num_attention_heads"]
    return Dims(
        D=D, n_heads=nH, n_kv=int(_get(cfg, "num_key_value_heads", nH)),
        head_dim=int(_get(cfg, "head_dim", D // nH)), inter=need["intermediate_size"],
        vocab=need["vocab_size"], draft_vocab=int(draft_vocab or need["vocab_size"]),
    )


def expected_tensors(format: str, dims: Dims) -> dict[str, tuple]:
    """``{name: shape}`` of what :func:`export_heads` writes to ``model.safetensors`` in ``format``
    (``fc.bias`` only for SGLang's EAGLE, which always has one)."""
    fmt = _format(format)
    return {e.name: tuple(e.shape(dims)) for e in fmt.table.values() if e.file == WEIGHTS_FILE}


# ----------------------------------------------------------------------------------------------
# config.json
# ----------------------------------------------------------------------------------------------


def _rope(cfg) -> dict:
    """``rope_theta`` / ``rope_scaling`` (transformers 4 names, which the engines read) and
    ``rope_parameters`` (transformers 5) of the backbone's config."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params:
        params = dict(params)
        theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") == "default" and len(scaling) <= 1:
            scaling = None
        return {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": params}
    return {"rope_theta": _get(cfg, "rope_theta", 10000.0),
            "rope_scaling": getattr(cfg, "rope_scaling", None)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _llama_config(model, dims: Dims, architectures, dtype: torch.dtype) -> dict:
    """The one-layer Llama config the engines build the drafter from (sizes of the backbone)."""
    cfg = model.config
    out = {
        "architectures": list(architectures),
        "model_type": "llama",
        "hidden_size": dims.D,
        "intermediate_size": dims.inter,
        "num_attention_heads": dims.n_heads,
        "num_key_value_heads": dims.n_kv,
        "head_dim": dims.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": _get(cfg, "hidden_act", "silu"),
        "rms_norm_eps": float(_get(cfg, "rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(_get(cfg, "max_position_embeddings", 2048)),
        **_rope(cfg),
        "vocab_size": dims.vocab,
        # SGLang ties lm_head to embed_tokens when set, which would break both the token map
        # (EAGLE) and EAGLE-3's own lm_head; the drafter never ties.
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "eos_token_id": getattr(cfg, "eos_token_id", None),
        "pad_token_id": getattr(cfg, "pad_token_id", None),
        "torch_dtype": _dtype_name(dtype),
    }
    return out


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _check_heads(heads, model, fmt_name: str, fmt: _Format):
    """Raises ValueError when ``heads`` cannot be exported as ``fmt``; returns ``(dims, state)``."""
    cfg = getattr(heads, "config", None)
    kind = getattr(cfg, "kind", None)
    if kind != "eagle":
        raise ValueError(f"only eagle heads export to the engines' drafter formats; these heads "
                         f"are kind={kind!r}")
    layout = "eagle3" if cfg.fuse_layers is not None else "eagle1"
    if layout != fmt.layout:
        want = "EAGLE-3 heads (fuse_layers set)" if fmt.layout == "eagle3" else \
            "EAGLE-1 heads (fuse_layers None)"
        other = "'eagle3'" if layout == "eagle3" else "'vllm-eagle' or 'sglang-eagle'"
        this = "EAGLE-3" if layout == "eagle3" else "EAGLE-1"
        raise ValueError(f"format {fmt_name!r} takes {want}; these heads are {this}: "
                         f"export them as {other}")
    dims = model_dims(model, cfg.draft_vocab_size)
    if (cfg.hidden_size, cfg.vocab_size) != (dims.D, dims.vocab):
        raise ValueError(f"these heads were built for hidden_size={cfg.hidden_size}, "
                         f"vocab_size={cfg.vocab_size}; the model has {dims.D}, {dims.vocab}")
    L = cfg.num_layers or getattr(model.config, "num_hidden_layers", None)
    if layout == "eagle3":
        fused = list(cfg.fuse_layers)
        if len(fused) != 3:
            raise ValueError(f"EAGLE-3 drafters in vLLM and SGLang fuse exactly 3 hidden states "
                             f"(fc is [D, 3D]); these heads fuse {len(fused)}: {fused}")
        if L is None or any(not 1 <= i <= L - 1 for i in fused):
            raise ValueError(f"the engines capture hidden_states[i] for 1 <= i <= L - 1 only "
                             f"(the input of decoder layer i; L={L}); fuse_layers={fused}")
        if heads.norm_weight is None:
            raise ValueError("EAGLE-3 export needs the backbone's final norm weight (norm.weight)")
    if cfg.draft_vocab_size is not None and fmt.draft_vocab == "refused":
        raise ValueError(
            f"vLLM's EAGLE-1 drafter (EagleLlamaForCausalLM) shares the target's whole output "
            f"layer; these heads draft over draft_vocab_size={cfg.draft_vocab_size} tokens: "
            f"export them as 'sglang-eagle' (token map) or train heads without a draft vocabulary")
    state = {k: v.detach() for k, v in heads.state_dict().items()}
    expected = set(fmt.table) - _DERIVED - {"fc.bias", "vocab_ids"}
    if cfg.fc_bias:
        expected.add("fc.bias")
    if cfg.draft_vocab_size is not None:
        expected.add("vocab_ids")
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"the heads' state dict does not have the {layout} layout: "
                         f"missing {missing}, unexpected {unexpected}")
    for key, entry in fmt.table.items():
        if key in state and key != "vocab_ids":
            shape = _our_shape(key, entry, dims, cfg)
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key} has shape {list(state[key].shape)}, the format wants "
                                 f"{list(shape)} (from the backbone's config)")
    bias = state.get("fc.bias")
    if bias is not None and fmt.fc_bias == "none" and bool(bias.ne(0).any()):
        engine = "vLLM's EAGLE-1 drafter" if fmt_name == "vllm-eagle" else \
            "the EAGLE-3 drafters (vLLM: no fc bias; SGLang: only with config 'bias', which also " \
            "biases o_proj)"
        raise ValueError(f"these heads have a nonzero fc.bias, which {engine} cannot load; "
                         + ("export them as 'sglang-eagle' or " if fmt_name == "vllm-eagle" else "")
                         + "train them with fc_bias=False")
    return dims, state


def _our_shape(key: str, entry: Entry, dims: Dims, cfg) -> tuple:
    """The shape our tensor ``key`` has (the table's shape, except the EAGLE-3 ``fc`` fusing
    ``len(fuse_layers)`` states)."""
    shape = tuple(entry.shape(dims))
    if key == "fc.weight" and cfg.fuse_layers is not None:
        return (dims.D, len(cfg.fuse_layers) * dims.D)
    return shape


def _fused_order(fused: list[int]) -> list[int]:
    """Positions of ``fused`` in increasing layer order (the order the engines concatenate)."""
    return sorted(range(len(fused)), key=lambda i: fused[i])


def export_heads(heads, model, directory: str | os.PathLike, format: str) -> dict:
    """Write ``heads`` as a drafter checkpoint that vLLM or SGLang loads.

    Args:
        heads: :class:`~mtp_ext.heads.eagle.EagleHeads` (``kind="eagle"``): EAGLE-1 heads
            (``fuse_layers`` None) for ``"vllm-eagle"`` / ``"sglang-eagle"``, EAGLE-3 heads
            (three ``fuse_layers``) for ``"eagle3"``.
        model: the backbone (a transformers Llama causal LM) the heads were built on: its config
            gives the drafter's sizes, rotary settings and token ids.
        directory: output folder (created; files of the same names are replaced).
        format: ``"vllm-eagle"``, ``"sglang-eagle"`` or ``"eagle3"``.
    Returns:
        ``{"format", "directory", "files": [names written], "tensors": {name: shape},
        "config": the config.json dict}``.
    Writes:
        ``config.json`` (a one-layer Llama config: ``architectures`` of the format, the backbone's
        sizes, ``num_hidden_layers: 1``, ``tie_word_embeddings: false``; ``eagle3`` adds
        ``draft_vocab_size``, ``target_hidden_size`` and the fused layer ids; ``"mtp_ext_heads"``
        the heads' own settings); ``model.safetensors`` (the tensors of :data:`TABLES` in the
        heads' parameter dtype; ``d2t`` int64 ``[N]`` = target id - draft index, ``t2d`` bool
        ``[V]``); ``hot_token_map.pt`` (``"sglang-eagle"`` with a draft vocabulary: the ``N``
        token ids, a list of ints).
    Raises:
        ValueError: unknown format; heads of another kind or layout than the format takes; a
            nonzero ``fc.bias`` where the engine's drafter has none; a draft vocabulary for
            ``"vllm-eagle"``; EAGLE-3 heads fusing other than three layers strictly inside the
            stack; heads whose sizes do not match ``model``.
    """
    from safetensors.torch import save_file

    fmt = _format(format)
    dims, state = _check_heads(heads, model, format, fmt)
    cfg = heads.config
    dtype = heads.param_dtype
    vocab_ids = heads.vocab_ids
    N = dims.draft_vocab
    tensors: dict[str, torch.Tensor] = {}
    for key, entry in fmt.table.items():
        if entry.file != WEIGHTS_FILE:
            continue
        if key in state:
            t = state[key]
        elif key == "fc.bias":  # SGLang's fc always has a bias
            t = torch.zeros(dims.D, dtype=dtype, device=state["fc.weight"].device)
        elif key == "norm_weight":
            t = heads.norm_weight
        elif key == "lm_head_weight[vocab_ids]":
            t = heads.lm_head_weight if vocab_ids is None else heads.lm_head_weight[vocab_ids]
        elif key == "vocab_ids -> d2t":
            ids = _ids(vocab_ids, N, state["fc.weight"].device)
            t = ids - torch.arange(N, device=ids.device)
        elif key == "vocab_ids -> t2d":
            ids = _ids(vocab_ids, N, state["fc.weight"].device)
            t = torch.zeros(dims.vocab, dtype=torch.bool, device=ids.device)
            t[ids] = True
        else:  # pragma: no cover - the tables and _check_heads agree
            raise AssertionError(key)
        t = t.detach().to(entry.dtype or dtype)
        if key == "fc.weight" and cfg.fuse_layers is not None:
            D = dims.D
            blocks = [t[:, i * D:(i + 1) * D] for i in _fused_order(cfg.fuse_layers)]
            t = torch.cat(blocks, 1)
        shape = tuple(entry.shape(dims))
        if tuple(t.shape) != shape:  # pragma: no cover - checked in _check_heads
            raise AssertionError(f"{entry.name}: {list(t.shape)} != {list(shape)}")
        tensors[entry.name] = t.contiguous().cpu()

    config = _llama_config(model, dims, fmt.architectures, dtype)
    if fmt.layout == "eagle3":
        fused = sorted(cfg.fuse_layers)
        config.update({
            "draft_vocab_size": N,
            "target_hidden_size": dims.D,
            "norm_before_residual": False,
            "eagle_aux_hidden_state_layer_ids": fused,  # vLLM: hidden_states[i]
            "eagle_config": {
                "use_aux_hidden_state": True,
                "eagle_aux_hidden_state_layer_ids": [i - 1 for i in fused],  # SGLang: i + 1
            },
        })
    config[METADATA_KEY] = {
        "format": format,
        "num_heads": cfg.num_heads,
        "fuse_layers": cfg.fuse_layers,
        "fc_bias": cfg.fc_bias,
        "draft_vocab_size": cfg.draft_vocab_size,
        "backbone": cfg.backbone,
        "num_layers": cfg.num_layers,
        "rms_norm_eps": cfg.rms_norm_eps,
    }

    os.makedirs(directory, exist_ok=True)
    files = [CONFIG_FILE, WEIGHTS_FILE]
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    token_map = os.path.join(directory, TOKEN_MAP_FILE)
    if fmt.draft_vocab == "token_map" and vocab_ids is not None:
        # A list of ints: sglang's load_token_map wraps what it loads in torch.tensor(...).
        torch.save([int(i) for i in vocab_ids.tolist()], token_map)
        files.append(TOKEN_MAP_FILE)
    elif os.path.exists(token_map):
        os.remove(token_map)  # a stale map would restrict the drafter's vocabulary
    return {"format": format, "directory": str(directory), "files": files,
            "tensors": {k: tuple(v.shape) for k, v in tensors.items()}, "config": config}


def _ids(vocab_ids, N: int, device) -> torch.Tensor:
    if vocab_ids is None:
        return torch.arange(N, device=device)
    return vocab_ids.detach().to(torch.int64)


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------


def detect_format(config: dict) -> str:
    """The format of an exported ``config.json`` dict: from ``"mtp_ext_heads"``, else from
    ``architectures``. Raises ValueError when it is none of :data:`FORMATS`."""
    meta = config.get(METADATA_KEY)
    if isinstance(meta, dict) and meta.get("format") in FORMATS:
        return meta["format"]
    arch = list(config.get("architectures") or [])
    for name, fmt in FORMATS.items():
        if arch and arch[0] in fmt.architectures:
            return name
    if arch and arch[0] in ("Eagle3LlamaForCausalLM",):
        return "eagle3"
    raise ValueError(f"architectures {arch} is none of the exported drafter formats "
                     f"({', '.join(a for f in FORMATS.values() for a in f.architectures)})")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    tol = 1e-6 if a.dtype == torch.float32 else 1e-2
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


def import_heads(directory: str | os.PathLike, model, dtype: torch.dtype | None = None,
                 num_heads: int | None = None):
    """Read a folder written by :func:`export_heads` (or an engine checkpoint of the same
    layout) back into :class:`~mtp_ext.heads.eagle.EagleHeads` on ``model``.

    Args:
        directory: the folder (``config.json``, ``model.safetensors``, and for SGLang's EAGLE with
            a draft vocabulary ``hot_token_map.pt``).
        model: the backbone (a transformers Llama causal LM) to bind the heads to.
        dtype: the heads' parameter dtype (default: the checkpoint's ``fc.weight`` dtype).
        num_heads: the drafting depth ``H`` (default: the recorded one, else 3; the checkpoints
            hold one layer shared by every depth).
    Returns:
        ``EagleHeads`` whose parameters equal the exported ones (the EAGLE-3 ``fc`` columns back in
        the recorded ``fuse_layers`` order; a zero ``fc.bias`` kept only when recorded).
    Raises:
        ValueError: an unknown format, sizes that differ from ``model``'s, missing or mis-shaped
            tensors, an ``lm_head.weight`` / ``norm.weight`` that is not the backbone's (EAGLE-3:
            these heads use the backbone's frozen output rows and final norm), inconsistent
            ``d2t`` / ``t2d``.
    """
    from safetensors.torch import load_file

    from .backbone import backbone_parts, model_name
    from .base import MTPHeads
    from .config import MTPHeadsConfig
    from .registry import kind_class

    with open(os.path.join(directory, CONFIG_FILE)) as f:
        config = json.load(f)
    name = detect_format(config)
    fmt = FORMATS[name]
    meta = config.get(METADATA_KEY) if isinstance(config.get(METADATA_KEY), dict) else {}
    lm_head, norm_w, eps, embed = backbone_parts(model)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    dims0 = model_dims(model)
    for key, want in (("hidden_size", dims0.D), ("intermediate_size", dims0.inter),
                      ("num_attention_heads", dims0.n_heads),
                      ("num_key_value_heads", dims0.n_kv), ("head_dim", dims0.head_dim),
                      ("vocab_size", dims0.vocab)):
        got = config.get(key)
        if got is not None and got != want:
            raise ValueError(f"{str(directory)!r} holds a drafter with {key}={got}, but the model "
                             f"has {key}={want}")
    state = load_file(os.path.join(directory, WEIGHTS_FILE))
    state.pop("embed_tokens.weight", None)  # engine checkpoints may carry the target's copy
    if dtype is None:
        dtype = state["fc.weight"].dtype if "fc.weight" in state else lm_head.dtype

    vocab_ids = None
    N = None
    if fmt.draft_vocab == "d2t":
        if "d2t" not in state:
            raise ValueError(f"{str(directory)!r}: an EAGLE-3 checkpoint needs d2t")
        d2t = state["d2t"].to(torch.int64)
        N = d2t.numel()
        ids = d2t + torch.arange(N)
        if "t2d" in state:
            t2d = state["t2d"].to(torch.bool)
            mask = torch.zeros(dims0.vocab, dtype=torch.bool)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= dims0.vocab):
                raise ValueError(f"{str(directory)!r}: d2t maps outside the vocabulary")
            mask[ids] = True
            if t2d.shape != mask.shape or not torch.equal(t2d, mask):
                raise ValueError(f"{str(directory)!r}: t2d does not mark d2t's target ids")
        # The whole vocabulary in order is no draft vocabulary, unless one was recorded.
        identity = N == dims0.vocab and torch.equal(ids, torch.arange(N))
        vocab_ids = None if identity and meta.get("draft_vocab_size") is None else ids
    elif fmt.draft_vocab == "token_map":
        path = os.path.join(directory, TOKEN_MAP_FILE)
        if os.path.isfile(path):
            vocab_ids = torch.as_tensor(torch.load(path, weights_only=True), dtype=torch.int64)
    draft_vocab_size = None if vocab_ids is None else int(vocab_ids.numel())
    dims = model_dims(model, draft_vocab_size)

    fuse_layers = None
    if fmt.layout == "eagle3":
        fused_sorted = _config_fuse_layers(config, n_layers)
        fuse_layers = meta.get("fuse_layers") or fused_sorted
        if sorted(fuse_layers) != sorted(fused_sorted):
            raise ValueError(f"{str(directory)!r}: recorded fuse_layers {fuse_layers} disagree "
                             f"with the config's layer ids {fused_sorted}")

    ours: dict[str, torch.Tensor] = {}
    bias = None
    for key, entry in fmt.table.items():
        if entry.file != WEIGHTS_FILE:
            continue
        if entry.name not in state:
            if key == "fc.bias":
                continue
            raise ValueError(f"{str(directory)!r}: {WEIGHTS_FILE} has no {entry.name}")
        t = state.pop(entry.name)
        shape = tuple(entry.shape(dims))
        if tuple(t.shape) != shape:
            raise ValueError(f"{str(directory)!r}: {entry.name} has shape {list(t.shape)}, "
                             f"expected {list(shape)}")
        if key == "norm_weight":
            if norm_w is None or not _close(t, norm_w.detach().cpu()):
                raise ValueError(f"{str(directory)!r}: norm.weight is not the backbone's final "
                                 "norm weight (these heads use the backbone's own)")
        elif key == "lm_head_weight[vocab_ids]":
            rows = lm_head.detach().cpu()
            rows = rows if vocab_ids is None else rows[vocab_ids]
            if not _close(t, rows):
                raise ValueError(f"{str(directory)!r}: lm_head.weight is not the backbone's "
                                 "output rows of the draft vocabulary (these heads use the "
                                 "backbone's own)")
        elif key.startswith("vocab_ids"):
            pass
        elif key == "fc.bias":
            bias = t
        else:
            ours[key] = t
    state.pop("d2t", None)
    state.pop("t2d", None)
    if state:
        raise ValueError(f"{str(directory)!r}: {WEIGHTS_FILE} holds tensors this format does not "
                         f"have: {sorted(state)}")

    if fuse_layers is not None and list(fuse_layers) != sorted(fuse_layers):
        D = dims.D
        order = _fused_order(list(fuse_layers))  # file block j is our block order[j]
        w = ours["fc.weight"]
        blocks = [None] * len(order)
        for j, i in enumerate(order):
            blocks[i] = w[:, j * D:(j + 1) * D]
        ours["fc.weight"] = torch.cat(blocks, 1)
    fc_bias = bool(meta.get("fc_bias", bias is not None and bool(bias.ne(0).any())))
    if bias is not None:
        if fc_bias:
            ours["fc.bias"] = bias
        elif bool(bias.ne(0).any()):
            raise ValueError(f"{str(directory)!r}: fc.bias is nonzero but recorded as absent")
    if fc_bias and "fc.bias" not in ours:
        ours["fc.bias"] = torch.zeros(dims.D, dtype=ours["fc.weight"].dtype)

    H = num_heads or meta.get("num_heads") or 3
    cfg = MTPHeadsConfig(
        num_heads=int(H), hidden_size=dims.D, vocab_size=dims.vocab, kind="eagle", layer=-1,
        num_layers=n_layers, draft_vocab_size=draft_vocab_size,
        backbone=meta.get("backbone") or model_name(model),
        rms_norm_eps=float(meta.get("rms_norm_eps", eps)),
        fuse_layers=None if fuse_layers is None else [int(i) for i in fuse_layers],
        fc_bias=fc_bias,
    )
    heads = MTPHeads(cfg, lm_head, norm_w, embed, dtype=dtype,
                     **kind_class("eagle")._backbone_kwargs(model))
    device = lm_head.device
    load = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    if vocab_ids is not None:
        load["vocab_ids"] = vocab_ids.to(device)
    heads.load_state_dict(load, strict=True)
    if vocab_ids is not None:
        heads.set_draft_vocab(vocab_ids.to(device))
    return heads


def _config_fuse_layers(config: dict, n_layers: int | None) -> list[int]:
    """The fused layers (indices into ``hidden_states``, increasing) an EAGLE-3 ``config.json``
    names: vLLM's top-level ids as they are, else SGLang's ``eagle_config`` ids plus one, else
    both engines' default ``[2, L // 2, L - 3]``."""
    top = config.get("eagle_aux_hidden_state_layer_ids")
    if top:
        return sorted(int(i) for i in top)
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:
        return sorted(int(i) + 1 for i in nested)
    if n_layers is None:
        raise ValueError("an EAGLE-3 config without layer ids needs the backbone's layer count")
    from .eagle import default_fuse_layers

    return default_fuse_layers(n_layers)
