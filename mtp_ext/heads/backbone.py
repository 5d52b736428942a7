"""What the heads take from a transformers causal LM: its name, its output layer, final norm and
input embedding (shared with the heads, never copied)."""

from __future__ import annotations

__all__ = ["model_name", "backbone_parts"]


def model_name(model) -> str:
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", ""
    )
    return str(name or "")


def backbone_parts(model):
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
