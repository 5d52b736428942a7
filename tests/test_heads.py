"""MTP heads (``mtp_ext.heads``) on a tiny random-weight transformers Llama.

Vocabulary 1000, hidden 64, 2 layers, tied embeddings: shapes and dtypes for every kind and input
choice, the wiring of a fresh residual head (equals the backbone's next-token logits), the fused
draft against the training path, draft vocabularies, conditioned chaining, WHS, save/load and
frozen shared weights.
"""

from __future__ import annotations

import json

import pytest
import torch

from mtp_ext import reference
from helpers import tiny_llama

from mtp_ext.heads import MTPHeads, MTPHeadsConfig


VOCAB, HIDDEN, LAYERS = 1000, 64, 2
H = 3
KINDS = ["resblock", "linear", "conditioned"]
LAYER_CHOICES = [-1, 1, 0, "whs"]


def _tiny_llama(hidden=HIDDEN, seed=0, name=""):
    return tiny_llama(VOCAB, hidden, 128, LAYERS, seed, name)


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def batch(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return ids, out.hidden_states, out.logits


def _perturb(heads, seed=0, scale=0.05):
    """Random non-zero head parameters (a fresh head is too trivial to test most things on)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in heads.named_parameters():
            if name != "whs_logits":
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return heads


def _next_tokens(heads, ids, per_head):
    if heads.config.kind != "conditioned":
        return None
    tt = MTPHeads.teacher_tokens(ids, H)
    return tt if per_head else tt[..., 0]


@pytest.mark.parametrize("layer", LAYER_CHOICES)
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_dtypes(model, batch, kind, layer):
    ids, hs, _ = batch
    heads = MTPHeads.for_model(model, num_heads=H, kind=kind, layer=layer)
    _perturb(heads)
    logits = heads(hs, _next_tokens(heads, ids, per_head=True))
    assert logits.shape == (2, 9, H, VOCAB) and logits.dtype == torch.float32
    lp, top = heads.draft(hs, 4, _next_tokens(heads, ids, per_head=False))
    assert lp.shape == (2, 9, H, 4) and lp.dtype == torch.float32
    assert top.shape == (2, 9, H, 4) and top.dtype == torch.int64
    assert (lp <= 0).all() and (lp[..., :-1] >= lp[..., 1:]).all()
    assert ((top >= 0) & (top < VOCAB)).all()


def test_transformer_kind_available(model, batch):
    """The transformer kind (tested in test_heads_transformer.py) is accepted; it needs a sequence
    axis, so it is not part of this file's KINDS."""
    _, hs, _ = batch
    MTPHeadsConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB, kind="transformer")
    heads = MTPHeads.for_model(model, num_heads=2, kind="transformer")
    assert heads(hs).shape == (2, 9, 2, VOCAB)


def test_bad_config():
    with pytest.raises(ValueError, match="kind"):
        MTPHeadsConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB, kind="nope")
    with pytest.raises(ValueError, match="layer"):
        MTPHeadsConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB, layer=5, num_layers=2)
    with pytest.raises(ValueError, match="num_layers"):
        MTPHeadsConfig(num_heads=2, hidden_size=HIDDEN, vocab_size=VOCAB, layer="whs")


@pytest.mark.parametrize("layer", [-1, LAYERS])
def test_fresh_resblock_equals_backbone(model, batch, layer):
    """Zero-initialized residual heads on the last (already normed) hidden state give exactly
    the backbone's own next-token logits at that position, for every head."""
    _, hs, logits = batch
    heads = MTPHeads.for_model(model, num_heads=H, kind="resblock", layer=layer)
    out = heads(hs)
    for h in range(H):
        torch.testing.assert_close(out[..., h, :], logits, rtol=1e-5, atol=1e-5)
    lp, top = heads.draft(hs, 5)
    ref_lp, ref_ids = reference.stable_topk(torch.log_softmax(logits.float(), -1), 5)
    torch.testing.assert_close(lp[..., 0, :], ref_lp, rtol=1e-5, atol=1e-5)
    assert torch.equal(top[..., 0, :], ref_ids)


def test_fresh_resblock_earlier_layer_applies_final_norm(model, batch):
    """On an earlier layer the final norm is applied: a fresh head equals lm_head(norm(h_l))."""
    _, hs, _ = batch
    heads = MTPHeads.for_model(model, num_heads=1, kind="resblock", layer=1)
    with torch.no_grad():
        expect = model.lm_head(model.model.norm(hs[1]))
    torch.testing.assert_close(heads(hs)[..., 0, :], expect, rtol=1e-5, atol=1e-5)


