"""Typed public wrappers of the ``torch.ops.mtp_ext`` ops, and their fakes for ``torch.compile``.

Each wrapper takes the same arguments as the dispatcher op and documents its contract. The
definition of each op is its function in :mod:`mtp_ext.reference`; the kernels are in ``csrc/``.

Common rules: floating inputs may be float32, float16 or bfloat16 and are accumulated in float32;
returned probabilities are float32 and ids int64; rankings are by value descending with ties
toward the lower token id (NaN ranks first); fixed-shape outputs are padded with -1.

Bad arguments raise ``ValueError`` (values, shapes, sizes, devices) or ``TypeError`` (dtypes)
naming the argument. All tensor arguments must be on one device; a meta tensor among CPU or CUDA
tensors is refused too. On CUDA the checks that read tensor data are made only with
``MTP_EXT_CUDA_VALUE_CHECKS=1`` (README, "Argument checks").
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the schemas and the CPU/CUDA kernels)

__all__ = [
    "softmax_topk",
    "marginalize",
    "topk_marginalize",
    "fused_mtp_heads",
    "verify_tree",
    "tree_attention_mask",
    "compact_kv",
    "verify_tree_from_hidden",
    "small_batch_linear",
]

_ops = torch.ops.mtp_ext


def softmax_topk(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` of ``softmax(logits / temperature)`` in one pass over the logits.

    Args:
        logits: ``[..., V]`` float32, float16 or bfloat16 (any strides).
        k: number of entries to return, ``1 <= k <= V``.
        temperature: softmax temperature in ``[2.93874e-39, 3.40282e+38]``
            (:data:`mtp_ext.reference.MIN_TEMPERATURE`, ``MAX_TEMPERATURE``): it and ``1 /
            temperature`` must be finite float32 values, else ValueError. The softmax is taken of
            ``(logits - max) / temperature``, which does not overflow: at the smallest temperature
            it is one-hot on the maximum (shared equally among exact ties).
    Returns:
        ``probs[..., k]`` float32, descending, and ``ids[..., k]`` int64 (ties toward the lower id).
        A row holding a NaN or ``+inf``, or only ``-inf``, has NaN probabilities (as
        ``torch.softmax``); its ids follow the ranking (NaN first).
    """
    return _ops.softmax_topk(logits, k, temperature)


def marginalize(
    next_logits: torch.Tensor, weights: torch.Tensor, renormalize: bool = True
) -> torch.Tensor:
    """Marginal next-next-token distribution over ``L`` intermediate tokens (or paths).

    ``q[b] = sum_l w[b, l] * softmax(next_logits[b, l])`` with ``w = weights / weights.sum(-1)``
    when ``renormalize`` (an all-zero row then gives zeros).

    Args:
        next_logits: ``[B, L, V]`` float32, float16 or bfloat16.
        weights: ``[B, L]`` floating, non-negative (the intermediate tokens' probabilities, or the
            products of probabilities along each path for t+K).
        renormalize: normalize ``weights`` per row first.
    Returns:
        ``probs[B, V]`` float32.

    On CUDA one launch reads the logits from device memory once: the statistics of a chunk of the
    vocabulary, then, once its row's statistics are all in, the chunk again, from L2, for its
    marginal. Where the chunks read in between would not fit half the L2, the logits are read
    twice (a statistics pass, then the marginal).
    """
    return _ops.marginalize(next_logits, weights, renormalize)


