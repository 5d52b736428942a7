"""Shared test helpers: devices, the per-dtype tolerance table, seeded inputs, top-k comparison.

Everything a test needs to compare a kernel with :mod:`mtp_ext.reference` lives here, declared
once, so that every test file uses the same devices, the same tolerances and the same rules.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import pytest
import torch

from mtp_ext import reference

CUDA_AVAILABLE = torch.cuda.is_available()

# The floating input dtypes every op accepts.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def devices() -> list:
    """``"cpu"`` always, then ``"cuda"``, skipped with a reason when no GPU is present."""
    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.cuda,
                pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available"),
            ],
        ),
    ]


class Tol(NamedTuple):
    """``(rtol, atol)`` pairs for the float32 outputs of an op fed with a given input dtype."""

    prob: tuple[float, float]  # probabilities (softmax_topk, marginalize, topk_marginalize)
    logprob: tuple[float, float]  # log-probabilities after a float32 matmul (fused_mtp_heads)
    linear: tuple[float, float]  # outputs in the input's dtype (small_batch_linear), keyed by it


# The kernels convert the inputs to float32 exactly as the reference does and accumulate in float32,
# so the tolerances only cover summation order and the kernels' polynomial exp (~2 ulp); they do not
# grow with the precision of the input dtype. The exception is ``linear``: small_batch_linear
# returns x's dtype, so a float16 / bfloat16 result is the float32 sum rounded once more; its rtol
# is one unit of rounding of that dtype (finfo.eps, an ulp at most) and atol covers the float32 sum
# near zero. Inputs are scaled so that outputs are O(1).
TOL: dict[torch.dtype, Tol] = {
    torch.float32: Tol(prob=(1e-5, 1e-6), logprob=(1e-4, 1e-4), linear=(1e-5, 1e-5)),
    torch.float16: Tol(prob=(1e-5, 1e-6), logprob=(1e-4, 1e-4), linear=(2.0**-10, 1e-5)),
    torch.bfloat16: Tol(prob=(1e-5, 1e-6), logprob=(1e-4, 1e-4), linear=(2.0**-7, 1e-5)),
}


# Set by tests/conftest.py under --cuda-emulator, where ops on CPU tensors run the CUDA kernels.
CUDA_CODE_ON_CPU = False


def linear_tol(x_dtype: torch.dtype, w_dtype: torch.dtype, device) -> tuple[float, float]:
    """``TOL[x_dtype].linear``, except where the CUDA kernels multiply a float32 ``x`` by a float16
    or bfloat16 weight: tensor cores take ``x`` split into two 16-bit parts (about 2^-17 relative
    error per term, as the ops' docstrings say), so float32 results get the logprob tolerance."""
    on_cuda = str(device).startswith("cuda") or CUDA_CODE_ON_CPU
    if on_cuda and x_dtype == torch.float32 and w_dtype in (torch.float16, torch.bfloat16):
        return TOL[torch.float32].logprob
    return TOL[x_dtype].linear


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator with a fixed seed (inputs are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0):
    """Seeded normal values of ``shape``, drawn in float32 on the CPU, then cast and moved."""
    x = torch.randn(*shape, generator=gen(seed)) * scale
    return x.to(dtype=dtype, device=device)


def rand(*shape: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """Seeded uniform values in ``[0, 1)``."""
    return torch.rand(*shape, generator=gen(seed)).to(dtype=dtype, device=device)


@contextlib.contextmanager
def _float_means_double():
    had_own = "float" in torch.Tensor.__dict__
    original = torch.Tensor.float
    torch.Tensor.float = lambda self, *args, **kwargs: self.double(*args, **kwargs)
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.float = original
        else:
            del torch.Tensor.float


def ref64(fn, *args, **kwargs):
    """Evaluate a function of :mod:`mtp_ext.reference` in float64.

    The references cast their inputs with ``.float()``; here those casts give float64 instead, so
    the same definition is computed without float32 rounding. Ground truth for values: at real
    vocabulary sizes (V ~ 150k) torch's float32 softmax in the reference drifts by ~2e-5 relative,
    more than the kernels do. Rankings by raw logits are identical (the casts are exact); returned
    floating tensors come back as float32.
    """
    with _float_means_double():
        out = fn(*args, **kwargs)
    if isinstance(out, tuple):
        return tuple(o.float() if o.is_floating_point() else o for o in out)
    return out.float() if out.is_floating_point() else out


def assert_close(actual, expected, tol: tuple[float, float], msg: str = "", equal_nan=False):
    rtol, atol = tol
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=msg or None
    )


def heads_inputs(n, h, d, v, dtype, seed, hidden_scale=1.0, lm_scale=0.5, norm=True):
    """``(hidden [N, D], weight [H, D, D], bias [H, D], lm_head [V, D], norm_weight [D] or None)``
    for fused_mtp_heads, drawn with seeds ``seed .. seed + 4``; the bias scales with the hidden
    states."""
    hidden = randn(n, d, dtype=dtype, seed=seed, scale=hidden_scale)
    weight = randn(h, d, d, dtype=dtype, seed=seed + 1, scale=d**-0.5)
    bias = randn(h, d, dtype=dtype, seed=seed + 2, scale=0.1 * hidden_scale)
    lm_head = randn(v, d, dtype=dtype, seed=seed + 3, scale=lm_scale)
    nw = (1 + randn(d, seed=seed + 4, scale=0.1)).to(dtype) if norm else None
    return hidden, weight, bias, lm_head, nw


def assert_same_outputs(
    actual, expected, what: str = "", tol: tuple[float, float] = (1e-5, 1e-5)
):
    """Two runs of one op (a tensor or a tuple of them, on any devices): same shapes and dtypes,
    integers exactly, floats within ``tol`` (NaN equal)."""
    if isinstance(expected, torch.Tensor):
        actual, expected = [actual], [expected]
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.cpu(), e.cpu()
        assert a.shape == e.shape and a.dtype == e.dtype, (
            f"{what}[{i}]: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        )
        if a.is_floating_point():
            assert_close(a, e, tol, f"{what}[{i}] differs", equal_nan=True)
        else:
            assert torch.equal(a, e), f"{what}[{i}] differs"


def assert_ids_valid(ids: torch.Tensor, vocab: int):
    """Ids are int64, in ``[0, vocab)`` and distinct along the last dim."""
    assert ids.dtype == torch.int64
    if ids.numel() == 0:
        return
    assert int(ids.min()) >= 0 and int(ids.max()) < vocab, f"ids out of [0, {vocab})"
    sorted_ids = ids.sort(-1).values
    assert bool((sorted_ids[..., 1:] != sorted_ids[..., :-1]).all()), "repeated id in a row"


def valid_walk(num, tokens, path, draft, par, logits, tol: float) -> bool:
    """Whether one row's (num, tokens, path) is the walk of verify_tree for some choice of targets
    within ``tol`` of the best logit at each visited node (lists; logits [T, V] float64)."""
    t, v = len(draft), logits.shape[-1]
    padding = [-1] * (t - num - 1)
    if path[0] != 0 or tokens[num + 1 :] != padding or path[num + 1 :] != padding:
        return False
    for j in range(num + 1):
        node, y = path[j], tokens[j]
        if not (0 <= y < v) or float(logits[node, y]) < float(logits[node].max()) - tol:
            return False
        child = next((c for c in range(node + 1, t) if par[c] == node and draft[c] == y), None)
        if child != (path[j + 1] if j < num else None):
            return False
    return True


def assert_equal_up_to_near_ties(
    out, expected, draft, parents, logits, tol: float, max_rows: int = 1
):
    """Greedy verify_tree results ``(num_accepted, tokens, path)`` equal ``expected`` exactly,
    except at most ``max_rows`` rows whose walk is valid for targets within ``tol`` of the best of
    ``logits [B, T, V]`` at each visited node (near ties, which kernels that round differently may
    break either way; the first such row is reported)."""
    num, tokens, path = (o.cpu() for o in out)
    for o in out:
        assert o.dtype == torch.int64
    b, t = draft.shape
    assert num.shape == (b,) and tokens.shape == (b, t) and path.shape == (b, t)
    par = parents.expand(b, t) if parents.dim() == 1 else parents
    differ = [
        r
        for r in range(b)
        if any(not torch.equal(o[r], e[r]) for o, e in zip((num, tokens, path), expected))
    ]
    for r in differ:
        n = int(num[r])
        walk = (tokens[r].tolist(), path[r].tolist(), draft[r].tolist(), par[r].tolist())
        assert 0 <= n < t and valid_walk(n, *walk, logits[r], tol), (
            f"row {r} differs from the reference without a near tie: kernel "
            f"{[num[r].item(), tokens[r].tolist(), path[r].tolist()]} vs reference "
            f"{[expected[0][r].item(), expected[1][r].tolist(), expected[2][r].tolist()]}"
        )
    assert len(differ) <= max_rows, f"{len(differ)} rows differ from the reference (near ties)"


def assert_topk_equivalent(
    values: torch.Tensor,
    ids: torch.Tensor,
    ref_values: torch.Tensor,
    ref_ids: torch.Tensor,
    full_ref_scores: torch.Tensor,
    tol: tuple[float, float],
    max_mismatch_frac: float = 0.01,
):
    """A kernel's top-k equals the reference's up to near ties.

    ``values`` must be close to ``ref_values``. ``ids`` must equal ``ref_ids``, except that where
    they differ, the reference score of the kernel's id (``full_ref_scores.gather(-1, ids)``) must
    be within ``tol`` of the reference value at that rank (two scores that tie within rounding can
    come out in either order). Such mismatches must be rare: at most ``max_mismatch_frac`` of the
    entries (and never more than 2 when there are few entries).
    """
    assert values.shape == ref_values.shape and ids.shape == ref_ids.shape
    assert values.dtype == torch.float32
    assert_close(values, ref_values, tol, "top-k values differ from the reference")
    assert_ids_valid(ids, full_ref_scores.shape[-1])
    ids, ref_ids = ids.cpu(), ref_ids.cpu()
    ref_values, scores = ref_values.cpu(), full_ref_scores.cpu().float()
    differ = ids != ref_ids
    count = int(differ.sum())
    if count == 0:
        return
    rtol, atol = tol
    picked = scores.gather(-1, ids)
    near_tie = torch.isclose(picked, ref_values.float(), rtol=rtol, atol=atol)
    bad = differ & ~near_tie
    assert not bool(bad.any()), (
        f"{int(bad.sum())} ids differ from the reference without a near tie; first at "
        f"{bad.nonzero()[0].tolist()}: kernel id {ids[bad][0]} (ref score {picked[bad][0]}) vs "
        f"ref id {ref_ids[bad][0]} (ref score {ref_values[bad][0]})"
    )
    allowed = max(2, int(max_mismatch_frac * ids.numel()))
    assert count <= allowed, f"{count} near-tie id mismatches out of {ids.numel()} (> {allowed})"


# ------------------------------------------------------------------------------------------------
# Trees
# ------------------------------------------------------------------------------------------------

# Hand-built trees (parents lists): node 0 is the root.
TREES = {
    "root_only": [-1],
    "chain": [-1, 0, 1, 2, 3],
    "star": [-1, 0, 0, 0, 0],
    # Medusa-like: top-2 of head 1 under the root, then top-3 / top-2 of head 2 under them, then
    # one head-3 candidate under the first two of those.
    "medusa": [-1, 0, 0, 1, 1, 1, 2, 2, 3, 4],
}


def unaligned_paths_mixture() -> tuple[torch.Tensor, torch.Tensor]:
    """A topk_marginalize input whose paths are laid out differently: V = 1025 in bfloat16, so
    path 0's row is 16-byte aligned and path 1's is not. Token 478 is fifth of its warp's share on
    each path (behind 300-303 on path 0, behind 200-203 on path 1 when path 1 was grouped by its
    own reading order) but first in the marginal; with m = 4 the top ids are [478, 303, 203, 302].
    Returns x [1, 2, 1025] (bfloat16) and weights [1, 2]."""
    x = torch.full((1, 2, 1025), -6.0)
    x[0, 0, 300:304] = torch.tensor([5.0, 5.03125, 5.0625, 5.09375])
    x[0, 1, 200:204] = torch.tensor([4.875, 4.90625, 4.9375, 4.96875])
    x[0, 0, 478], x[0, 1, 478] = 4.9375, 4.8125
    return x.to(torch.bfloat16), torch.ones(1, 2)


def medusa_tree() -> torch.Tensor:
    """parents [10] of a Medusa-style tree: 2 children of the root, 3 + 2 + 1 + 1 below them."""
    return torch.tensor([-1, 0, 0, 1, 1, 1, 2, 2, 3, 4])


def verify_inputs(seed: int, b: int = 3, v: int = 3001, dtype=torch.bfloat16):
    """verify_tree inputs on medusa_tree(): (draft [b, 10] int64, parents [10], logits [b, 10, v]
    of ``dtype``, uniforms [b, 10] float32); about 70 % of the drafts are the target of their
    parent, so paths of several lengths are accepted."""
    par = medusa_tree()
    t = par.numel()
    logits = randn(b, t, v, dtype=dtype, seed=seed, scale=3.0)
    targets = reference.target_tokens(logits)
    draft = torch.randint(0, v, (b, t), generator=gen(seed))
    hit = torch.rand(b, t, generator=gen(seed + 1)) < 0.7
    draft = torch.where(hit, targets.gather(1, par.clamp(min=0).expand(b, t)), draft)
    return draft, par, logits, rand(b, t, seed=seed + 2)


def random_parents(t: int, seed: int = 0) -> torch.Tensor:
    """A random valid tree of ``t`` nodes: ``parents[i]`` uniform in ``[0, i)``."""
    g = gen(seed)
    par = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, t)]
    return torch.tensor(par, dtype=torch.long)


