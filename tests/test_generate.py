"""``mtp_ext.generate`` against ``model.generate`` on tiny random-weight models.

Greedy: token-for-token equality for every tree shape and head kind, batch 1 and left-padded
batches with rows of different lengths, EOS inside a tree, the reference backend. Sampling: the
empirical distribution of the first new tokens over many rows matches the exact distribution of
plain sampling from the model (computed from the model's logits), and two lossy verifiers fail the
same test. Bad input and unsupported arguments raise errors that name them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import (decoding_llama, left_padded_prompts, perturbed_heads, tiny_causal_lm,
                     word_tokenizer)

import mtp_ext
from mtp_ext import reference
from mtp_ext.decoding import MTPModel, generate
from mtp_ext.heads import MTPHeads
from mtp_ext.trees import DynamicTree

transformers = pytest.importorskip("transformers")

VOCAB = 120
TREES = [1, "chain", 6, 16, [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)], DynamicTree(12, width=2)]


def _model(vocab=VOCAB, seed=0):
    return decoding_llama(vocab, seed)


def _heads(model, kind="conditioned", seed=0, scale=0.05):
    return perturbed_heads(model, kind, seed, scale)


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(B, P, seed, pad_rows=()):
    return left_padded_prompts(VOCAB, B, P, seed, pad_rows)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: str(t)[:20])
@pytest.mark.parametrize("kind", ["conditioned", "resblock", "linear"])
def test_greedy_batch1_equals_model_generate(model, kind, tree):
    heads = _heads(model, kind)
    ids, _ = _prompts(1, 7, seed=1)
    want = model.generate(ids, max_new_tokens=48, do_sample=False)
    for lookup in (0, 8):
        out = generate(model, ids, heads, max_new_tokens=48, do_sample=False, tree=tree,
                       prompt_lookup_num_tokens=lookup, return_dict_in_generate=True)
        assert torch.equal(out.sequences, want), lookup
        assert int(out.new_tokens.sum()) == 48
        if tree == 1 and lookup == 0:
            assert out.steps == 47 and out.tokens_per_step == 1.0


def test_trees_accept_drafts_when_heads_agree(model):
    """Heads that copy the backbone's own next step accept more than one token per step: a
    wiring check (a loop that never accepts would still be 'correct')."""
    heads = MTPHeads.for_model(model, 3, kind="resblock")  # fresh: head h predicts what the
    ids, _ = _prompts(1, 5, seed=2)  # backbone predicts next, right whenever the text repeats
    want = model.generate(ids, max_new_tokens=64, do_sample=False)
    out = generate(model, ids, heads, max_new_tokens=64, tree=16, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert out.accepted_histogram.sum() == out.steps
    # the tiny random model falls into a loop, which the draft tree then follows
    assert out.tokens_per_step > 1.2, out.tokens_per_step


@pytest.mark.parametrize("tree", [1, "chain", 8, DynamicTree(16, width=4)], ids=str)
def test_greedy_left_padded_batch(model, tree):
    heads = _heads(model)
    ids, mask = _prompts(4, 9, seed=3, pad_rows=[(0, 4), (2, 2), (3, 8)])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = generate(model, ids, heads, attention_mask=mask, max_new_tokens=40, tree=tree)
    assert torch.equal(got, want)


@pytest.mark.parametrize("tree", [1, 8, "chain"], ids=str)
def test_eos_inside_tree_and_padding(model, tree):
    heads = _heads(model)
    ids, mask = _prompts(3, 6, seed=4, pad_rows=[(1, 3)])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    for eos in {int(free[0, 6 + 3]), int(free[2, 6 + 11])}:
        want = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False,
                              eos_token_id=eos, pad_token_id=0)
        got = generate(model, ids, heads, attention_mask=mask, max_new_tokens=30, tree=tree,
                       eos_token_id=eos, pad_token_id=0)
        assert torch.equal(got, want), eos
        assert got.shape[1] < 36 or (got[:, 6:] == eos).any(1).sum() < 3


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("layer", [-1, 1])
def test_other_architectures(arch, layer):
    """Qwen2 and Gemma 3 (sliding-window layers: 60 new tokens cross the window of 24, soft-capped
    logits, (1 + w) final norm) decode like model.generate, in padded batches."""
    m = tiny_causal_lm(arch)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    heads = perturbed_heads(m, "conditioned", layer=layer)
    ids, mask = _prompts(3, 7, seed=11, pad_rows=[(0, 3)])
    want = m.generate(ids, attention_mask=mask, max_new_tokens=60, do_sample=False)
    for tree in (1, 8, "chain"):
        got = generate(m, ids, heads, attention_mask=mask, max_new_tokens=60, tree=tree)
        assert torch.equal(got, want), tree


@pytest.mark.parametrize("tree", [6, "chain", [(0,), (1,), (0, 0), (0, 0, 0)]], ids=str)
@pytest.mark.parametrize("layer", [-1, 1])
def test_transformer_heads_decode_like_model_generate(model, tree, layer):
    """"transformer" heads (a decoder block per head, with their own key/value caches kept in
    step with the backbone's) in single prompts and a left-padded batch."""
    heads = perturbed_heads(model, "transformer", seed=3, scale=0.02, layer=layer)
    ids, mask = _prompts(3, 9, seed=12, pad_rows=[(0, 4), (2, 1)])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = generate(model, ids, heads, attention_mask=mask, max_new_tokens=40, tree=tree)
    assert torch.equal(got, want)
    one = generate(model, ids[1:2], heads, max_new_tokens=40, tree=tree)
    assert torch.equal(one, model.generate(ids[1:2], max_new_tokens=40, do_sample=False))


def _gemma_with_sliding_last_layer():
    """A tiny Gemma 3 whose last layer (the one transformer heads copy) has a sliding window of
    12, so that 40 new tokens cross it."""
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, num_hidden_layers=2, sliding_window=12,
        layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(5)
        m = transformers.Gemma3ForCausalLM(config).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.mark.parametrize("case", ["llama-last", "llama-layer1", "gemma-sliding-head"])
def test_transformer_heads_features_follow_the_accepted_sequence(model, case, monkeypatch):
    """After every step, the features the heads draft from (their blocks' outputs at the last
    accepted position, computed incrementally over caches that hold rejected and padded slots)
    equal the blocks run from scratch over the row's accepted sequence; also for heads whose
    block has a sliding window. The decoded tokens equal model.generate's."""
    from mtp_ext.heads.transformer import SequenceFeatures

    if case == "gemma-sliding-head":
        model, layer = _gemma_with_sliding_last_layer(), -1
        assert SequenceFeatures(MTPHeads.for_model(model, 1, kind="transformer")).window == 12
    else:
        layer = -1 if case == "llama-last" else 1
    heads = perturbed_heads(model, "transformer", seed=4, scale=0.02, layer=layer)
    ids, mask = _prompts(2, 8, seed=13, pad_rows=[(1, 3)])
    seen = []  # (features [B, H, D], position of the last accepted token [B])
    original = SequenceFeatures.after_step

    def recording(self, heads_, out, path, num_acc, keep, slots, next_pos, tokens=None):
        feature = original(self, heads_, out, path, num_acc, keep, slots, next_pos, tokens)
        seen.append((feature.clone(), next_pos + num_acc))
        return feature

    monkeypatch.setattr(SequenceFeatures, "after_step", recording)
    out = generate(model, ids, heads, attention_mask=mask, max_new_tokens=30, tree=8,
                   return_dict_in_generate=True)
    assert torch.equal(out.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=30,
                                                     do_sample=False))
    assert len(seen) == out.steps and out.tokens_per_step > 1.0  # some drafts were accepted
    checked = 0
    for b in range(2):
        seq = out.sequences[b][torch.cat([mask[b].bool(), torch.ones(30, dtype=torch.bool)])]
        with torch.no_grad():
            hs = model(seq[None], output_hidden_states=True).hidden_states
            full = heads.block_outputs(hs)[0]  # [L, H, D], causal over the whole row
        for feature, pos in seen:
            p = int(pos[b])
            if p < seq.numel():
                torch.testing.assert_close(feature[b], full[p], rtol=1e-4, atol=1e-4)
                checked += 1
    assert checked >= out.steps


