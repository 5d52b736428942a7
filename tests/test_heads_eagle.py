"""``"eagle"`` heads (``mtp_ext.heads.eagle``): the EAGLE-1 and EAGLE-3 layouts, training-time
test, trees drafted from the decoding context against the drafter run over whole sequences, and
decoding equal to ``model.generate``."""

from __future__ import annotations

import pytest
import torch

from helpers import decoding_llama, left_padded_prompts, perturbed_heads, tiny_causal_lm, tiny_llama

from mtp_ext import controlled_steps
from mtp_ext.decoding import generate
from mtp_ext.heads import MTPHeads, MTPHeadsConfig
from mtp_ext.heads.eagle import EagleContext
from mtp_ext.tree_step import SlotTable
from mtp_ext.trees import DynamicTree, build_tree, chain

transformers = pytest.importorskip("transformers")

VOCAB = 97
LAYOUTS = {"eagle1": {}, "eagle3": {"fuse_layers": [1, 2, 3], "draft_vocab_size": 60}}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, 48, 96, 4, seed=1)


def _heads(model, layout, seed=0, **kw):
    return perturbed_heads(model, "eagle", seed=seed, scale=0.05, **LAYOUTS[layout], **kw)


class _Out:
    def __init__(self, out, P):
        self.hidden_states = tuple(h[:, :P] for h in out.hidden_states)
        self.last_hidden_state = self.hidden_states[-1]


def _context(heads, model, ids, P, valid=None):
    """The decoding context after a prompt ``ids[:, :P]`` whose next token is ``ids[:, P]``."""
    out = model(ids[:, : P + 1], output_hidden_states=True)
    B = ids.shape[0]
    valid = torch.ones(B, P, dtype=torch.bool) if valid is None else valid
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    feats = heads.decode_features()
    return feats.at_prompt(heads, _Out(out, P), SlotTable(valid, pos), ids[:, 1 : P + 1]), out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parameters_shapes_and_gradients(model, layout):
    heads = _heads(model, layout)
    D = 48
    width = 2 * D if layout == "eagle1" else 3 * D
    sd = heads.state_dict()
    assert sd["fc.weight"].shape == (D, width)
    q_in = D if layout == "eagle1" else 2 * D
    assert sd["layer.self_attn.q_proj.weight"].shape == (48, q_in)  # 4 heads x 12
    assert sd["layer.self_attn.k_proj.weight"].shape == (24, q_in)  # 2 KV heads x 12
    assert ("layer.hidden_norm.weight" in sd) == (layout == "eagle3")
    assert "layer.input_layernorm.weight" not in sd or layout == "eagle3"
    assert "embed_weight" not in sd and "lm_head_weight" not in sd  # the backbone's, not saved
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    out = model(ids, output_hidden_states=True)
    logits = heads(out.hidden_states, MTPHeads.teacher_tokens(ids, 3))
    assert logits.shape == (2, 11, 3, VOCAB if layout == "eagle1" else 60)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())