def _assert_topk_matches(lp, ids, logits, k):
    """``(lp, ids)`` is the top-k of log_softmax(logits): values close, ids equal except where
    the reference has a near-tie (then the id's own log-prob must match the value)."""
    full = torch.log_softmax(logits.float(), -1)
    ref_lp, ref_ids = reference.stable_topk(full, k)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-4)
    mismatch = ids != ref_ids
    if mismatch.any():
        own = full.gather(-1, ids)
        assert torch.allclose(own[mismatch], ref_lp[mismatch], atol=1e-4)


@pytest.mark.parametrize("layer", [-1, 1, "whs"])
@pytest.mark.parametrize("kind", KINDS)
def test_draft_equals_topk_of_forward(model, batch, kind, layer):
    ids, hs, _ = batch
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind=kind, layer=layer))
    if layer == "whs":
        with torch.no_grad():
            heads.whs_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
    # Conditioned: forward with next_tokens[...] chains through its argmax, as draft does.
    nt = _next_tokens(heads, ids, per_head=False)
    with torch.no_grad():
        logits = heads(hs, nt)
    lp, top = heads.draft(hs, 6, nt)
    _assert_topk_matches(lp, top, logits, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_draft_vocab(model, batch, kind):
    ids, hs, _ = batch
    n = 50
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind=kind, draft_vocab_size=n))
    chosen = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:n]
    heads.set_draft_vocab(chosen)
    nt = _next_tokens(heads, ids, per_head=False)
    with torch.no_grad():
        logits = heads(hs, nt)
    assert logits.shape == (2, 9, H, n)
    lp, top = heads.draft(hs, 5, nt)
    assert torch.isin(top, chosen).all()
    # Same ranking as the logits over the chosen rows, mapped to full-vocabulary ids.
    ref_lp, ref_cols = reference.stable_topk(torch.log_softmax(logits.float(), -1), 5)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-4)
    cols = heads.draft_index(top)
    assert (cols >= 0).all()
    _assert_topk_matches(lp, cols, logits, 5)  # ids exactly, or near-ties
    assert torch.equal(chosen[cols], top)
    # draft_index maps full ids back to the logits' columns; outside the set is -100.
    assert torch.equal(heads.draft_index(chosen), torch.arange(n))
    outside = torch.tensor([i for i in range(VOCAB) if i not in set(chosen.tolist())][:3])
    assert (heads.draft_index(outside) == -100).all()
    if kind == "resblock":  # fresh residual heads with a draft vocab: the backbone's logits
        fresh = MTPHeads.for_model(model, num_heads=1, kind="resblock", draft_vocab_size=n)
        fresh.set_draft_vocab(chosen)
        _, top1 = fresh.draft(hs, 1)
        expect = chosen[batch[2][..., chosen].argmax(-1)]
        assert torch.equal(top1[..., 0, 0], expect)


def test_set_draft_vocab_checks(model):
    heads = MTPHeads.for_model(model, num_heads=1, draft_vocab_size=4)
    with pytest.raises(ValueError, match="draft_vocab_size=4"):
        heads.set_draft_vocab([1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        heads.set_draft_vocab([1, 1, 2, 3])
    with pytest.raises(ValueError, match="vocab_size"):
        heads.set_draft_vocab([1, 2, 3, VOCAB])


def test_conditioned_depends_on_next_token(model, batch):
    ids, hs, _ = batch
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind="conditioned"))
    tt = MTPHeads.teacher_tokens(ids, H)
    with torch.no_grad():
        a = heads(hs, tt)
        changed = tt.clone()
        changed[..., 0] = (changed[..., 0] + 1) % VOCAB
        b = heads(hs, changed)
        # Changing only the depth-2 token leaves head 1 alone and changes heads 2..H.
        changed2 = tt.clone()
        changed2[..., 1] = (changed2[..., 1] + 7) % VOCAB
        c = heads(hs, changed2)
    assert not torch.allclose(a[..., 0, :], b[..., 0, :])
    torch.testing.assert_close(a[..., 0, :], c[..., 0, :])
    assert not torch.allclose(a[..., 1, :], c[..., 1, :])
    with pytest.raises(ValueError, match="next_tokens"):
        heads(hs)
    with pytest.raises(ValueError, match="next_tokens"):
        heads.draft(hs, 2)