def test_gemma_final_norm_is_one_plus_weight():
    m = tiny_causal_lm("gemma3")
    with torch.no_grad():
        m.model.norm.weight.normal_()
    heads = MTPHeads.for_model(m, 1, kind="resblock", layer=1)
    x = torch.randn(2, 48)
    with torch.no_grad():  # a fresh residual head is the identity: logits = lm_head(norm(x))
        torch.testing.assert_close(heads(x)[:, 0], m.lm_head(m.model.norm(x)), atol=1e-4, rtol=1e-4)


def test_reference_backend_gives_same_tokens(model):
    heads = _heads(model)
    ids, mask = _prompts(2, 8, seed=5, pad_rows=[(1, 3)])
    a = generate(model, ids, heads, attention_mask=mask, max_new_tokens=32, tree=8)
    b = generate(model, ids, heads, attention_mask=mask, max_new_tokens=32, tree=8,
                 backend="reference")
    assert torch.equal(a, b)


def test_mtp_model_wrapper_and_defaults_from_generation_config(model):
    heads = _heads(model)
    ids, _ = _prompts(1, 5, seed=6)
    wrapped = MTPModel(model, heads, tree=6)
    model.generation_config.max_new_tokens = 17
    try:
        want = model.generate(ids, do_sample=False)
        got = wrapped.generate(ids, do_sample=False)
    finally:
        model.generation_config.max_new_tokens = None
    assert torch.equal(got, want) and got.shape[1] == 5 + 17
    assert wrapped.config is model.config  # everything else is the model's own