def random_case(b, t, v, dtype, seed, batched_parents, targets=None):
    """Random trees whose drafts often equal the parent's target, so that walks go deep."""
    logits = randn(b, t, v, seed=seed, scale=2.0).to(dtype)
    if batched_parents:
        parents = torch.stack([random_parents(t, seed + 1 + r) for r in range(b)])
    else:
        parents = random_parents(t, seed + 1)
    par = parents.expand(b, t)
    if targets is None:
        targets = reference.target_tokens(logits)
    g = gen(seed + 2)
    draft = torch.randint(-1, v, (b, t), generator=g)
    hit = torch.rand(b, t, generator=g) < 0.7
    parent_target = targets.gather(1, par.clamp(min=0))
    draft = torch.where(hit, parent_target, draft)
    draft[:, 0] = -1
    return draft, parents, logits


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def tiny_llama(
    vocab: int, hidden: int, intermediate: int, layers: int = 2, seed: int = 0, name: str = ""
):
    """A random-weight ``LlamaForCausalLM`` (4 heads, 2 KV heads, tied embeddings) in eval mode,
    named ``name``, built without touching the global RNG state. Skips the test when transformers
    is missing."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config).eval()
    model.name_or_path = name
    return model


def decoding_llama(vocab: int, seed: int = 0):
    """The decoding tests' model: a :func:`tiny_llama` (hidden 48, 2 layers) whose
    ``generation_config`` has no EOS token and pads with 0, so every row runs to its length."""
    m = tiny_llama(vocab, 48, 96, 2, seed)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def left_padded_prompts(vocab: int, B: int, P: int, seed: int, pad_rows=()):
    """``(ids [B, P], attention_mask [B, P])``: random ids in ``[1, vocab)``; for each
    ``(row, n)`` of ``pad_rows`` the row's first ``n`` positions are left padding (id 0, mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, P), generator=g)
    mask = torch.ones_like(ids)
    for row, n in pad_rows:
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def cycle_texts(vocab: int, seq: int, n_seqs: int, seed: int) -> torch.Tensor:
    """``[n_seqs, seq]`` token ids following one fixed cycle of 16 distinct ids below ``vocab``,
    each row at a random phase (``seed``): the token at ``t + 2`` is a function of the token at
    ``t``, which trained heads learn."""
    cycle = torch.randperm(vocab, generator=torch.Generator().manual_seed(123))[:16]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 16, (n_seqs,), generator=g)
    return cycle[(starts[:, None] + torch.arange(seq)[None]) % 16]