def topk_marginalize(
    next_logits: torch.Tensor, weights: torch.Tensor, m: int, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``m`` of :func:`marginalize`, fused: the ``[B, V]`` marginal is never written to memory.

    On CUDA (``m <= 16``, ``L <= 16``) one pass reads the logits once, keeps a few candidates per
    path and a bound on every other token, and answers each batch row whose top ``m`` the bound
    proves; rows it cannot prove (ties at the ``m``-th place, NaN or infinite values, a marginal
    too flat for the bound) read their logits a second time. Both give the same values.

    Args:
        next_logits: ``[B, L, V]`` float32, float16 or bfloat16.
        weights: ``[B, L]`` floating, non-negative.
        m: ``1 <= m <= V``.
        renormalize: normalize ``weights`` per row first.
    Returns:
        ``probs[B, m]`` float32, descending, and ``ids[B, m]`` int64.
    """
    return _ops.topk_marginalize(next_logits, weights, m, renormalize)


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
    """``H`` Medusa-style residual heads through the shared unembedding, top-``k`` per head.

    Head ``h``: ``z = x + SiLU(x @ weight[h].T + bias[h])``; if ``norm_weight`` is given,
    ``z = RMSNorm(z, eps) * norm_weight``; ``logits = z @ lm_head.T``; returns the top-``k``
    log-softmax values and ids. All heads and rows share one pass over ``lm_head``, and the
    ``[N, H, V]`` logits are never written.

    With ``weight=None`` there is one head and no residual block: ``z = x`` (then the RMSNorm when
    ``norm_weight`` is given), so the op is the final norm, the unembedding and the top-``k`` of
    heads that compute their own features: ``fused_mtp_heads(z, None, None, lm_head, k,
    norm_weight, eps, vocab_ids)`` returns ``[N, 1, k]``.

    Precision: ``z`` is float32 and products accumulate in float32. On CUDA with float16 or
    bfloat16 weights on compute capability 8.0 or newer (and ``D`` a multiple of 8), the heads'
    blocks and the unembedding run on tensor cores with their float32 inputs split into two 16-bit
    parts: about 2^-17 relative error per term instead of float32's 2^-24, so the top-``k`` can
    differ from the CPU's only between logits that are equal to that precision.

    Args:
        hidden: ``[N, D]`` float32, float16 or bfloat16.
        weight: ``[H, D, D]`` (``nn.Linear`` layout: output x input), or None for one head
            without a residual block.
        bias: ``[H, D]`` or None; must be None when ``weight`` is None.
        lm_head: ``[V, D]`` the model's output embedding.
        k: ``1 <= k <= V``.
        norm_weight: ``[D]`` or None (the model's final RMSNorm weight).
        eps: RMSNorm epsilon.
        vocab_ids: ``[V]`` int64 or None. With a draft vocabulary, ``lm_head`` holds only the rows
            of some tokens (for example the most frequent ones) and ``vocab_ids[j]`` is the token id
            of row ``j``: the softmax runs over those rows, the cost falls with their number, and
            the returned ids are full-vocabulary ids. The ids must be non-negative (a negative one
            raises ``ValueError``; on CUDA only with ``MTP_EXT_CUDA_VALUE_CHECKS=1``). Their upper
            bound, the full vocabulary's size, is not an argument of the op and is not checked:
            ids are returned as given, so keeping them below it is the caller's part.
    Returns:
        ``logprobs[N, H, k]`` float32, descending, and ``ids[N, H, k]`` int64 (``H = 1`` without
        ``weight``).
    """
    return _ops.fused_mtp_heads(hidden, weight, bias, lm_head, k, norm_weight, eps, vocab_ids)


def verify_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    target_logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Verify a draft tree against the target model's logits (lossless speculative decoding).

    Node 0 is the root (the last accepted token; its logits give the next token), ``parents[0] =
    -1`` and ``0 <= parents[i] < i``. At node ``n`` the target token ``y_n`` is the argmax of
    ``target_logits[b, n]`` when ``temperature == 0``; otherwise it is drawn by inverse CDF (kept
    tokens in ascending id order) with ``uniforms[b, n]`` from ``softmax(target_logits[b, n] /
    temperature)`` after top-k and top-p filtering (see :func:`mtp_ext.reference.target_tokens`).
    From the root, the walk moves to the lowest-index child whose draft token equals ``y_n`` and
    stops when there is none. Draft tokens outside ``[0, V)`` never match, so -1 can pad a tree.

    Non-finite logits when sampling: the ``+inf`` logits of a row share all its probability
    equally (top-k and top-p then filter them as equals, lower ids first); a row holding a NaN, or
    only ``-inf``, has no distribution and gives its greedy token (the first NaN, else id 0), as
    ``temperature == 0`` would. CPU and CUDA kernels and the reference agree on these rows.

    Args:
        draft_tokens: ``[B, T]`` int64.
        parents: ``[T]`` or ``[B, T]`` int64.
        target_logits: ``[B, T, V]`` float32, float16 or bfloat16.
        temperature: 0 (greedy), or in ``[2.93874e-39, 3.40282e+38]`` to sample: it and ``1 /
            temperature`` must be finite float32 values (as :func:`softmax_topk`), else ValueError.
        top_k: keep only the ``top_k`` most likely tokens when sampling (0 keeps all).
        top_p: nucleus mass in ``(0, 1]`` when sampling.
        uniforms: ``[B, T]`` floating in ``[0, 1)``; required when ``temperature > 0``, not read
            when greedy. A value outside ``[0, 1)`` (NaN included) raises ValueError naming
            ``uniforms`` and its index on the CPU, and on CUDA when ``MTP_EXT_CUDA_VALUE_CHECKS=1``
            (the check reads device memory); otherwise the CUDA kernels clamp it into ``[0, 1)``
            (NaN and negative values as 0, 1 and above as the largest float32 below 1), so the
            token is always one of the kept tokens of the row.
    Returns:
        ``num_accepted[B]`` int64 (accepted draft nodes, root excluded); ``tokens[B, T]`` int64
        (the accepted draft tokens then the bonus token, then -1); ``path[B, T]`` int64 (node
        indices from the root to the last accepted node, then -1).
    """
    return _ops.verify_tree(
        draft_tokens, parents, target_logits, temperature, top_k, top_p, uniforms
    )


def tree_attention_mask(
    parents: torch.Tensor, prefix_len: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive tree attention mask and per-node depths.

    Args:
        parents: ``[T]`` or ``[B, T]`` int64 (``parents[0] = -1``, ``0 <= parents[i] < i``).
        prefix_len: cached tokens before the tree, all visible to every node, ``>= 0``. A mask
            whose size in bytes would not fit in int64 raises ``ValueError``; one that cannot be
            allocated raises the allocator's error with ``prefix_len`` and the bytes named.
        dtype: floating dtype of the mask.
    Returns:
        ``mask[..., T, prefix_len + T]`` of ``dtype`` (0 where node ``i`` may attend: the prefix,
        itself and its ancestors; ``torch.finfo(dtype).min`` elsewhere) and
        ``position_offsets[..., T]`` int64 (the node depths; position ids are
        ``prefix_len + position_offsets``).
    """
    return _ops.tree_attention_mask(parents, prefix_len, dtype)


def compact_kv(
    cache: torch.Tensor, path: torch.Tensor, num_accepted: torch.Tensor, prefix_len: int
) -> torch.Tensor:
    """Move the accepted path's key/value entries to the slots right after the prefix, in place.

    For each row ``b`` and ``j = 0 .. num_accepted[b]``: ``cache[b, :, prefix_len + j] =
    cache[b, :, prefix_len + path[b, j]]``. Call it once for the keys and once for the values of
    each layer, then crop the cache to ``prefix_len + num_accepted + 1``.

    Args:
        cache: ``[B, heads, S, head_dim]`` any dtype, contiguous in ``head_dim``, no two entries
            in the same memory (not an expanded tensor); modified in place.
        path: ``[B, T]`` int64 from :func:`verify_tree`.
        num_accepted: ``[B]`` int64 from :func:`verify_tree`.
        prefix_len: tokens before the tree, ``>= 0`` with ``prefix_len + T <= S``.
    Returns:
        ``cache``.
    """
    _ops.compact_kv(cache, path, num_accepted, prefix_len)
    return cache


def verify_tree_from_hidden(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    hidden: torch.Tensor,
    lm_head: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy :func:`verify_tree` straight from the backbone's last hidden states.

    The final RMSNorm (when ``norm_weight`` is given), the output layer and the per-node argmax are
    fused in one pass over ``lm_head``; the ``[B, T, V]`` logits are never written. Same results as
    ``verify_tree(draft_tokens, parents, logits)`` on the logits the model would have produced, up
    to ties within rounding (on CUDA with a 16-bit ``lm_head``, rounding of about 2^-17 relative
    per term: see :func:`fused_mtp_heads`).

    Args:
        draft_tokens: ``[B, T]`` int64 (node 0 is the root); ids outside ``[0, V)`` never match,
            so -1 can pad a tree.
        parents: ``[T]`` or ``[B, T]`` int64.
        hidden: ``[B, T, D]`` float32, float16 or bfloat16, before the final norm.
        lm_head: ``[V, D]`` the output layer's weight.
        norm_weight: ``[D]`` the final RMSNorm's weight, or None when ``hidden`` is already normed.
        eps: RMSNorm epsilon.
    Returns:
        ``num_accepted[B]``, ``tokens[B, T]``, ``path[B, T]``, int64, as :func:`verify_tree`.
    """
    return _ops.verify_tree_from_hidden(draft_tokens, parents, hidden, lm_head, norm_weight, eps)


def small_batch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` for a few rows, reading each weight row once for all of them.

    On a CPU the BLAS path for 2 or more rows costs far more than for 1; this kernel makes
    ``M <= 64`` rows cost about what the weight stream costs. Correct for any ``M``. On CUDA with
    a float16 or bfloat16 ``weight`` (compute capability 8.0 or newer, ``K`` a multiple of 8) the
    products run on tensor cores with ``x`` split into two 16-bit parts: about 2^-17 relative
    error per term instead of float32's 2^-24.

    Args:
        x: ``[M, K]`` float32, float16 or bfloat16.
        weight: ``[N, K]`` float32, float16 or bfloat16 (``nn.Linear`` layout).
        bias: ``[N]`` or None.
    Returns:
        ``[M, N]`` of ``x.dtype``, accumulated in float32.
    """
    return _ops.small_batch_linear(x, weight, bias)


def _small_batch_linear_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _small_batch_linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    g = grad.float()
    grad_x = (g @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
    grad_w = (g.T @ x.float()).to(weight.dtype) if ctx.needs_input_grad[1] else None
    grad_b = g.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


torch.library.register_autograd(
    "mtp_ext::small_batch_linear",
    _small_batch_linear_backward,
    setup_context=_small_batch_linear_setup,
)


# ---------------------------------------------------------------------------------------------
# Fakes (shape and dtype propagation for torch.compile / FakeTensor)
# ---------------------------------------------------------------------------------------------
# A fake also runs for real tensors whenever one of them is a meta tensor (the Meta dispatch key
# wins over CPU and CUDA), so each first checks, as the kernels do, that its tensors share one
# device; otherwise it would return uninitialized tensors on the first argument's device.


def _check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Raise ValueError naming the first tensor argument and one on another device."""
    given = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = given[0]
    for name, t in given[1:]:
        if t.device != first.device:
            raise ValueError(
                f"mtp_ext.{op}: {first_name} and {name} must be on the same device, got "
                f"{first.device} and {t.device}"
            )


@torch.library.register_fake("mtp_ext::softmax_topk")
def _softmax_topk_fake(logits, k, temperature=1.0):
    shape = (*logits.shape[:-1], k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("mtp_ext::marginalize")
def _marginalize_fake(next_logits, weights, renormalize=True):
    _check_same_device("marginalize", next_logits=next_logits, weights=weights)
    return next_logits.new_empty((next_logits.shape[0], next_logits.shape[2]), dtype=torch.float32)


@torch.library.register_fake("mtp_ext::topk_marginalize")
def _topk_marginalize_fake(next_logits, weights, m, renormalize=True):
    _check_same_device("topk_marginalize", next_logits=next_logits, weights=weights)
    shape = (next_logits.shape[0], m)
    return (
        next_logits.new_empty(shape, dtype=torch.float32),
        next_logits.new_empty(shape, dtype=torch.long),
    )


@torch.library.register_fake("mtp_ext::fused_mtp_heads")
def _fused_mtp_heads_fake(
    hidden, weight, bias, lm_head, k, norm_weight=None, eps=1e-6, vocab_ids=None
):
    _check_same_device(
        "fused_mtp_heads",
        hidden=hidden,
        weight=weight,
        bias=bias,
        lm_head=lm_head,
        norm_weight=norm_weight,
        vocab_ids=vocab_ids,
    )
    shape = (hidden.shape[0], 1 if weight is None else weight.shape[0], k)
    return hidden.new_empty(shape, dtype=torch.float32), hidden.new_empty(shape, dtype=torch.long)


@torch.library.register_fake("mtp_ext::verify_tree")
def _verify_tree_fake(
    draft_tokens, parents, target_logits, temperature=0.0, top_k=0, top_p=1.0, uniforms=None
):
    _check_same_device(
        "verify_tree",
        draft_tokens=draft_tokens,
        parents=parents,
        target_logits=target_logits,
        uniforms=uniforms,
    )
    return _tree_outputs(draft_tokens)


def _tree_outputs(draft_tokens):
    b, t = draft_tokens.shape
    return (
        draft_tokens.new_empty((b,), dtype=torch.long),
        draft_tokens.new_empty((b, t), dtype=torch.long),
        draft_tokens.new_empty((b, t), dtype=torch.long),
    )


@torch.library.register_fake("mtp_ext::verify_tree_from_hidden")
def _verify_tree_from_hidden_fake(draft_tokens, parents, hidden, lm_head, norm_weight=None, eps=1e-6):
    _check_same_device(
        "verify_tree_from_hidden",
        draft_tokens=draft_tokens,
        parents=parents,
        hidden=hidden,
        lm_head=lm_head,
        norm_weight=norm_weight,
    )
    return _tree_outputs(draft_tokens)


@torch.library.register_fake("mtp_ext::small_batch_linear")
def _small_batch_linear_fake(x, weight, bias=None):
    _check_same_device("small_batch_linear", x=x, weight=weight, bias=bias)
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("mtp_ext::tree_attention_mask")
def _tree_attention_mask_fake(parents, prefix_len, dtype=None):
    t = parents.shape[-1]
    mask = parents.new_empty(
        (*parents.shape, prefix_len + t), dtype=torch.float32 if dtype is None else dtype
    )
    return mask, parents.new_empty(parents.shape, dtype=torch.long)


@torch.library.register_fake("mtp_ext::compact_kv")
def _compact_kv_fake(cache, path, num_accepted, prefix_len):
    _check_same_device("compact_kv", cache=cache, path=path, num_accepted=num_accepted)
    return None
