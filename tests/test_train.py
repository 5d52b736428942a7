"""Training of MTP heads (``mtp_ext.training``) on a tiny random-weight transformers Llama.

Vocabulary 200, hidden 32, 2 layers; the texts are pre-tokenized, a repeating cycle of 16 distinct
tokens (so the token at ``t + 2`` is a function of the token at ``t``), which frozen heads learn.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import cycle_texts, tiny_llama, word_tokenizer

from mtp_ext import training as T
from mtp_ext.heads import MTPHeads
from mtp_ext.training.steps import sample_positions

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, SEQ = 200, 32, 2, 32


def _tiny_llama(seed=0):
    return tiny_llama(VOCAB, HIDDEN, 64, LAYERS, seed)


def _cycle_texts(n_seqs, seed):
    return cycle_texts(VOCAB, SEQ, n_seqs, seed)


@pytest.fixture(scope="module")
def model():
    return _tiny_llama()


@pytest.fixture(scope="module")
def data():
    return _cycle_texts(24, seed=1), _cycle_texts(4, seed=2)


def _cfg(**kw):
    base = dict(
        steps=40, seq_len=SEQ, target="text", batch_positions=128, lr=3e-2, warmup_steps=2,
        eval_every=0, progress=False, seed=0,
    )
    base.update(kw)
    return T.TrainConfig(**base)


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_frozen_training_improves_head1_and_keeps_backbone(model, data):
    tr, va = data
    before = _params(model)
    heads = MTPHeads.for_model(model, num_heads=2, kind="resblock")
    cfg = _cfg()
    untrained = T.evaluate(heads, T.build_cache(model, heads, va, cfg), cfg)
    out = T.train_heads(model, None, heads, tr, va, cfg)
    assert out["step"] == 40
    acc0, acc1 = untrained["top1_text"][0], out["final"]["top1_text"][0]
    assert acc1 > acc0 + 0.3, (acc0, acc1)
    assert out["final"]["top5_text"][0] >= acc1
    assert out["history"]["loss"][-1] < out["history"]["loss"][0]
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
        assert not v.requires_grad


def test_targets_alignment_hand_example():
    ids = torch.arange(10).view(1, 10)
    greedy = 100 + torch.arange(10).view(1, 10)
    s, t = torch.tensor([0, 0, 0]), torch.tensor([2, 6, 7])
    tt, valid = T.head_targets(ids, greedy, s, t, 3, "text")
    tg, _ = T.head_targets(ids, greedy, s, t, 3, "greedy")
    # head h at t predicts token t + 1 + h: text token ids[t+1+h], greedy = argmax at t + h
    assert tt.tolist() == [[4, 5, 6], [8, 9, -100], [9, -100, -100]]
    assert tg.tolist() == [[103, 104, 105], [107, 108, -100], [108, -100, -100]]
    assert valid.tolist() == [[True] * 3, [True, True, False], [True, False, False]]


def test_greedy_targets_are_backbone_argmax(model, data):
    tr, _ = data
    heads = MTPHeads.for_model(model, num_heads=3)
    cache = T.build_cache(model, heads, tr[:2], _cfg())
    with torch.no_grad():
        logits = model(tr[:2]).logits
    assert torch.equal(cache["greedy"], logits.argmax(-1))
    s, t = torch.tensor([1, 1]), torch.tensor([0, 5])
    tg, _ = T.head_targets(cache["ids"], cache["greedy"], s, t, 3, "greedy")
    for i in range(2):
        for h in range(1, 4):
            assert tg[i, h - 1] == logits[1, t[i] + h].argmax()


def test_cache_equals_no_cache_and_disk_cache(model, data, tmp_path):
    tr, va = data
    losses = []
    for cache_hidden, cache_dir in [(True, None), (False, None), (True, str(tmp_path))]:
        heads = MTPHeads.for_model(model, num_heads=2, kind="resblock")
        cfg = _cfg(steps=8, cache_hidden=cache_hidden, cache_dir=cache_dir, target="greedy")
        losses.append(T.train_heads(model, None, heads, tr, va, cfg)["history"]["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert losses[0] == losses[2]
    files = os.listdir(tmp_path)
    assert len(files) == 2 and all(f.endswith(".pt") for f in files)
    # reused: a second run does not rewrite it
    mtimes = {f: os.path.getmtime(tmp_path / f) for f in files}
    heads = MTPHeads.for_model(model, num_heads=2, kind="resblock")
    T.train_heads(model, None, heads, tr, va, _cfg(steps=2, cache_dir=str(tmp_path), target="greedy"))
    assert {f: os.path.getmtime(tmp_path / f) for f in files} == mtimes


@pytest.mark.parametrize("kind,layer,target", [
    ("linear", 1, "kl"), ("conditioned", -1, "greedy"), ("resblock", "whs", "kl"),
])
def test_other_kinds_layers_targets_train(model, data, kind, layer, target):
    tr, va = data
    heads = MTPHeads.for_model(model, num_heads=2, kind=kind, layer=layer)
    with pytest.warns(UserWarning, match="WHS") if layer == "whs" else _nullctx():
        out = T.train_heads(model, None, heads, tr, va, _cfg(steps=10, target=target, lr=1e-2))
    losses = out["history"]["loss"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_checkpoint_resume_matches_uninterrupted(model, data, tmp_path):
    tr, va = data
    full = MTPHeads.for_model(model, num_heads=2)
    ref = T.train_heads(model, None, full, tr, va, _cfg(steps=12, eval_every=4))
    out = str(tmp_path / "run")
    part = MTPHeads.for_model(model, num_heads=2)
    r1 = T.train_heads(model, None, part, tr, va,
                       _cfg(steps=12, eval_every=4, out_dir=out, checkpoint_every=3, stop_at=7))
    assert r1["step"] == 7
    assert not os.path.isdir(os.path.join(out, "heads"))
    resumed = MTPHeads.for_model(model, num_heads=2)
    r2 = T.train_heads(model, None, resumed, tr, va,
                       _cfg(steps=12, eval_every=4, out_dir=out, checkpoint_every=3))
    assert r2["step"] == 12
    assert r2["history"]["step"] == list(range(12))
    torch.testing.assert_close(r2["history"]["loss"], ref["history"]["loss"])
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v)
    loaded = MTPHeads.from_pretrained(os.path.join(out, "heads"), model)
    for k, v in resumed.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    assert [r["step"] for r in lines] == [4, 7, 8, 12]
    assert len(lines[-1]["top1_greedy"]) == 2 and len(lines[-1]["top5_text"]) == 2


def test_joint_mode_warmup_and_lr_groups(data):
    tr, va = data
    model = _tiny_llama(seed=3)
    before = _params(model)
    heads = MTPHeads.for_model(model, num_heads=2)
    cfg = _cfg(steps=4, joint=True, head_warmup_steps=2, joint_seqs=2, backbone_lr=1e-3,
               lr=1e-2, warmup_steps=0, schedule="constant", stop_at=2)
    out = T.train_heads(model, None, heads, tr, va, cfg)
    assert out["step"] == 2
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k  # frozen during the head warm-up
    assert out["history"]["backbone_lr"] == [0.0, 0.0]
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in heads.named_parameters())
    assert "ntp_top1_text" in out["final"]
    cfg2 = _cfg(steps=4, joint=True, head_warmup_steps=2, joint_seqs=2, backbone_lr=1e-3,
                lr=1e-2, warmup_steps=0, schedule="constant", seed=1)
    model2 = _tiny_llama(seed=3)
    heads2 = MTPHeads.for_model(model2, num_heads=2)
    out2 = T.train_heads(model2, None, heads2, tr, va, cfg2)
    assert out2["history"]["backbone_lr"] == [0.0, 0.0, 1e-3, 1e-3]
    assert out2["history"]["lr"] == [1e-2] * 4
    changed = [k for k, v in model2.named_parameters() if not torch.equal(v, before[k])]
    assert changed
    # two steps of Adam move each weight by at most ~2 * backbone_lr
    for k, v in model2.named_parameters():
        assert (v - before[k]).abs().max() <= 2.5e-3, k
    assert all(not p.requires_grad for p in model2.parameters())


def _word_tokenizer():
    return word_tokenizer(VOCAB)


def test_tokenize_texts_strings_and_ids():
    tok = _word_tokenizer()
    ids = T.tokenize_texts(["w1 w2 w3", "w4 w5"], tok, 4)
    assert ids.tolist() == [[1, 2, 3, VOCAB - 1]]  # EOS after each text, remainder dropped
    assert T.tokenize_texts([[1, 2, 3], [4, 5, 6, 7, 8]], None, 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert T.tokenize_texts([[1] * 40], None, 4, max_tokens=8).shape == (2, 4)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        T.tokenize_texts([[1, 2]], None, 4)


def _cli_inputs(tmp_path, data):
    """A tiny model folder (with a tokenizer) and a token file for the CLI: ``(model, folder,
    token file)``."""
    model = _tiny_llama()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    _word_tokenizer().save_pretrained(folder)
    tr, va = data
    torch.save({"train": tr, "validation": va}, tmp_path / "toks.pt")
    return model, folder, tmp_path / "toks.pt"


def test_cli_parses_and_trains_on_tiny_folder(tmp_path, data, monkeypatch):
    from mtp_ext import cli

    model, folder, _ = _cli_inputs(tmp_path, data)
    out = tmp_path / "out"
    rc = cli.main([
        "train-heads", "--model", str(folder), "--tokens", str(tmp_path / "toks.pt"),
        "--kind", "resblock", "--num-heads", "2", "--layer", "-1", "--steps", "6",
        "--seq-len", str(SEQ), "--batch-positions", "64", "--target", "text",
        "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    heads = MTPHeads.from_pretrained(out / "heads", model)
    assert heads.config.num_heads == 2
    assert (out / "log.jsonl").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6
    args = cli.build_parser().parse_args([
        "train-heads", "--model", "smollm2-135m", "--texts", "web,python", "--layer", "whs",
        "--joint", "--backbone-lr", "1e-6", "--head-warmup-steps", "5", "--target", "kl",
        "--out", "x",
    ])
    assert args.texts == "web,python" and args.layer == "whs" and args.joint
    assert args.backbone_lr == 1e-6 and args.head_warmup_steps == 5


def test_frequent_tokens_order_and_ties():
    ids = torch.tensor([[5, 5, 5, 2, 2, 9, 9, 1]])
    assert T.frequent_tokens(ids, 3, 10).tolist() == [5, 2, 9]  # 2 and 9 tie: lower id first
    assert T.frequent_tokens(ids, 6, 10).tolist() == [5, 2, 9, 1, 0, 3]  # unseen: ascending
    with pytest.raises(ValueError, match="n must be in"):
        T.frequent_tokens(ids, 0, 10)


@pytest.mark.parametrize("source", ["greedy", "text"])
def test_draft_vocab_set_from_data_and_trains(model, data, source):
    tr, va = data
    heads = MTPHeads.for_model(model, num_heads=2, kind="conditioned", draft_vocab_size=24)
    cfg = _cfg(steps=30, target="greedy", draft_vocab_from=source)
    out = T.train_heads(model, None, heads, tr, va, cfg)
    cache = T.build_cache(model, heads, tr, cfg)
    want = T.frequent_tokens(cache["greedy"] if source == "greedy" else tr, 24, VOCAB)
    assert heads.vocab_ids.tolist() == want.tolist()
    # The cycle's 16 tokens are all in the text's 24 most frequent ids.
    if source == "text":
        assert set(tr.unique().tolist()) <= set(heads.vocab_ids.tolist())
    assert out["history"]["loss"][-1] < out["history"]["loss"][0]
    lp, ids = heads.draft(cache["feat"][0, :5], 3, next_tokens=tr[0, 1:6])
    assert set(ids.flatten().tolist()) <= set(heads.vocab_ids.tolist())
    with pytest.raises(ValueError, match="draft_vocab_from"):
        _cfg(draft_vocab_from="zipf")


def test_self_generated_continuations_are_the_backbones_greedy_text():
    from mtp_ext.data.selfgen import self_generated

    model = _tiny_llama()
    tok = _word_tokenizer()
    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(30)) for i in range(12)] + ["w1 w2"]
    seqs = self_generated(model, tok, texts, 5, new_tokens=9, prompt_tokens=6, batch_size=2,
                          progress=False)
    assert len(seqs) == 5
    for s in seqs:
        prompt = torch.tensor([s[:6]])
        eos = tok.eos_token_id
        want = model.generate(prompt, max_new_tokens=9, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)[0].tolist()
        cut = want[: want.index(eos, 6) + 1] if eos in want[6:] else want
        assert s == cut
    tok.chat_template = "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"
    chat = self_generated(model, tok, texts, 2, new_tokens=4, prompt_tokens=6, chat_fraction=1.0,
                          progress=False)
    assert all(s[0] == 3 and len(s) > 8 for s in chat)  # the template's first word opens each
    with pytest.raises(ValueError, match="hold 6 tokens"):
        self_generated(model, tok, ["w1 w2"], 1, prompt_tokens=6, progress=False)


def test_whole_sequence_sampling():
    gen = torch.Generator().manual_seed(0)
    s, t = sample_positions(10, 8, 15, gen, whole=True)  # 6 positions per sequence: 3 seqs
    assert s.shape == t.shape == (15,)
    assert t.tolist() == [0, 1, 2, 3, 4, 5] * 2 + [0, 1, 2]
    assert len(set(s[:6].tolist())) == 1 and len(set(s[6:12].tolist())) == 1


def test_cli_init_heads_continues_from_saved_heads(tmp_path, data):
    from mtp_ext import cli

    model, folder, _ = _cli_inputs(tmp_path, data)
    start = MTPHeads.for_model(model, num_heads=2, kind="conditioned", draft_vocab_size=40)
    start.set_draft_vocab(torch.arange(100, 140))
    start.save_pretrained(tmp_path / "start")
    common = ["train-heads", "--model", str(folder), "--tokens", str(tmp_path / "toks.pt"),
              "--seq-len", str(SEQ), "--batch-positions", "64", "--no-progress"]
    assert cli.main(common + ["--init-heads", str(tmp_path / "start"), "--steps", "3",
                              "--out", str(tmp_path / "out")]) == 0
    heads = MTPHeads.from_pretrained(tmp_path / "out" / "heads", model)
    assert heads.config.kind == "conditioned" and heads.config.num_heads == 2
    assert heads.vocab_ids.tolist() == list(range(100, 140))  # kept, not re-chosen