def test_conditioned_chain_uses_top1(model, batch):
    """Drafting chains through head d's top-1: teacher forcing with the drafted top-1 tokens
    reproduces the draft exactly."""
    ids, hs, _ = batch
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind="conditioned", layer=1))
    root = ids
    lp, top = heads.draft(hs, 3, root)
    forced = torch.cat([root.unsqueeze(-1), top[..., :-1, 0]], -1)  # [B, T, H]
    with torch.no_grad():
        logits = heads(hs, forced)
    _assert_topk_matches(lp, top, logits, 3)
    # And a different top-1 would change the next depth: force another token at depth 2.
    other = forced.clone()
    other[..., 1] = (other[..., 1] + 1) % VOCAB
    with torch.no_grad():
        logits2 = heads(hs, other)
    assert not torch.allclose(logits[..., 1, :], logits2[..., 1, :])


def test_teacher_tokens():
    ids = torch.arange(10, 16).view(1, 6)
    tt = MTPHeads.teacher_tokens(ids, 2, pad_id=0)
    assert tt.shape == (1, 6, 2)
    assert tt[0, :, 0].tolist() == [11, 12, 13, 14, 15, 0]
    assert tt[0, :, 1].tolist() == [12, 13, 14, 15, 0, 0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_whs_softmax_and_trainable(model, batch, per_channel):
    ids, hs, _ = batch
    heads = MTPHeads.for_model(
        model, num_heads=2, kind="resblock", layer="whs", whs_per_channel=per_channel
    )
    w = heads.whs_weights()
    assert w.shape == ((LAYERS + 1, HIDDEN) if per_channel else (LAYERS + 1,))
    torch.testing.assert_close(w.sum(0), torch.ones_like(w.sum(0)))
    # Fresh: a uniform average of all hidden states.
    expect = sum(h for h in hs) / len(hs)
    torch.testing.assert_close(heads.select_input(hs), expect, rtol=1e-5, atol=1e-5)
    assert heads.whs_logits.requires_grad
    loss = torch.nn.functional.cross_entropy(heads(hs).flatten(0, -2), ids.repeat_interleave(2))
    loss.backward()
    assert heads.whs_logits.grad is not None and heads.whs_logits.grad.abs().sum() > 0
    opt = torch.optim.SGD([heads.whs_logits], lr=10.0)
    opt.step()
    w2 = heads.whs_weights()
    assert not torch.allclose(w, w2)
    torch.testing.assert_close(w2.sum(0), torch.ones_like(w2.sum(0)))


@pytest.mark.parametrize(
    "kind,layer,vocab", [("resblock", -1, None), ("conditioned", "whs", 40), ("linear", 1, None)]
)
def test_save_load_round_trip(model, batch, tmp_path, kind, layer, vocab):
    ids, hs, _ = batch
    heads = _perturb(
        MTPHeads.for_model(model, num_heads=H, kind=kind, layer=layer, draft_vocab_size=vocab)
    )
    if vocab:
        heads.set_draft_vocab(torch.arange(VOCAB - vocab, VOCAB))
    if layer == "whs":
        with torch.no_grad():
            heads.whs_logits.copy_(torch.tensor([0.1, 0.7, -0.4]))
    heads.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "heads.safetensors")
    assert not any(k in saved for k in ("lm_head_weight", "norm_weight", "embed_weight"))
    assert ("vocab_ids" in saved) == bool(vocab)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kind"] == kind and config["layer"] == layer
    assert config["hidden_size"] == HIDDEN and config["vocab_size"] == VOCAB

    loaded = MTPHeads.from_pretrained(tmp_path, model)
    nt = _next_tokens(heads, ids, per_head=False)
    with torch.no_grad():
        assert torch.equal(heads(hs, nt), loaded(hs, nt))
    a, b = heads.draft(hs, 4, nt), loaded.draft(hs, 4, nt)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_load_onto_wrong_backbone(model, tmp_path):
    heads = MTPHeads.for_model(model, num_heads=2)
    heads.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size"):
        MTPHeads.from_pretrained(tmp_path, _tiny_llama(hidden=32))
    # A recorded backbone name must match too.
    named = _tiny_llama(name="org/backbone-a")
    MTPHeads.for_model(named, num_heads=2).save_pretrained(tmp_path / "named")
    with pytest.raises(ValueError, match="backbone-a"):
        MTPHeads.from_pretrained(tmp_path / "named", _tiny_llama(name="org/backbone-b"))
    MTPHeads.from_pretrained(tmp_path / "named", named)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_only_to_heads(batch, kind):
    model = _tiny_llama()
    ids, hs, _ = batch
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind=kind, layer=1))
    logits = heads(hs, _next_tokens(heads, ids, per_head=True))
    targets = MTPHeads.teacher_tokens(ids, H + 1)[..., 1:]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())
    loss.backward()
    for name, p in heads.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The shared backbone tensors are buffers, not parameters, and receive nothing.
    names = {n for n, _ in heads.named_parameters()}
    assert not names & {"lm_head_weight", "norm_weight", "embed_weight"}
    assert model.lm_head.weight.grad is None
    assert model.model.embed_tokens.weight.grad is None
    assert model.model.norm.weight.grad is None
    # ...and share the backbone's storage (no copy).
    assert heads.lm_head_weight.data_ptr() == model.lm_head.weight.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_heads(model, batch, kind):
    """Heads in bfloat16 (the backbone's tensors cast per call): draft runs and agrees with the
    float32 heads on the top-1 in most positions."""
    ids, hs, _ = batch
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind=kind))
    half = MTPHeads.for_model(model, num_heads=H, kind=kind, dtype=torch.bfloat16)
    half.load_state_dict(heads.state_dict())
    nt = _next_tokens(heads, ids, per_head=False)
    lp, top = half.draft(hs, 3, nt)
    assert lp.dtype == torch.float32 and top.dtype == torch.int64
    assert half(hs, _next_tokens(heads, ids, per_head=True)).dtype == torch.bfloat16
    _, top32 = heads.draft(hs, 3, nt)
    assert (top[..., 0, 0] == top32[..., 0, 0]).float().mean() > 0.7


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [None, 300])
def test_draft_step_chain_equals_draft(model, batch, kind, vocab):
    """Chaining draft_step through each head's top-1 gives what draft gives (all kinds)."""
    ids, hs, _ = batch
    heads = _perturb(MTPHeads.for_model(model, num_heads=H, kind=kind, draft_vocab_size=vocab))
    x = heads.select_input(hs).reshape(-1, HIDDEN)
    nxt = torch.randint(0, VOCAB, (x.shape[0],), generator=torch.Generator().manual_seed(3))
    want_lp, want_ids = heads.draft(x, 4, next_tokens=nxt if kind == "conditioned" else None)
    f, tok = x, nxt
    for d in range(1, H + 1):
        f, lp, got = heads.draft_step(d, f, tok, 4)
        assert lp.shape == (x.shape[0], 4) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, want_lp[:, d - 1], atol=1e-5, rtol=1e-5)
        assert torch.equal(got, want_ids[:, d - 1])
        tok = got[:, 0]
    with pytest.raises(ValueError, match="depth must be in"):
        heads.draft_step(0, x, nxt, 4)
    with pytest.raises(ValueError, match="features must have shape"):
        heads.draft_step(1, x[:, :5], nxt, 4)