def test_max_length_and_generation_config_as_in_model_generate(model):
    """``max_length`` and ``generation_config=`` resolve as in transformers: max_new_tokens (the
    call's, then the config's) wins over max_length; the call's arguments override the config."""
    heads = _heads(model)
    ids, _ = _prompts(1, 6, seed=14)
    cases = [
        dict(max_length=6 + 13),
        dict(max_length=6 + 13, max_new_tokens=9),
        dict(generation_config=transformers.GenerationConfig(max_new_tokens=11, do_sample=False)),
        dict(generation_config=transformers.GenerationConfig(max_length=6 + 7), max_new_tokens=15),
        dict(generation_config=transformers.GenerationConfig(max_new_tokens=8), max_length=40),
    ]
    for kw in cases:
        want = model.generate(ids, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
        got = generate(model, ids, heads, do_sample=False, tree=6, **kw)
        assert torch.equal(got, want), kw
    bad = transformers.GenerationConfig(max_new_tokens=4, repetition_penalty=1.2)
    with pytest.raises(ValueError, match="generation_config passed sets repetition_penalty"):
        generate(model, ids, heads, generation_config=bad)


def test_streamer_gets_prompt_then_every_token(model):
    heads = _heads(model)
    ids, _ = _prompts(1, 5, seed=7)
    pushed = []

    class Recorder:
        def put(self, value):
            pushed.append(value.flatten().tolist())

        def end(self):
            pushed.append("end")

    got = generate(model, ids, heads, max_new_tokens=20, tree=8, streamer=Recorder())
    assert pushed[0] == ids[0].tolist() and pushed[-1] == "end"
    assert sum(pushed[1:-1], []) == got[0, 5:].tolist()


def test_cli_generate_compare(tmp_path, capsys):
    from mtp_ext import cli

    m = _model()
    m.save_pretrained(tmp_path / "model")
    word_tokenizer(VOCAB).save_pretrained(tmp_path / "model")
    _heads(m).save_pretrained(tmp_path / "heads")
    rc = cli.main([
        "generate", "--model", str(tmp_path / "model"), "--heads", str(tmp_path / "heads"),
        "--prompt", "w1 w2 w3 w4", "--max-new-tokens", "12", "--tree", "6", "--compare",
        "--no-stream",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "identical tokens: yes" in out and "12 tokens" in out and "speed-up" in out


def test_prompt_lookup_branch():
    from mtp_ext.trees import add_branch, build_tree, lookup_draft

    ctx = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7])
    assert lookup_draft(ctx, 3).tolist() == [1, 2, 6]  # "6 7" last seen before at 6..7 -> 1 2 6
    assert lookup_draft(torch.tensor([1, 2, 3]), 2) is None
    assert lookup_draft(torch.tensor([4, 9, 4]), 3).tolist() == [9, 4, -1]  # context ends first
    tree = build_tree(_heads(_model()), torch.randn(2, 48), torch.tensor([3, 4]), DynamicTree(4, 2))
    big = add_branch(tree, torch.tensor([[1, 2, -1], [7, 8, 9]]))
    assert big.parents[0].tolist()[4:] == [0, 4, 5] and big.depths[1].tolist()[4:] == [1, 2, 3]


def test_lookup_pays_on_repetitive_text(model):
    """A prompt that repeats: the lookup branch is accepted, output still equals generate."""
    heads = _heads(model)
    ids, _ = _prompts(1, 6, seed=12)
    ids = ids.repeat(1, 4)
    want = model.generate(ids, max_new_tokens=40, do_sample=False)
    plain = generate(model, ids, heads, max_new_tokens=40, tree=1, prompt_lookup_num_tokens=0,
                     return_dict_in_generate=True)
    look = generate(model, ids, heads, max_new_tokens=40, tree=1, prompt_lookup_num_tokens=8,
                    return_dict_in_generate=True)
    assert torch.equal(plain.sequences, want) and torch.equal(look.sequences, want)
    assert look.steps < plain.steps


def test_bad_input_and_unsupported_arguments(model):
    heads = _heads(model)
    ids, _ = _prompts(1, 5, seed=8)
    with pytest.raises(TypeError, match="num_beams"):
        generate(model, ids, heads, max_new_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        generate(model, ids.int(), heads, max_new_tokens=3)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        generate(model, ids, heads, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, ids, heads, max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="use_cache"):
        generate(model, ids, heads, max_new_tokens=3, use_cache=False)
    with pytest.raises(TypeError, match="tree must be"):
        generate(model, ids, heads, max_new_tokens=3, tree=2.5)
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(ValueError, match="repetition_penalty"):
            generate(model, ids, heads, max_new_tokens=3)
    finally:
        model.generation_config.repetition_penalty = 1.0
    assert generate(model, ids, heads, max_new_tokens=0).shape == (1, 5)


# ----------------------------------------------------------------------------------------------
# Sampling: lossless in distribution
# ----------------------------------------------------------------------------------------------

SAMPLE_VOCAB = 40
NEW = 3


@pytest.fixture(scope="module")
def sampling_setup():
    m = _model(SAMPLE_VOCAB, seed=3)
    # heads that draft the backbone's own likely tokens, so trees accept often
    heads = MTPHeads.for_model(m, 3, kind="resblock")
    prompt = torch.randint(1, SAMPLE_VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
    return m, heads, prompt


def _exact_distribution(model, prompt, temperature, top_k, top_p) -> dict:
    """P(first NEW tokens) of plain sampling, by enumerating the kept tokens at every step."""
    dist = {(): 1.0}
    for _ in range(NEW):
        seqs = list(dist)
        x = torch.cat([prompt.expand(len(seqs), -1), torch.tensor(seqs, dtype=torch.long).view(len(seqs), -1)], 1)
        with torch.no_grad():
            logits = model(x).logits[:, -1]
        q = reference.filtered_probs(logits, temperature, top_k, top_p)
        new = {}
        for i, s in enumerate(seqs):
            for t in torch.nonzero(q[i] > 0).flatten().tolist():
                new[s + (t,)] = dist[s] * float(q[i, t])
        dist = new
    return dist


def _empirical(model, heads, prompt, n, backend, **kw) -> dict:
    gen = torch.Generator().manual_seed(1234)
    out = generate(model, prompt.expand(n, -1).contiguous(), heads, max_new_tokens=NEW,
                   do_sample=True, generator=gen, backend=backend, tree=8, **kw)
    counts: dict = {}
    for row in out[:, prompt.shape[1]:].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return {k: v / n for k, v in counts.items()}


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def _lossy_uniforms():
    """Verification with skewed uniforms (u^2): a biased sampler."""
    def verify(tokens, parents, logits, temperature, top_k, top_p, uniforms):
        return mtp_ext.verify_tree(tokens, parents, logits, temperature, top_k, top_p,
                                   uniforms if uniforms is None else uniforms ** 2)
    return SimpleNamespace(
        tree_attention_mask=mtp_ext.tree_attention_mask, verify_tree=verify,
        verify_tree_from_hidden=mtp_ext.verify_tree_from_hidden, compact_kv=mtp_ext.compact_kv,
    )


def _lossy_root_logits():
    """Verification that samples every node from the root's distribution (a tree bug)."""
    def verify(tokens, parents, logits, temperature, top_k, top_p, uniforms):
        same = logits[:, :1].expand_as(logits).contiguous()
        return mtp_ext.verify_tree(tokens, parents, same, temperature, top_k, top_p, uniforms)
    return SimpleNamespace(
        tree_attention_mask=mtp_ext.tree_attention_mask, verify_tree=verify,
        verify_tree_from_hidden=mtp_ext.verify_tree_from_hidden, compact_kv=mtp_ext.compact_kv,
    )


SAMPLING = [
    dict(temperature=1.0, top_k=4, top_p=1.0),
    dict(temperature=0.7, top_k=10, top_p=0.6),
    dict(temperature=1.3, top_k=6, top_p=0.9),
]


@pytest.mark.emulator_slow
@pytest.mark.parametrize("settings", SAMPLING, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_sampling_is_lossless_in_distribution(sampling_setup, settings):
    model, heads, prompt = sampling_setup
    exact = _exact_distribution(model, prompt, **settings)
    n = 3000
    got = _empirical(model, heads, prompt, n, "kernels", **settings)
    assert set(got) <= set(exact)  # never a token the filters exclude
    # Expected TV of n samples over c cells is about sqrt(c / (2 pi n)); allow a margin.
    bound = 2.0 * (len(exact) / (2 * 3.1416 * n)) ** 0.5 + 0.01
    assert bound < 0.3, (bound, len(exact))  # the test must be able to see a lossy sampler
    tv = _tv(got, exact)
    assert tv < bound, (tv, bound, len(exact))
    for lossy in (_lossy_uniforms(), _lossy_root_logits()):
        bad = _tv(_empirical(model, heads, prompt, n, lossy, **settings), exact)
        assert bad > bound, (bad, bound)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["conditioned", "transformer"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_512_tokens_every_architecture_and_tree(arch, kind):
    """Long generations on tiny models of each supported architecture, for every tree shape."""
    m = _model() if arch == "llama" else tiny_causal_lm(arch, vocab=VOCAB)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    heads = perturbed_heads(m, kind, scale=0.05 if kind == "conditioned" else 0.02)
    ids, mask = _prompts(2, 9, seed=21, pad_rows=[(1, 4)])
    want = m.generate(ids, attention_mask=mask, max_new_tokens=512, do_sample=False)
    for tree in TREES:
        got = generate(m, ids, heads, attention_mask=mask, max_new_tokens=512, tree=tree)
        assert torch.equal(got, want), tree
