"""One forward pass over a text window plus branch tokens that each see only their own prefix.

Numerical marginalization needs, for many positions ``t`` and candidate intermediate tokens ``v``,
the model's distribution ``p(. | x_{<=t}, v)`` (and for ``t + 3`` the same after two candidate
tokens). Instead of one forward pass per candidate, the candidates are appended to the window as
*nodes* of small trees and the model runs once with a tree attention mask: a node attached at
position ``t`` attends to the text positions ``0..t``, to its ancestor nodes and to itself, and
sits at position id ``t + depth``.
"""

from __future__ import annotations

import torch

__all__ = ["node_positions", "branch_mask", "forward_with_nodes"]


def node_positions(attach: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ancestor-or-self matrix ``[C, C]`` (bool) and depths ``[C]`` (1 for a node hanging off the
    text) of nodes given by ``attach[C]`` (text position) and ``parent[C]`` (-1, or an earlier
    node attached at the same position)."""
    C = attach.numel()
    if parent.shape != attach.shape:
        raise ValueError(f"parent must have shape {list(attach.shape)}, got {list(parent.shape)}")
    idx = torch.arange(C)
    if C and (bool((parent >= idx).any()) or bool((parent < -1).any())):
        raise ValueError("parent[i] must be -1 or an earlier node (< i)")
    has = parent >= 0
    if bool((attach[parent.clamp(min=0)][has] != attach[has]).any()):
        raise ValueError("a node must be attached at the same text position as its parent")
    anc = torch.eye(C, dtype=torch.bool)
    depth = torch.ones(C, dtype=torch.long)
    cur = parent.clone()
    while bool((cur >= 0).any()):
        rows = (cur >= 0).nonzero().flatten()
        anc[rows, cur[rows]] = True
        depth[rows] += 1
        cur[rows] = parent[cur[rows]]
    return anc, depth


def branch_mask(L: int, attach: torch.Tensor, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean attention mask ``[L + C, L + C]`` (True: may attend) and position ids ``[L + C]``
    for ``L`` causal text tokens followed by ``C`` nodes (see :func:`node_positions`)."""
    if attach.numel() and (int(attach.min()) < 0 or int(attach.max()) >= L):
        raise ValueError(f"attach positions must lie in [0, {L}), got {attach.min()}..{attach.max()}")
    anc, depth = node_positions(attach, parent)
    C = attach.numel()
    allowed = torch.zeros(L + C, L + C, dtype=torch.bool)
    allowed[:L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    allowed[L:, :L] = torch.arange(L)[None, :] <= attach[:, None]
    allowed[L:, L:] = anc
    pos = torch.cat([torch.arange(L), attach + depth])
    return allowed, pos


def _attention_mask(model, allowed: torch.Tensor, dtype: torch.dtype, span: int):
    """The additive 4D mask, as a per-layer-type dict for models with sliding-window layers (all
    positions here lie within one window, which is checked)."""
    neg = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, neg)[None, None]
    types = set(getattr(model.config, "layer_types", None) or [])
    if "sliding_attention" in types:
        window = getattr(model.config, "sliding_window", None)
        if window is not None and span >= window:
            raise ValueError(
                f"window plus branch depth ({span} positions) must be shorter than the model's "
                f"sliding window ({window}); use a shorter seq_len"
            )
        return {t: mask for t in types}
    return mask


@torch.inference_mode()
def forward_with_nodes(
    model,
    ids: torch.Tensor,
    attach: torch.Tensor,
    parent: torch.Tensor,
    tokens: torch.Tensor,
    output_hidden_states: bool = False,
):
    """Runs ``model`` once over ``ids[L]`` followed by ``C`` nodes.

    Args:
        model: a transformers causal LM that accepts a 4D attention mask and ``position_ids``.
        ids: ``[L]`` int64 text tokens.
        attach: ``[C]`` int64, the text position each node hangs off (its tree's root prefix).
        parent: ``[C]`` int64, -1 or the index of the node's parent node (an earlier node).
        tokens: ``[C]`` int64, the nodes' tokens.
    Returns:
        the model output: ``logits[1, L + C, V]`` (rows ``L + i`` are node ``i``'s next-token
        logits, rows ``t < L`` the text's own); hidden states when asked.
    """
    if ids.dim() != 1 or tokens.shape != attach.shape:
        raise ValueError(
            f"ids must be [L] and tokens [C] like attach, got {list(ids.shape)}, "
            f"{list(tokens.shape)}, {list(attach.shape)}"
        )
    L = ids.numel()
    allowed, pos = branch_mask(L, attach.cpu(), parent.cpu())
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    span = int(pos.max()) + 1 if pos.numel() else 0
    mask = _attention_mask(model, allowed, dtype, span)
    if isinstance(mask, dict):
        mask = {k: v.to(device) for k, v in mask.items()}
    else:
        mask = mask.to(device)
    x = torch.cat([ids, tokens]).to(device)[None]
    return model(
        input_ids=x,
        attention_mask=mask,
        position_ids=pos.to(device)[None],
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