def test_draft_table_follows_changes_of_the_weight_and_the_vocabulary():
    """The gathered draft-vocabulary table is cached, and rebuilt when the output layer changes in
    place, when it is replaced, and when the draft vocabulary changes."""
    m = _tiny_llama(seed=7)
    heads = MTPHeads.for_model(m, 2, kind="linear", draft_vocab_size=50)
    heads.set_draft_vocab(torch.arange(100, 150))
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))

    assert not heads._applies_norm  # the last layer's states are normed already

    def expected():  # from the current weight and vocabulary, not through the cached table
        z = torch.einsum("nd,hed->nhe", x, heads.weight)
        logits = z @ heads.lm_head_weight[heads.vocab_ids].T
        return reference.stable_topk(torch.log_softmax(logits.float(), -1), 4)

    def drafted():
        lp, ids = heads.draft(x, 4)
        return lp, ids - 100  # back to columns of the draft vocabulary

    first = heads._table()
    assert heads._table() is first  # cached
    with torch.no_grad():
        heads.lm_head_weight[120:125] *= 3.0  # in place: version bump
    assert heads._table() is not first
    torch.testing.assert_close(drafted()[0], expected()[0])
    assert torch.equal(drafted()[1], expected()[1])
    heads.lm_head_weight = heads.lm_head_weight.clone() * -1.0  # replaced
    assert torch.equal(drafted()[1], expected()[1])
    heads.set_draft_vocab(torch.arange(300, 350))  # another vocabulary
    lp, ids = heads.draft(x, 4)
    assert torch.equal(ids, heads.vocab_ids[expected()[1]])
    torch.testing.assert_close(lp, expected()[0])
