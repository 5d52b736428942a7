"""Plain-PyTorch references: the definition of every ``mtp_ext`` op.

Each function here is the specification its C++ and CUDA kernels are tested against. They favour
clarity over speed: full-vocabulary softmaxes, stable sorts and Python loops over trees.

Shared conventions (see the op docstrings in :mod:`mtp_ext.ops`):

* Floating inputs may be float32, float16 or bfloat16; everything is computed in float32.
* Rankings ("top-k", "argmax") order by value descending, ties toward the lower token id, and NaN
  ranks above every number (as ``torch.sort`` does).
* Returned probabilities are float32, returned ids int64, padding is -1.
* A temperature must lie in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``: it and ``1 / temperature`` are
  finite float32 values. Softmaxes are computed as ``softmax((x - max(x)) * (1 / temperature))``,
  which stays finite down to the smallest temperature.
* Sampling (:func:`target_tokens`): the ``+inf`` logits of a row share all its probability
  equally; a row holding a NaN, or only ``-inf``, has no distribution and gives its greedy token.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MIN_TEMPERATURE",
    "MAX_TEMPERATURE",
    "check_temperature",
    "stable_topk",
    "softmax_topk",
    "marginalize",
    "topk_marginalize",
    "fused_mtp_heads",
    "head_features",
    "sampling_probs",
    "filtered_probs",
    "target_tokens",
    "walk_tree",
    "verify_tree",
    "tree_attention_mask",
    "compact_kv",
    "small_batch_linear",
    "verify_tree_from_hidden",
]


# The temperatures whose value and reciprocal are both finite float32 values.
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)
MIN_TEMPERATURE = 1.0 / MAX_TEMPERATURE


def check_temperature(temperature: float, op: str, zero_is_greedy: bool) -> None:
    """Raises ValueError unless ``temperature`` is in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]`` (or 0,
    greedy, when ``zero_is_greedy``), with the message of the ops' check."""
    if zero_is_greedy and temperature == 0:
        return
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        greedy = "0 (greedy) or " if zero_is_greedy else ""
        raise ValueError(
            f"{op}: temperature must be {greedy}in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] "
            f"(it and 1 / temperature finite in float32), got {temperature:g}"
        )