def perturbed_heads(model, kind: str = "conditioned", seed: int = 0, scale: float = 0.05, num_heads: int = 3,
                    **kw):
    """``MTPHeads.for_model(model, num_heads, kind, **kw)`` with Gaussian noise (``scale``) added to
    every parameter: fresh heads are too trivial to test drafting on."""
    from mtp_ext.heads import MTPHeads

    heads = MTPHeads.for_model(model, num_heads, kind=kind, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return heads


def tiny_causal_lm(arch: str, vocab: int = 150, seed: int = 0):
    """A random-weight tiny causal LM of another supported family: ``"qwen2"`` or ``"gemma3"``
    (two sliding-window layers of window 24 and one full layer, final logit soft-capping)."""
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "qwen2":
        config, cls = transformers.Qwen2Config(num_hidden_layers=2, **common), transformers.Qwen2ForCausalLM
    elif arch == "gemma3":
        config = transformers.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=12, sliding_window=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            final_logit_softcapping=30.0, **common,
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return cls(config).eval()


def word_tokenizer(vocab: int):
    """A word-level fast tokenizer built offline: ``"w{i}"`` is id ``i`` for ``i < vocab - 2``,
    then ``<unk>`` and ``</s>`` (EOS, id ``vocab - 1``)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    ids = {f"w{i}": i for i in range(vocab - 2)}
    ids.update({"<unk>": vocab - 2, "</s>": vocab - 1})
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
