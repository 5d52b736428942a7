"""Export of ``"eagle"`` heads as vLLM / SGLang drafter checkpoints (:mod:`mtp_ext.heads.export`)
on a tiny random-weight Llama (vocabulary 64, hidden 32, 4 layers).

Checked: the tensors each format writes (names, shapes, dtypes) against the format tables, which
were written from the engines' loaders; the ``config.json`` keys the loaders read; the draft
vocabulary (``d2t`` / ``t2d`` / ``lm_head.weight`` rows for EAGLE-3, the token map for SGLang's
EAGLE); an "engine-style" greedy chain computed from the exported folder alone with the engines'
formulas (their names, their layer-id conventions, the config's sizes, epsilon and rope theta)
against the heads' own drafts; the export/import round trip (identical parameters, config and
drafts); the errors for what a format cannot hold; and the ``mtp-ext export-heads`` command.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_llama, word_tokenizer

from mtp_ext import cli
from mtp_ext.heads import MTPHeads
from mtp_ext.heads import export as X

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

VOCAB, HIDDEN, INTER, LAYERS = 64, 32, 48, 4
H, N = 3, 20


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, HIDDEN, INTER, LAYERS, seed=0, name="tiny-llama")


def _heads(model, seed=1, **kw):
    """Eagle heads with every parameter moved off its initial value (and a shuffled draft
    vocabulary when ``draft_vocab_size`` is given)."""
    heads = MTPHeads.for_model(model, num_heads=H, kind="eagle", **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    if heads.vocab_ids is not None:
        heads.set_draft_vocab(torch.randperm(VOCAB, generator=g)[: heads.config.draft_vocab_size])
    return heads.eval()


def _load(folder):
    from safetensors.torch import load_file

    with open(os.path.join(folder, X.CONFIG_FILE)) as f:
        config = json.load(f)
    return config, load_file(os.path.join(folder, X.WEIGHTS_FILE))


def _dims(model, n=None):
    return X.model_dims(model, n)


# ------------------------------------------------------------------------------------------------
# Tables and written files
# ------------------------------------------------------------------------------------------------


def test_tables_cover_the_heads_state_dicts(model):
    """Every key of the heads' state dict has a table entry in the formats of its layout, and every
    entry is a state key or a pseudo-key naming what it is made of."""
    sd1 = set(_heads(model, fc_bias=True, draft_vocab_size=N).state_dict())
    sd3 = set(_heads(model, fuse_layers=[1, 2, 3], draft_vocab_size=N).state_dict())
    pseudo = {"norm_weight", "lm_head_weight[vocab_ids]", "vocab_ids -> d2t", "vocab_ids -> t2d"}
    assert set(X.SGLANG_EAGLE) == sd1
    assert set(X.VLLM_EAGLE) == sd1 - {"fc.bias", "vocab_ids"}
    assert set(X.EAGLE3) == (sd3 - {"vocab_ids"}) | pseudo
    assert X.TABLES == {"vllm-eagle": X.VLLM_EAGLE, "sglang-eagle": X.SGLANG_EAGLE,
                        "eagle3": X.EAGLE3}
    # The engines' names: layers.0.* for EAGLE-1, midlayer.* for EAGLE-3.
    assert all(e.name.startswith(("layers.0.", "fc.")) for k, e in X.VLLM_EAGLE.items())
    assert {e.name for e in X.EAGLE3.values()} >= {
        "midlayer.input_layernorm.weight", "midlayer.hidden_norm.weight", "norm.weight",
        "lm_head.weight", "d2t", "t2d", "fc.weight"}


def test_expected_shapes_are_functions_of_the_config(model):
    d = _dims(model, N)
    assert d == X.Dims(D=32, n_heads=4, n_kv=2, head_dim=8, inter=48, vocab=64, draft_vocab=N)
    e1 = X.expected_tensors("vllm-eagle", d)
    assert e1["fc.weight"] == (32, 64) and "fc.bias" not in e1
    assert e1["layers.0.self_attn.k_proj.weight"] == (16, 32)
    assert "layers.0.input_layernorm.weight" not in e1  # no input norm in EAGLE-1's layer 0
    assert X.expected_tensors("sglang-eagle", d)["fc.bias"] == (32,)
    e3 = X.expected_tensors("eagle3", d)
    assert e3["fc.weight"] == (32, 96)
    assert e3["midlayer.self_attn.q_proj.weight"] == (32, 64)
    assert e3["midlayer.self_attn.v_proj.weight"] == (16, 64)
    assert e3["midlayer.self_attn.o_proj.weight"] == (32, 32)
    assert e3["lm_head.weight"] == (N, 32) and e3["d2t"] == (N,) and e3["t2d"] == (64,)
    with pytest.raises(ValueError, match="format must be one of"):
        X.expected_tensors("medusa", d)


def _check_llama_config(config, model, arch):
    c = model.config
    assert config["architectures"] == [arch]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "hidden_act",
                "bos_token_id", "eos_token_id"):
        assert config[key] == getattr(c, key), key
    assert config["rms_norm_eps"] == c.rms_norm_eps
    assert config["rope_theta"] == c.rope_parameters["rope_theta"]
    assert config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is False  # SGLang would tie lm_head to embed_tokens
    assert config["attention_bias"] is False and config["mlp_bias"] is False


@pytest.mark.parametrize("fmt, kw", [
    ("vllm-eagle", {}),
    ("sglang-eagle", {}),
    ("sglang-eagle", {"fc_bias": True, "draft_vocab_size": N}),
    ("eagle3", {"fuse_layers": [1, 2, 3]}),
    ("eagle3", {"fuse_layers": [3, 1, 2], "draft_vocab_size": N}),
])
def test_written_files_follow_the_table(model, tmp_path, fmt, kw):
    heads = _heads(model, **kw)
    result = X.export_heads(heads, model, tmp_path, fmt)
    config, w = _load(tmp_path)
    d = _dims(model, kw.get("draft_vocab_size"))
    assert {k: tuple(v.shape) for k, v in w.items()} == X.expected_tensors(fmt, d)
    assert result["tensors"] == X.expected_tensors(fmt, d)
    for key, entry in X.TABLES[fmt].items():
        if entry.file == X.WEIGHTS_FILE:
            assert w[entry.name].dtype == (entry.dtype or heads.param_dtype), entry.name
    arch = X.FORMATS[fmt].architectures[0]
    _check_llama_config(config, model, arch)
    assert config[X.METADATA_KEY]["format"] == fmt
    assert config[X.METADATA_KEY]["num_heads"] == H
    sd = heads.state_dict()
    prefix = "midlayer." if fmt == "eagle3" else "layers.0."
    for key in sd:
        if key.startswith("layer."):
            assert torch.equal(w[prefix + key[len("layer."):]], sd[key]), key
    has_map = fmt == "sglang-eagle" and "draft_vocab_size" in kw
    assert (X.TOKEN_MAP_FILE in result["files"]) == has_map
    assert os.path.isfile(tmp_path / X.TOKEN_MAP_FILE) == has_map
    if fmt == "sglang-eagle":
        want = sd["fc.bias"] if "fc.bias" in sd else torch.zeros(HIDDEN)
        assert torch.equal(w["fc.bias"], want)  # SGLang's fc always has a bias
    if has_map:  # what sglang's load_token_map reads
        ids = torch.tensor(torch.load(tmp_path / X.TOKEN_MAP_FILE, weights_only=True),
                           dtype=torch.int64)  # a list of ints: no copy-construct warning
        assert torch.equal(ids, heads.vocab_ids)


def test_eagle3_vocabulary_norm_and_layer_ids(model, tmp_path):
    heads = _heads(model, fuse_layers=[3, 1, 2], draft_vocab_size=N)
    X.export_heads(heads, model, tmp_path, "eagle3")
    config, w = _load(tmp_path)
    ids = heads.vocab_ids
    # d2t: offsets target - draft index (vLLM: draft_id_to_target_id; SGLang: hot_token_id).
    assert w["d2t"].dtype == torch.int64
    assert torch.equal(w["d2t"] + torch.arange(N), ids)
    assert w["t2d"].dtype == torch.bool and int(w["t2d"].sum()) == N and bool(w["t2d"][ids].all())
    assert torch.equal(w["lm_head.weight"], model.lm_head.weight[ids])
    assert torch.equal(w["norm.weight"], model.model.norm.weight)
    assert config["draft_vocab_size"] == N and config["target_hidden_size"] == HIDDEN
    assert config["norm_before_residual"] is False
    # vLLM reads the top-level ids as hidden_states indices; SGLang reads eagle_config's and
    # captures at id + 1.
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert [i + 1 for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]] == [1, 2, 3]
    # fc's column blocks follow the increasing layer order the engines concatenate in.
    fc = heads.fc.weight.detach()
    D = HIDDEN
    want = torch.cat([fc[:, 1 * D:2 * D], fc[:, 2 * D:3 * D], fc[:, 0:D]], 1)  # layers 1, 2, 3
    assert torch.equal(w["fc.weight"], want)


def test_eagle3_without_draft_vocabulary_writes_the_whole_one(model, tmp_path):
    heads = _heads(model, fuse_layers=[1, 2, 3])
    X.export_heads(heads, model, tmp_path, "eagle3")
    config, w = _load(tmp_path)
    assert config["draft_vocab_size"] == VOCAB
    assert torch.equal(w["d2t"], torch.zeros(VOCAB, dtype=torch.int64))
    assert bool(w["t2d"].all())
    assert torch.equal(w["lm_head.weight"], model.lm_head.weight)


# ------------------------------------------------------------------------------------------------
# What the engines compute from the folder
# ------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def _engine_chain(folder, model, ids, root, steps):
    """The greedy chain an engine drafts after ``ids [S]`` and the root token, from the exported
    folder alone, with the formulas of vLLM's ``EagleLlamaForCausalLM`` / ``Eagle3LlamaForCausalLM``
    (SGLang's are the same): EAGLE-1 ``fc(cat(embed, last normed hidden))``, a layer without input
    norm, logits ``lm_head(h + residual)`` with the target's lm_head; EAGLE-3 ``fc`` over the
    hidden states named by the top-level layer ids, ``[input_layernorm(embed);
    hidden_norm(h)]`` into the attention, residual ``h``, then ``norm`` and the own ``lm_head``,
    draft index ``j`` -> target ``j + d2t[j]``. Returns ``(target ids [steps], top-1 logprobs)``."""
    config, w = _load(folder)
    eagle3 = config["architectures"] == ["LlamaForCausalLMEagle3"]
    p = "midlayer." if eagle3 else "layers.0."
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    nH, nKV, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    embed = model.get_input_embeddings().weight.detach()
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
    if eagle3:
        assert [i + 1 for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]] == \
            config["eagle_aux_hidden_state_layer_ids"]  # the two engines' ids agree
        feat = torch.cat([hs[i][0] for i in config["eagle_aux_hidden_state_layer_ids"]], -1)
        feat = feat @ w["fc.weight"].T
    else:
        feat = hs[-1][0]
    S = ids.shape[0]
    tokens = torch.cat([ids[1:], root.view(1)])

    def entry(tok, f, first):
        e = embed[tok]
        if eagle3:
            a = torch.cat([_rms(e, w[p + "input_layernorm.weight"], eps),
                           _rms(f, w[p + "hidden_norm.weight"], eps)], -1)
            return a, f
        x = torch.cat([e, f], -1) @ w["fc.weight"].T
        if "fc.bias" in w:
            x = x + w["fc.bias"]
        return x, x

    def qkv(a, pos):
        q = (a @ w[p + "self_attn.q_proj.weight"].T).view(-1, nH, hd)
        k = (a @ w[p + "self_attn.k_proj.weight"].T).view(-1, nKV, hd)
        v = (a @ w[p + "self_attn.v_proj.weight"].T).view(-1, nKV, hd)
        return _rope(q, pos, theta), _rope(k, pos, theta), v

    def finish(res, q, K, V, mask):
        K, V = K.repeat_interleave(nH // nKV, 1), V.repeat_interleave(nH // nKV, 1)
        s = torch.einsum("qhd,khd->hqk", q, K) * hd ** -0.5
        s = s.masked_fill(~mask[None], float("-inf"))
        o = torch.einsum("hqk,khd->qhd", s.softmax(-1), V).reshape(q.shape[0], nH * hd)
        h = res + o @ w[p + "self_attn.o_proj.weight"].T
        x = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        m = (F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T))
        return h + m @ w[p + "mlp.down_proj.weight"].T

    def logits(g):
        if eagle3:
            return _rms(g, w["norm.weight"], eps) @ w["lm_head.weight"].T
        return g @ model.lm_head.weight.detach().T

    # Depth 1: one entry per prompt position (the drafter's KV cache), causal.
    pos = torch.arange(S)
    a, res = entry(tokens, feat, True)
    q, K, V = qkv(a, pos)
    g = finish(res, q, K, V, pos[None, :] <= pos[:, None])[-1:]
    out_ids, out_lp = [], []
    for d in range(steps):
        lg = logits(g)[0]
        j = int(lg.argmax())
        out_lp.append(float(lg.log_softmax(-1)[j]))
        tok = j + int(w["d2t"][j]) if eagle3 else j
        out_ids.append(tok)
        if d + 1 == steps:
            break
        a, res = entry(torch.tensor([tok]), g, False)  # deeper: the output feeds back, no fc
        q, k, v = qkv(a, torch.tensor([S + d]))
        K, V = torch.cat([K, k]), torch.cat([V, v])
        g = finish(res, q, K, V, torch.ones(1, K.shape[0], dtype=torch.bool))
    return torch.tensor(out_ids), torch.tensor(out_lp)


@pytest.mark.parametrize("fmt, kw", [
    ("vllm-eagle", {}),
    ("sglang-eagle", {"fc_bias": True}),
    ("eagle3", {"fuse_layers": [3, 1, 2], "draft_vocab_size": N}),
    ("eagle3", {"fuse_layers": [1, 2, 3]}),
])
def test_engine_formulas_on_the_folder_give_the_heads_drafts(model, tmp_path, fmt, kw):
    heads = _heads(model, **kw)
    X.export_heads(heads, model, tmp_path, fmt)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (7,), generator=g)
    root = torch.randint(0, VOCAB, (1,), generator=g)[0]
    want_ids, want_lp = _engine_chain(tmp_path, model, ids, root, H)
    with torch.no_grad():
        hs = model(ids[None], output_hidden_states=True).hidden_states
    next_tokens = torch.cat([ids[1:], root.view(1)])[None]
    lp, got = heads.draft(hs, 1, next_tokens)
    assert torch.equal(got[0, -1, :, 0], want_ids)
    torch.testing.assert_close(lp[0, -1, :, 0], want_lp, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kw", [
    ("vllm-eagle", {}),
    ("vllm-eagle", {"fc_bias": True}),  # a zero bias: dropped, restored from the record
    ("sglang-eagle", {"fc_bias": True, "draft_vocab_size": N}),
    ("sglang-eagle", {}),
    ("eagle3", {"fuse_layers": [3, 1, 2], "draft_vocab_size": N}),
    ("eagle3", {"fuse_layers": [1, 2, 3], "draft_vocab_size": VOCAB}),
    ("eagle3", {"fuse_layers": [-4, 2, -2]}),
])
def test_round_trip_gives_identical_heads(model, tmp_path, fmt, kw):
    heads = _heads(model, **kw)
    if fmt == "vllm-eagle" and kw.get("fc_bias"):
        with torch.no_grad():
            heads.fc.bias.zero_()
    X.export_heads(heads, model, tmp_path, fmt)
    back = X.import_heads(tmp_path, model)
    assert type(back) is type(heads)
    assert back.config == heads.config
    a, b = heads.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    nxt = torch.randint(0, VOCAB, (2, 6), generator=g)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        for x, y in zip(heads.draft(hs, 4, nxt), back.draft(hs, 4, nxt)):
            assert torch.equal(x, y)
        teacher = MTPHeads.teacher_tokens(torch.cat([ids, nxt[:, -1:]], 1), H)[:, 1:]
        assert torch.equal(heads(hs, teacher), back(hs, teacher))


def test_import_without_our_record_reads_the_engine_conventions(model, tmp_path):
    """A folder without ``"mtp_ext_heads"`` (an engine checkpoint of the same layout) imports from
    the engines' keys alone: layer ids, draft vocabulary from d2t, fc.bias kept when nonzero."""
    heads = _heads(model, fuse_layers=[1, 2, 3], draft_vocab_size=N)
    X.export_heads(heads, model, tmp_path, "eagle3")
    config, _ = _load(tmp_path)
    del config[X.METADATA_KEY], config["eagle_aux_hidden_state_layer_ids"]  # SGLang's ids only
    (tmp_path / X.CONFIG_FILE).write_text(json.dumps(config))
    back = X.import_heads(tmp_path, model, num_heads=H)
    assert back.config.fuse_layers == [1, 2, 3] and back.config.draft_vocab_size == N
    assert torch.equal(back.vocab_ids, heads.vocab_ids)
    assert torch.equal(back.fc.weight, heads.fc.weight)

    one = _heads(model, fc_bias=True)
    X.export_heads(one, model, tmp_path / "s", "sglang-eagle")
    config, _ = _load(tmp_path / "s")
    del config[X.METADATA_KEY]
    (tmp_path / "s" / X.CONFIG_FILE).write_text(json.dumps(config))
    back = X.import_heads(tmp_path / "s", model)
    assert back.config.fc_bias and torch.equal(back.fc.bias, one.fc.bias)
    assert back.config.num_heads == 3


def test_a_stale_token_map_is_removed(model, tmp_path):
    X.export_heads(_heads(model, draft_vocab_size=N), model, tmp_path, "sglang-eagle")
    assert (tmp_path / X.TOKEN_MAP_FILE).is_file()
    X.export_heads(_heads(model), model, tmp_path, "sglang-eagle")
    assert not (tmp_path / X.TOKEN_MAP_FILE).exists()
    assert X.import_heads(tmp_path, model).vocab_ids is None


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, kw, match", [
    ("eagle3", {}, "takes EAGLE-3 heads"),
    ("vllm-eagle", {"fuse_layers": [1, 2, 3]}, "takes EAGLE-1 heads"),
    ("sglang-eagle", {"fuse_layers": [1, 2, 3]}, "export them as 'eagle3'"),
    ("vllm-eagle", {"draft_vocab_size": N}, "whole output layer"),
    ("eagle3", {"fuse_layers": [1, 3]}, "exactly 3 hidden states"),
    ("eagle3", {"fuse_layers": [0, 1, 2]}, r"1 <= i <= L - 1"),
    ("eagle3", {"fuse_layers": [1, 2, 4]}, r"1 <= i <= L - 1"),
    ("medusa", {}, "format must be one of"),
])
def test_export_refuses_what_the_format_cannot_hold(model, tmp_path, fmt, kw, match):
    with pytest.raises(ValueError, match=match):
        X.export_heads(_heads(model, **kw), model, tmp_path, fmt)
    assert not (tmp_path / X.WEIGHTS_FILE).exists()