def _scaled_gaps(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(x - max(x)) * (1 / temperature)`` along the last dim: the logits of ``softmax(x /
    temperature)`` shifted so that no finite logit overflows at small temperatures."""
    return (x - x.amax(-1, keepdim=True)) * (1.0 / temperature)


def stable_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` along the last dim, descending, ties toward the lower index, NaN first.

    Args:
        x: ``[..., V]`` any floating dtype.
        k: ``0 <= k <= V``.
    Returns:
        ``(values[..., k], ids[..., k])`` with ``values`` of ``x``'s dtype and int64 ids.
    """
    values, ids = torch.sort(x, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


def softmax_topk(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float32/float16/bfloat16.
        k: ``1 <= k <= V``.
        temperature: in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.
    Returns:
        ``probs[..., k]`` float32 (descending) and ``ids[..., k]`` int64. A row holding a NaN or
        ``+inf``, or only ``-inf``, has NaN probabilities (as ``torch.softmax``).
    """
    check_temperature(temperature, "softmax_topk", zero_is_greedy=False)
    x = logits.float()
    _, ids = stable_topk(x, k)
    probs = torch.softmax(_scaled_gaps(x, temperature), dim=-1)
    return probs.gather(-1, ids), ids


def _normalized_weights(weights: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """``weights[B, L]`` as float32, divided by their row sum when ``renormalize`` (0 if the sum is 0)."""
    w = weights.float()
    if renormalize:
        total = w.sum(-1, keepdim=True)
        w = torch.where(total > 0, w / total, torch.zeros_like(w))
    return w


def marginalize(
    next_logits: torch.Tensor, weights: torch.Tensor, renormalize: bool = True
) -> torch.Tensor:
    """Mixture of next-token distributions: ``q[b] = sum_l w[b, l] * softmax(next_logits[b, l])``.

    Args:
        next_logits: ``[B, L, V]`` float32/float16/bfloat16, the logits after each of ``L``
            intermediate tokens (or paths).
        weights: ``[B, L]`` non-negative, any floating dtype; the intermediate tokens'
            probabilities (or path products).
        renormalize: divide ``weights`` by their row sum first (an all-zero row gives zeros).
    Returns:
        ``probs[B, V]`` float32.
    """
    w = _normalized_weights(weights, renormalize)
    p = torch.softmax(next_logits.float(), dim=-1)
    return (w.unsqueeze(-1) * p).sum(1)


def topk_marginalize(
    next_logits: torch.Tensor, weights: torch.Tensor, m: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``m`` of :func:`marginalize`: ``(probs[B, m] float32, ids[B, m] int64)``."""
    return stable_topk(marginalize(next_logits, weights, renormalize), m)


def head_features(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The features each residual head feeds to the unembedding.

    ``z = x + SiLU(x @ weight[h].T + bias[h])``, then ``RMSNorm(z, eps) * norm_weight`` if given.
    Without ``weight``: one head with ``z = x``, then the RMSNorm if given.

    Args:
        hidden: ``[N, D]``; weight: ``[H, D, D]`` or None; bias: ``[H, D]`` or None (always None
        without weight); norm_weight: ``[D]``.
    Returns:
        ``[N, H, D]`` float32 (``H = 1`` without weight).
    """
    x = hidden.float()
    if weight is None:
        if bias is not None:
            raise ValueError("bias must be None when weight is None")
        return final_norm(x.unsqueeze(1), norm_weight, eps)
    w = weight.float()
    y = torch.einsum("nd,hed->nhe", x, w)
    if bias is not None:
        y = y + bias.float().unsqueeze(0)
    z = x.unsqueeze(1) + torch.nn.functional.silu(y)
    return final_norm(z, norm_weight, eps)


def fused_mtp_heads(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    lm_head: torch.Tensor,
    k: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    vocab_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Medusa-style residual heads through the shared unembedding, top-``k`` per head.

    The straightforward version: a loop over heads, each computing its full ``[N, V]`` logits,
    log-softmax and top-k.

    Args:
        hidden: ``[N, D]``; weight: ``[H, D, D]``, or None for one head without a residual block
        (``z = x``); bias: ``[H, D]`` or None (always None without weight); lm_head: ``[V, D]``;
        k: ``1 <= k <= V``; norm_weight: ``[D]`` or None; eps: RMSNorm epsilon;
        vocab_ids: ``[V]`` int64 or None: the token id of each row of ``lm_head`` (a draft
        vocabulary); the softmax runs over these rows only and returned ids are mapped through it.
    Returns:
        ``logprobs[N, H, k]`` float32 (descending) and ``ids[N, H, k]`` int64 (``H = 1`` without
        weight).
    """
    z = head_features(hidden, weight, bias, norm_weight, eps)
    table = lm_head.float()
    logprobs, ids = [], []
    for h in range(z.shape[1]):
        logits = z[:, h] @ table.T
        _, top = stable_topk(logits, k)
        logprobs.append(torch.log_softmax(logits, dim=-1).gather(-1, top))
        ids.append(top if vocab_ids is None else vocab_ids[top])
    if not logprobs:
        n = hidden.shape[0]
        return hidden.new_zeros((n, 0, k), dtype=torch.float32), hidden.new_zeros(
            (n, 0, k), dtype=torch.long
        )
    return torch.stack(logprobs, 1), torch.stack(ids, 1)


def filtered_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The sampling distribution ``[..., V]`` float32 (sums to 1) of :func:`target_tokens`:
    :func:`sampling_probs`, the ``top_k`` highest-ranked tokens kept (0 keeps all), renormalized,
    then the shortest prefix of the ranking whose mass reaches ``top_p`` (a token is kept when the
    kept mass ranked above it is below ``top_p``), renormalized."""
    check_temperature(temperature, "filtered_probs", zero_is_greedy=False)
    q, _ = _filtered(logits.float(), temperature, top_k, top_p)
    return q / q.sum(-1, keepdim=True)


def sampling_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution ``[..., V]`` float32 sampling draws from before filtering:
    ``softmax(logits / temperature)``, except that in a row holding ``+inf`` the ``+inf`` tokens
    share all the probability equally, and a row with no distribution (a NaN, or only ``-inf``) is
    one-hot on its greedy token (the first NaN, else id 0)."""
    check_temperature(temperature, "sampling_probs", zero_is_greedy=False)
    x = logits.float()
    nan = x.isnan()
    mx = x.masked_fill(nan, -math.inf).amax(-1, keepdim=True)
    gaps = torch.where(
        mx == math.inf,
        torch.where(x == math.inf, 0.0, -math.inf).to(x.dtype),
        _scaled_gaps(x.masked_fill(nan, -math.inf), temperature),
    )
    probs = torch.softmax(gaps, dim=-1)
    none = nan.any(-1, keepdim=True) | (mx == -math.inf)
    greedy = torch.zeros_like(probs).scatter(-1, stable_topk(x, 1)[1], 1.0)
    return torch.where(none, greedy, probs)


def _filtered(x: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Unnormalized kept mass ``q [..., V]`` and the kept mask ``[..., V]``."""
    v = x.shape[-1]
    _, order = torch.sort(x, dim=-1, descending=True, stable=True)
    p_sorted = sampling_probs(x, temperature).gather(-1, order)
    keep = torch.ones_like(p_sorted, dtype=torch.bool)
    if 0 < top_k < v:
        keep[..., top_k:] = False
    if top_p < 1.0:
        pk = p_sorted * keep
        pk = pk / pk.sum(-1, keepdim=True)
        mass_before = torch.cumsum(pk, -1) - pk
        keep &= mass_before < top_p
        keep[..., 0] = True
    q = torch.zeros_like(p_sorted).scatter(-1, order, p_sorted * keep)
    kept = torch.zeros_like(keep).scatter(-1, order, keep)
    return q, kept


def target_tokens(
    target_logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """The target model's token at every node.

    Greedy (``temperature == 0``): the argmax (ties toward the lower id, NaN first).
    Sampling: from :func:`filtered_probs`: walk the kept tokens in ascending id order and return
    the first whose cumulative probability exceeds ``u * total`` (inverse CDF; if rounding leaves
    none, the last kept token). The ``+inf`` logits of a row share all its probability equally; a
    row holding a NaN, or only ``-inf``, gives its greedy token (:func:`sampling_probs`).

    Args:
        target_logits: ``[..., V]`` float32/float16/bfloat16.
        temperature: 0 (greedy) or in ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.
        uniforms: ``[...]`` in ``[0, 1)``, required when ``temperature > 0`` (ValueError
            otherwise); not read when greedy.
    Returns:
        ``[...]`` int64.
    """
    check_temperature(temperature, "verify_tree", zero_is_greedy=True)
    x = target_logits.float()
    if temperature == 0.0:
        return stable_topk(x, 1)[1][..., 0]
    if uniforms is None:
        raise ValueError("verify_tree: uniforms are required when temperature > 0 (got None)")
    bad = ~((uniforms >= 0) & (uniforms < 1))
    if bool(bad.any()):
        at = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"verify_tree: uniforms must be in [0, 1), got {float(uniforms[tuple(at)]):g} at {at}"
        )
    v = x.shape[-1]
    q, kept = _filtered(x, temperature, top_k, top_p)
    cdf = torch.cumsum(q, -1)
    threshold = uniforms.float().unsqueeze(-1) * cdf[..., -1:]
    hit = (cdf > threshold) & kept
    ids = torch.arange(v, device=x.device).expand_as(hit)
    first = torch.where(hit, ids, v).amin(-1)
    last_kept = torch.where(kept, ids, -1).amax(-1)
    return torch.where(first < v, first, last_kept)


def walk_tree(
    draft_tokens: torch.Tensor, parents: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk each tree from the root, following the lowest-index child whose draft equals the target.

    Args:
        draft_tokens: ``[B, T]`` int64; parents: ``[T]`` or ``[B, T]`` int64; targets: ``[B, T]``.
    Returns:
        ``num_accepted[B]``, ``tokens[B, T]``, ``path[B, T]``, int64, padded with -1.
    """
    b, t = draft_tokens.shape
    par = parents.expand(b, t) if parents.dim() == 1 else parents
    num = torch.zeros(b, dtype=torch.long)
    tokens = torch.full((b, t), -1, dtype=torch.long)
    path = torch.full((b, t), -1, dtype=torch.long)
    draft, par, tgt = draft_tokens.cpu().tolist(), par.cpu().tolist(), targets.cpu().tolist()
    for row in range(b):
        node, accepted = 0, 0
        path[row, 0] = 0
        while True:
            nxt = next(
                (c for c in range(node + 1, t) if par[row][c] == node and draft[row][c] == tgt[row][node]),
                None,
            )
            if nxt is None:
                break
            tokens[row, accepted] = draft[row][nxt]
            accepted += 1
            path[row, accepted] = nxt
            node = nxt
        tokens[row, accepted] = tgt[row][node]
        num[row] = accepted
    dev = draft_tokens.device
    return num.to(dev), tokens.to(dev), path.to(dev)


def verify_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tree verification for self-speculative decoding; see :func:`mtp_ext.ops.verify_tree`."""
    targets = target_tokens(target_logits, temperature, top_k, top_p, uniforms)
    return walk_tree(draft_tokens, parents, targets)


def final_norm(
    hidden: torch.Tensor, norm_weight: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """``RMSNorm(hidden, eps) * norm_weight`` in float32 (``hidden`` as float32 when no weight)."""
    x = hidden.float()
    if norm_weight is None:
        return x
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()


def verify_tree_from_hidden(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy :func:`verify_tree` on ``final_norm(hidden) @ lm_head.T`` (float32).

    Args:
        draft_tokens: ``[B, T]`` int64; parents: ``[T]`` or ``[B, T]`` int64;
        hidden: ``[B, T, D]`` the backbone's last hidden states before its final norm;
        lm_head: ``[V, D]``; norm_weight: ``[D]`` or None; eps: RMSNorm epsilon.
    """
    logits = final_norm(hidden, norm_weight, eps) @ lm_head.float().T
    return verify_tree(draft_tokens, parents, logits)


def small_batch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` accumulated in float32, returned in ``x``'s dtype.

    Args:
        x: ``[M, K]``; weight: ``[N, K]``; bias: ``[N]`` or None (any floating dtypes).
    Returns:
        ``[M, N]`` of ``x.dtype``.
    """
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def tree_attention_mask(
    parents: torch.Tensor, prefix_len: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention mask and depths for a tree placed after ``prefix_len`` cached tokens.

    Args:
        parents: ``[T]`` or ``[B, T]`` int64, ``parents[0] = -1``, ``0 <= parents[i] < i``.
        prefix_len: number of tokens already in the cache (all visible to every node).
        dtype: floating dtype of the mask.
    Returns:
        ``mask[..., T, prefix_len + T]`` (0 where node i may attend, ``finfo(dtype).min`` elsewhere:
        the prefix, itself and its ancestors are visible) and ``position_offsets[..., T]`` int64
        (each node's depth; the root has 0).
    """
    par = parents.cpu().tolist()
    rows = [par] if parents.dim() == 1 else par
    masks, depths = [], []
    for row in rows:
        t = len(row)
        visible = torch.zeros(t, t, dtype=torch.bool)
        depth = torch.zeros(t, dtype=torch.long)
        for i in range(t):
            if i > 0:
                visible[i] = visible[row[i]]
                depth[i] = depth[row[i]] + 1
            visible[i, i] = True
        full = torch.cat([torch.ones(t, prefix_len, dtype=torch.bool), visible], 1)
        masks.append(torch.zeros(full.shape, dtype=dtype).masked_fill(~full, torch.finfo(dtype).min))
        depths.append(depth)
    mask, depth = torch.stack(masks), torch.stack(depths)
    if parents.dim() == 1:
        mask, depth = mask[0], depth[0]
    return mask.to(parents.device), depth.to(parents.device)


def compact_kv(
    cache: torch.Tensor, path: torch.Tensor, num_accepted: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """Move each row's accepted path to the slots right after the prefix, in place.

    For row ``b`` and ``j = 0 .. num_accepted[b]``: ``cache[b, :, prefix_len + j] =
    cache[b, :, prefix_len + path[b, j]]`` (in increasing ``j``; ``path[b, j] >= j`` so no source is
    overwritten before it is read). Other slots are left as they are.

    Args:
        cache: ``[B, heads, S, head_dim]`` any dtype, modified in place.
        path: ``[B, T]`` int64 node indices from :func:`verify_tree`; num_accepted: ``[B]`` int64.
    Returns:
        ``cache``.
    """
    for b in range(cache.shape[0]):
        for j in range(int(num_accepted[b]) + 1):
            src = prefix_len + int(path[b, j])
            cache[b, :, prefix_len + j] = cache[b, :, src]
    return cache