def test_causal_over_the_sequence(model):
    """A position's logits never depend on later positions, at any depth."""
    heads = _heads(model, "eagle1")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    out = model(ids, output_hidden_states=True)
    nt = MTPHeads.teacher_tokens(ids, 3)
    full = heads(out.hidden_states, nt)
    cut = heads(tuple(h[:, :7] for h in out.hidden_states), nt[:, :7])
    torch.testing.assert_close(cut, full[:, :7], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_chain_from_context_equals_drafting_the_sequence(model, layout):
    heads = _heads(model, layout)
    ids = torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(2))
    P = 10
    ctx, out = _context(heads, model, ids, P)
    lp, top = heads.draft(tuple(h[:, :P] for h in out.hidden_states), 2, ids[:, 1 : P + 1])
    tree = build_tree(heads, ctx, ids[:, P], chain(3))
    assert torch.equal(tree.tokens[:, 1:], top[:, -1, :, 0])
    torch.testing.assert_close(tree.scores[:, 1:], lp[:, -1, :, 0].cumsum(-1), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_tree_node_scores_as_its_own_path(model, layout):
    """Each node of a dynamic tree (siblings with different ancestors side by side) gets the
    log-probability the drafter gives its token when run over the sequence with that node's
    ancestors as teacher tokens (training-time test is the same computation)."""
    heads = _heads(model, layout, seed=3)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    P = 9
    ctx, out = _context(heads, model, ids, P)
    tree = build_tree(heads, ctx, ids[:, P], DynamicTree(10, 3))
    hs = tuple(h[:, :P] for h in out.hidden_states)
    checked = 0
    for b in range(2):
        for i in range(1, tree.size):
            path, j = [], i
            while j > 0:
                path.append(int(tree.tokens[b, j]))
                j = int(tree.parents[b, j])
            path = path[::-1]
            d = len(path)
            nt = MTPHeads.teacher_tokens(ids[b : b + 1, : P + 1], 3)[:, :P].clone()
            nt[0, P - 1] = torch.tensor([int(ids[b, P])] + path + [0] * (2 - len(path)))[:3]
            logits = heads(tuple(h[b : b + 1] for h in hs), nt)[0, P - 1, d - 1].float()
            col = heads.draft_index(torch.tensor(path[-1]))
            want = torch.log_softmax(logits, -1)[col]
            parent = int(tree.parents[b, i])
            got = tree.scores[b, i] - tree.scores[b, parent]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == 2 * (tree.size - 1)


def test_padding_is_masked(model):
    """A left-padded row drafts what it drafts unpadded."""
    heads = _heads(model, "eagle1", seed=5)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    ctx, _ = _context(heads, model, ids, 8)
    want = build_tree(heads, ctx, ids[:, 8], DynamicTree(6, 2))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    valid = torch.cat([torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 8, dtype=torch.bool)], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    out = model(padded, attention_mask=mask, output_hidden_states=True,
                position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    feats = heads.decode_features()
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    ctx_p = feats.at_prompt(heads, _Out(out, 11), SlotTable(valid, pos), padded[:, 1:12])
    got = build_tree(heads, ctx_p, ids[:, 8], DynamicTree(6, 2))
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.scores, want.scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("tree", [chain(3), DynamicTree(8, 3), "auto"], ids=["chain", "dyn", "auto"])
def test_greedy_equals_model_generate(layout, tree, monkeypatch):
    m = decoding_llama(120)
    if tree == "auto":  # trees always pay: the controller drafts every step
        class Cheap:
            draft_ms = 0.5

            def step_ms(self, t, lookup):
                return 30.0 + 0.05 * (t + lookup) + (self.draft_ms if t > 1 else 0.0)
        monkeypatch.setattr(controlled_steps, "step_costs", lambda *a, **k: Cheap())
    kw = dict(LAYOUTS[layout])
    if "fuse_layers" in kw:  # this model has 2 layers: 3 hidden states
        kw["fuse_layers"] = [0, 1, 2]
    heads = perturbed_heads(m, "eagle", seed=7, scale=0.05, **kw)
    ids, mask = left_padded_prompts(120, 3, 9, seed=8, pad_rows=[(1, 3)])
    want = m.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
    got = generate(m, ids, heads, attention_mask=mask, max_new_tokens=40, tree=tree,
                   prompt_lookup_num_tokens=4)
    assert torch.equal(got, want)


def test_save_load_round_trip(model, tmp_path):
    heads = _heads(model, "eagle3")
    heads.set_draft_vocab(torch.arange(30, 90))
    heads.save_pretrained(tmp_path)
    back = MTPHeads.from_pretrained(tmp_path, model)
    assert back.config == heads.config
    for k, v in heads.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(9))
    out = model(ids, output_hidden_states=True)
    a = heads.draft(out.hidden_states, 3, ids)
    b = back.draft(out.hidden_states, 3, ids)
    assert torch.equal(a[1], b[1])


def test_bad_input(model):
    with pytest.raises(ValueError, match="fuse_layers and fc_bias need kind='eagle'"):
        MTPHeadsConfig(num_heads=2, hidden_size=8, vocab_size=10, fuse_layers=[1, 2], num_layers=4)
    with pytest.raises(ValueError, match="distinct"):
        MTPHeadsConfig(num_heads=2, hidden_size=8, vocab_size=10, kind="eagle",
                       fuse_layers=[1, 1, 2], num_layers=4)
    with pytest.raises(ValueError, match="last hidden state"):
        MTPHeadsConfig(num_heads=2, hidden_size=8, vocab_size=10, kind="eagle", layer=2,
                       num_layers=4)
    heads = _heads(model, "eagle1")
    ids = torch.randint(0, VOCAB, (1, 6))
    out = model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="needs next_tokens"):
        heads(out.hidden_states)
    with pytest.raises(ValueError, match="sequence axis"):
        heads(out.hidden_states[-1][0], ids[0])
    with pytest.raises(ValueError, match="EagleContext"):
        build_tree(heads, out.hidden_states[-1][:, -1], ids[:, -1], chain(2))
    heads._context = None
    with pytest.raises(ValueError, match="inside a tree"):
        heads.draft_step(2, torch.zeros(1, heads.feature_width), ids[:, -1], 2)
    with pytest.raises(ValueError, match="Llama-architecture"):
        MTPHeads.for_model(tiny_causal_lm("gemma3", vocab=VOCAB), 2, kind="eagle")
    assert isinstance(EagleContext, type)
