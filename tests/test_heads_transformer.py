"""``"transformer"`` MTP heads (one decoder block per head) on a tiny random-weight Llama.

Vocabulary 1000, hidden 64, 2 layers (training: vocabulary 200, hidden 32, as in test_train.py).
Each head is a copy of the backbone's last decoder layer with causal self-attention over the input
sequence, followed by the backbone's final norm and unembedding. Checked: shapes and dtypes, the
copies (equal to the backbone's last layer, independent of it), the wiring (fresh heads on the last
layer's input reproduce the backbone's logits), a per-prefix reference, causality, draft against
forward, incremental drafting with key/value caches, save/load, draft vocabularies and training.
"""

from __future__ import annotations

import pytest
import torch

from helpers import cycle_texts, tiny_llama

from mtp_ext import reference
from mtp_ext import training as T
from mtp_ext.heads import MTPHeads, MTPHeadsConfig, TransformerDraftState
from mtp_ext.training.forward import heads_forward

VOCAB, HIDDEN, LAYERS = 1000, 64, 2
H = 3
B, S = 2, 9


def _tiny_llama(hidden=HIDDEN, seed=0, name="", vocab=VOCAB):
    return tiny_llama(vocab, hidden, 2 * hidden, LAYERS, seed, name)


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def batch(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return ids, out.hidden_states, out.logits


def _heads(model, layer=-1, seed=0, scale=0.02, **kw):
    """Transformer heads whose blocks differ from each other and from the backbone's last layer."""
    heads = MTPHeads.for_model(model, num_heads=H, kind="transformer", layer=layer, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name == "whs_logits":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return heads


def _prefix_reference(model, heads, hs) -> torch.Tensor:
    """Naive reference ``[B, S, H, V]``: head h at position t runs its block on the prefix
    ``x[:, :t + 1]`` (no mask: the last query attends to every key of the prefix), takes the last
    position, then the backbone's own final norm and lm_head."""
    x = heads.select_input(hs)
    out = torch.empty(B, S, H, VOCAB)
    for t in range(S):
        prefix = x[:, : t + 1]
        pos = torch.arange(t + 1).expand(B, t + 1)
        cos_sin = model.model.rotary_emb(prefix, pos)
        for h, block in enumerate(heads.blocks):
            z = block(prefix, attention_mask=None, position_embeddings=cos_sin)[:, -1]
            out[:, t, h] = model.lm_head(model.model.norm(z)).float()
    return out


def _assert_topk_matches(lp, ids, logits, k):
    """``(lp, ids)`` is the top-k of log_softmax(logits) (ids exact except at near-ties)."""
    full = torch.log_softmax(logits.float(), -1)
    ref_lp, ref_ids = reference.stable_topk(full, k)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-4)
    mismatch = ids != ref_ids
    if mismatch.any():
        assert torch.allclose(full.gather(-1, ids)[mismatch], ref_lp[mismatch], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Construction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", [-1, 1, "whs"])
def test_shapes_and_dtypes(model, batch, layer, dtype):
    _, hs, _ = batch
    heads = _heads(model, layer=layer)
    if dtype != torch.float32:
        half = MTPHeads.for_model(model, num_heads=H, kind="transformer", layer=layer, dtype=dtype)
        half.load_state_dict(heads.state_dict())
        assert all(p.dtype == dtype for n, p in half.blocks.named_parameters())
    else:
        half = heads
    with torch.no_grad():
        logits = half(hs)
    assert logits.shape == (B, S, H, VOCAB) and logits.dtype == dtype
    lp, top = half.draft(hs, 4)
    assert lp.shape == (B, S, H, 4) and lp.dtype == torch.float32
    assert top.shape == (B, S, H, 4) and top.dtype == torch.int64
    assert (lp <= 0).all() and (lp[..., :-1] >= lp[..., 1:]).all()
    assert ((top >= 0) & (top < VOCAB)).all()
    if dtype != torch.float32:  # bfloat16 agrees with float32 on the top-1 in most positions
        _, top32 = heads.draft(hs, 4)
        assert (top[..., 0] == top32[..., 0]).float().mean() > 0.7


def test_fresh_blocks_are_independent_copies_of_last_layer(model, batch):
    ids, hs, _ = batch
    heads = MTPHeads.for_model(model, num_heads=H, kind="transformer", layer=1)
    last = model.model.layers[-1].state_dict()
    state = heads.state_dict()
    assert set(state) == {f"blocks.{h}.{k}" for h in range(H) for k in last}
    assert "blocks.0.self_attn.q_proj.weight" in state
    for h in range(H):
        for k, v in last.items():
            assert torch.equal(state[f"blocks.{h}.{k}"], v), k
            assert state[f"blocks.{h}.{k}"].data_ptr() != v.data_ptr(), k
    # The rotary module is used, not registered: not a submodule, not saved, not trained.
    assert not any("rotary" in n for n, _ in heads.named_modules())
    backbone = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in backbone for p in heads.parameters())
    assert all(p.requires_grad for p in heads.parameters())
    # Training the heads changes the blocks, never the backbone.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(heads.parameters(), lr=0.5)
    targets = MTPHeads.teacher_tokens(ids, H + 1)[..., 1:]
    loss = torch.nn.functional.cross_entropy(heads(hs).flatten(0, -2), targets.flatten())
    loss.backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    assert not torch.equal(heads.blocks[0].self_attn.q_proj.weight, last["self_attn.q_proj.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_fresh_heads_on_last_layer_input_reproduce_backbone(model, batch):
    """Fed the last decoder layer's input (hidden state L - 1), a fresh head computes exactly
    the backbone's last layer, final norm and lm_head: the backbone's own next-token logits."""
    _, hs, logits = batch
    heads = MTPHeads.for_model(model, num_heads=H, kind="transformer", layer=LAYERS - 1)
    with torch.no_grad():
        out = heads(hs)
    for h in range(H):
        torch.testing.assert_close(out[..., h, :], logits, rtol=1e-5, atol=1e-5)


def test_constructor_and_input_errors(model, batch):
    _, hs, _ = batch
    config = MTPHeadsConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB, kind="transformer")
    with pytest.raises(ValueError, match="decoder_layer"):
        MTPHeads(config, model.lm_head.weight, model.model.norm.weight)
    with pytest.raises(ValueError, match="rotary"):
        MTPHeads(config, model.lm_head.weight, decoder_layer=model.model.layers[-1])
    heads = _heads(model)
    with pytest.raises(ValueError, match=r"sequence axis \[B, S, 64\], got shape \[9, 64\]"):
        heads(hs[-1][0])
    with pytest.raises(ValueError, match="sequence axis"):
        heads.draft(hs[-1][0], 2)
    with pytest.raises(ValueError, match=r"features must have shape \[P, 192\]"):
        heads.draft_step(1, hs[-1][0], None, 2)  # [P, D]: transformer heads take [P, H * D]
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[2, 1, 9, 9\]"):
        heads.block_outputs(hs, attention_mask=torch.zeros(2, 1, 9, 8))
    with pytest.raises(ValueError, match="position_ids"):
        heads.draft(hs, 2, position_ids=torch.arange(S + 1))
    resblock = MTPHeads.for_model(model, num_heads=2)
    with pytest.raises(ValueError, match="kind='transformer'"):
        resblock.new_draft_state()
    with pytest.raises(ValueError, match="kind='transformer'"):
        resblock.draft(hs, 2, state=heads.new_draft_state())


# ------------------------------------------------------------------------------------------------
# Computation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [-1, 1, "whs"])
def test_forward_equals_prefix_reference(model, batch, layer):
    _, hs, _ = batch
    heads = _heads(model, layer=layer)
    with torch.no_grad():
        got = heads(hs)
        want = _prefix_reference(model, heads, hs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The heads differ from each other (independent blocks).
    assert not torch.allclose(got[..., 0, :], got[..., 1, :])


def test_causal(model, batch):
    """Changing the features at positions >= 5 leaves the logits at positions < 5 unchanged."""
    _, hs, _ = batch
    heads = _heads(model, layer=1)
    changed = tuple(h.clone() for h in hs)
    changed[1][:, 5:] += torch.randn(changed[1][:, 5:].shape, generator=torch.Generator())
    with torch.no_grad():
        a, b = heads(hs), heads(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("layer", [-1, "whs"])
def test_draft_equals_topk_of_forward(model, batch, layer):
    _, hs, _ = batch
    heads = _heads(model, layer=layer)
    with torch.no_grad():
        logits = heads(hs)
    lp, top = heads.draft(hs, 6)
    _assert_topk_matches(lp, top, logits, 6)


def test_incremental_draft_equals_full(model, batch):
    """Feeding the sequence in pieces through the per-head key/value caches gives the full-sequence
    draft at every position; cropping the caches and re-feeding gives it again."""
    _, hs, _ = batch
    heads = _heads(model, layer="whs")
    full_lp, full_ids = heads.draft(hs, 5)
    state = heads.new_draft_state()
    assert isinstance(state, TransformerDraftState) and len(state.caches) == H
    pieces = [(0, 4), (4, 5), (5, 6), (6, S)]
    lps, idss = [], []
    for a, b in pieces:
        lp, ids = heads.draft(tuple(h[:, a:b] for h in hs), 5, state=state)
        assert lp.shape == (B, b - a, H, 5)
        lps.append(lp)
        idss.append(ids)
        assert state.length == b
    torch.testing.assert_close(torch.cat(lps, 1), full_lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(idss, 1), full_ids)
    # Rejected positions: crop back to 5, feed positions 5.. again (explicit position ids).
    state.crop(5)
    assert state.length == 5
    lp, ids = heads.draft(tuple(h[:, 5:] for h in hs), 5, state=state,
                          position_ids=torch.arange(5, S))
    torch.testing.assert_close(lp[:, -1], full_lp[:, -1], rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, full_ids[:, 5:])


@pytest.mark.parametrize("layer", [-1, 1])
def test_draft_vocab(model, batch, layer):
    _, hs, _ = batch
    n = 50
    heads = _heads(model, layer=layer, draft_vocab_size=n)
    chosen = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:n]
    heads.set_draft_vocab(chosen)
    with torch.no_grad():
        logits = heads(hs)
        # The same blocks over the whole vocabulary: the chosen columns of their logits.
        unrestricted = MTPHeads.for_model(model, num_heads=H, kind="transformer", layer=layer)
        unrestricted.blocks.load_state_dict(heads.blocks.state_dict())
        torch.testing.assert_close(logits, unrestricted(hs)[..., chosen], rtol=1e-5, atol=1e-5)
    assert logits.shape == (B, S, H, n)
    lp, top = heads.draft(hs, 5)
    assert torch.isin(top, chosen).all()
    cols = heads.draft_index(top)
    assert (cols >= 0).all() and torch.equal(chosen[cols], top)
    _assert_topk_matches(lp, cols, logits, 5)


def test_save_load_round_trip_and_wrong_backbone(model, batch, tmp_path):
    _, hs, _ = batch
    heads = _heads(model, layer="whs", draft_vocab_size=40)
    heads.set_draft_vocab(torch.arange(VOCAB - 40, VOCAB))
    heads.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "heads.safetensors")
    assert "blocks.0.self_attn.q_proj.weight" in saved
    assert f"blocks.{H - 1}.mlp.up_proj.weight" in saved
    assert not any(k.startswith(("lm_head", "norm_weight", "embed", "_rotary")) for k in saved)
    assert set(saved) == set(heads.state_dict())
    loaded = MTPHeads.from_pretrained(tmp_path, model)
    assert loaded.config.kind == "transformer"
    with torch.no_grad():
        assert torch.equal(heads(hs), loaded(hs))
    a, b = heads.draft(hs, 4), loaded.draft(hs, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Blocks rebuilt from the loading model, then overwritten by the saved weights.
    assert not torch.equal(
        loaded.blocks[0].self_attn.q_proj.weight, model.model.layers[-1].self_attn.q_proj.weight
    )
    with pytest.raises(ValueError, match="hidden_size"):
        MTPHeads.from_pretrained(tmp_path, _tiny_llama(hidden=32))
    named = _tiny_llama(name="org/backbone-a")
    MTPHeads.for_model(named, num_heads=2, kind="transformer").save_pretrained(tmp_path / "n")
    with pytest.raises(ValueError, match="backbone-a"):
        MTPHeads.from_pretrained(tmp_path / "n", _tiny_llama(name="org/backbone-b"))


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

TR_VOCAB, TR_HIDDEN, SEQ = 200, 32, 32


def _cycle_texts(n_seqs, seed):
    """``n_seqs`` sequences of SEQ tokens following one fixed cycle of 16 tokens, random phase."""
    return cycle_texts(TR_VOCAB, SEQ, n_seqs, seed)


@pytest.fixture(scope="module")
def small_model():
    return tiny_llama(TR_VOCAB, TR_HIDDEN, 64, LAYERS, 0)


def _cfg(**kw):
    base = dict(
        steps=10, seq_len=SEQ, target="text", batch_positions=64, lr=1e-2, warmup_steps=2,
        eval_every=0, progress=False, seed=0,
    )
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.mark.parametrize("layer", [-1, "whs"])
def test_heads_forward_gathers_sequence_logits(small_model, layer):
    """The trainer's position sampling: logits at (s, t) equal the whole-sequence forward's, and
    the evaluation does not depend on how the positions are chunked."""
    heads = MTPHeads.for_model(small_model, num_heads=2, kind="transformer", layer=layer)
    ids = _cycle_texts(4, seed=5)
    with pytest.warns(UserWarning, match="WHS") if layer == "whs" else _nullctx():
        cache = T.build_cache(small_model, heads, ids, _cfg())
    s, t = torch.tensor([2, 0, 2, 3, 0]), torch.tensor([4, 0, 29, 7, 11])
    with torch.no_grad():
        got = heads_forward(heads, cache["feat"], cache["ids"], s, t)
        feat = cache["feat"]
        full = heads(tuple(feat) if layer == "whs" else feat)
    assert got.shape == (5, 2, TR_VOCAB)
    torch.testing.assert_close(got, full[s, t], rtol=1e-5, atol=1e-5)
    small = T.evaluate(heads, cache, _cfg(eval_batch=7))
    large = T.evaluate(heads, cache, _cfg(eval_batch=1000))
    for key in ("top1_text", "top5_greedy", "loss"):
        torch.testing.assert_close(small[key], large[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer,target", [(-1, "text"), ("whs", "kl")])
def test_transformer_heads_train(small_model, layer, target):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    tr, va = _cycle_texts(24, seed=1), _cycle_texts(4, seed=2)
    heads = MTPHeads.for_model(small_model, num_heads=2, kind="transformer", layer=layer)
    with pytest.warns(UserWarning, match="WHS") if layer == "whs" else _nullctx():
        out = T.train_heads(small_model, None, heads, tr, va, _cfg(target=target))
    losses = out["history"]["loss"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert len(out["final"]["top1_text"]) == 2
    for k, v in small_model.state_dict().items():
        assert torch.equal(v, before[k]), k


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