@pytest.mark.parametrize("fmt, kw", [
    ("vllm-eagle", {"fc_bias": True}),
    ("eagle3", {"fc_bias": True, "fuse_layers": [1, 2, 3]}),
])
def test_a_nonzero_fc_bias_is_refused_where_the_drafter_has_none(model, tmp_path, fmt, kw):
    with pytest.raises(ValueError, match="nonzero fc.bias"):
        X.export_heads(_heads(model, **kw), model, tmp_path, fmt)


def test_other_kinds_and_other_backbones_are_refused(model, tmp_path):
    for kind in ("resblock", "transformer"):
        with pytest.raises(ValueError, match=f"kind='{kind}'"):
            X.export_heads(MTPHeads.for_model(model, 2, kind=kind), model, tmp_path, "eagle3")
    other = tiny_llama(VOCAB, 48, INTER, LAYERS, seed=0)
    with pytest.raises(ValueError, match="hidden_size=32"):
        X.export_heads(_heads(model), other, tmp_path, "vllm-eagle")
    X.export_heads(_heads(model), model, tmp_path, "vllm-eagle")
    with pytest.raises(ValueError, match="hidden_size=32"):
        X.import_heads(tmp_path, other)


def test_import_refuses_foreign_output_rows_and_bad_files(model, tmp_path):
    from safetensors.torch import save_file

    X.export_heads(_heads(model, fuse_layers=[1, 2, 3], draft_vocab_size=N), model, tmp_path,
                   "eagle3")
    config, w = _load(tmp_path)

    def rewrite(**changes):
        t = dict(w, **changes)
        save_file({k: v for k, v in t.items() if v is not None}, str(tmp_path / X.WEIGHTS_FILE))

    rewrite(**{"lm_head.weight": w["lm_head.weight"] + 1})
    with pytest.raises(ValueError, match="lm_head.weight is not the backbone's"):
        X.import_heads(tmp_path, model)
    rewrite(**{"norm.weight": w["norm.weight"] * 2})
    with pytest.raises(ValueError, match="norm.weight is not the backbone's"):
        X.import_heads(tmp_path, model)
    bad = w["t2d"].clone()
    bad[int((~bad).nonzero()[0])] = True
    rewrite(t2d=bad)
    with pytest.raises(ValueError, match="t2d does not mark"):
        X.import_heads(tmp_path, model)
    rewrite(**{"midlayer.hidden_norm.weight": None})
    with pytest.raises(ValueError, match="no midlayer.hidden_norm.weight"):
        X.import_heads(tmp_path, model)
    rewrite(extra=torch.zeros(2))
    with pytest.raises(ValueError, match=r"does not have: \['extra'\]"):
        X.import_heads(tmp_path, model)
    config["architectures"] = ["MedusaModel"]
    del config[X.METADATA_KEY]
    (tmp_path / X.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="none of the exported drafter formats"):
        X.import_heads(tmp_path, model)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("export_cli")
    model.save_pretrained(root / "model")
    word_tokenizer(VOCAB).save_pretrained(root / "model")
    backbone = _saved_model(root)  # named by its folder, as the command loads it
    _heads(backbone, fuse_layers=[1, 2, 3], draft_vocab_size=N).save_pretrained(root / "eagle3")
    _heads(backbone, draft_vocab_size=N).save_pretrained(root / "eagle1")
    MTPHeads.for_model(backbone, 2).save_pretrained(root / "resblock")
    return root


def test_export_heads_command(folders, tmp_path, capsys):
    out = tmp_path / "out3"
    rc = cli.main(["export-heads", "--model", str(folders / "model"), "--heads",
                   str(folders / "eagle3"), "--format", "eagle3", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "model.safetensors" in text and "lm_head.weight [20, 32]" in text
    assert '--speculative-config \'{"method": "eagle3", "model": "' in text
    assert '"num_speculative_tokens": 3}' in text
    assert "--speculative-algorithm EAGLE3 --speculative-draft-model-path" in text
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    backbone = _saved_model(folders)
    saved = MTPHeads.from_pretrained(folders / "eagle3", backbone)
    back = X.import_heads(out, backbone)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in saved.state_dict().items())

    rc = cli.main(["export-heads", "--model", str(folders / "model"), "--heads",
                   str(folders / "eagle1"), "--format", "sglang-eagle", str(tmp_path / "s")])
    text = capsys.readouterr().out
    assert rc == 0 and "vllm serve" not in text
    assert f"--speculative-token-map {tmp_path / 's' / X.TOKEN_MAP_FILE}" in text


def _saved_model(folders):
    from mtp_ext.data.assets import load_model

    return load_model(str(folders / "model"))[0]


@pytest.mark.parametrize("heads, fmt, match", [
    ("resblock", "eagle3", "kind='resblock'"),
    ("eagle1", "vllm-eagle", "whole output layer"),
    ("no-such-heads", "eagle3", "neither a heads folder nor shipped heads"),
    ("eagle1", "eagle3", "use --format vllm-eagle or sglang-eagle"),
    ("eagle3", "sglang-eagle", "use --format eagle3"),
])
def test_export_heads_command_errors(folders, tmp_path, capsys, heads, fmt, match):
    rc = cli.main(["export-heads", "--model", str(folders / "model"), "--heads",
                   str(folders / heads), "--format", fmt, str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any loading progress
    assert rc == 2
    assert last.startswith("mtp-ext export-heads: error: ") and match in last


def test_shipped_eagle3_variant_exports_and_the_default_names_it(tmp_path, capsys):
    """``--heads smollm2-135m:eagle3`` exports the shipped EAGLE-3 drafter; the default shipped
    heads (conditioned) are refused with a pointer to it."""
    from mtp_ext.data import assets

    try:
        assets.model_file("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    rc = cli.main(["export-heads", "--model", "smollm2-135m", "--heads", "smollm2-135m",
                   "--format", "eagle3", str(tmp_path / "no")])
    assert rc == 2 and "smollm2-135m:eagle3" in capsys.readouterr().err
    out = tmp_path / "e3"
    rc = cli.main(["export-heads", "--model", "smollm2-135m", "--heads", "smollm2-135m:eagle3",
                   "--format", "eagle3", str(out)])
    assert rc == 0, capsys.readouterr().err[-2000:]
    config = json.loads((out / X.CONFIG_FILE).read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]  # both engines load it
    from mtp_ext.data.assets import load_model

    model, _ = load_model("smollm2-135m")
    back = X.import_heads(out, model)
    assert back.config.fuse_layers == [2, 15, 27] and back.config.draft_vocab_size == 8192
