"""Bad or unusual inputs to ``mtp_ext.generate`` and to the heads' loading: each gets a clear error
naming the argument, or the behaviour of ``model.generate`` (tested against it)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import decoding_llama, perturbed_heads

import mtp_ext
from mtp_ext.heads import MTPHeads, MTPHeadsConfig

transformers = pytest.importorskip("transformers")

VOCAB = 120


@pytest.fixture(scope="module")
def model():
    return decoding_llama(VOCAB)


@pytest.fixture(scope="module")
def heads(model):
    return perturbed_heads(model, "conditioned", 0, 0.05)


def _ids(B=2, P=6, seed=0):
    return torch.randint(1, VOCAB, (B, P), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 5, -2])
def test_token_ids_out_of_the_vocabulary(model, heads, bad):
    ids = torch.tensor([[1, 2, bad, 4]])
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, {VOCAB}\).*{bad}"):
        mtp_ext.generate(model, ids, heads, max_new_tokens=3)


def test_empty_batch(model, heads):
    with pytest.raises(ValueError, match="input_ids must hold at least one row"):
        mtp_ext.generate(model, torch.zeros(0, 4, dtype=torch.long), heads, max_new_tokens=3)


def test_heads_none(model):
    with pytest.raises(TypeError, match="heads must be MTPHeads.*got NoneType"):
        mtp_ext.generate(model, _ids(), None, max_new_tokens=3)


@pytest.mark.parametrize("tree", ["foo", "", "8"])
def test_tree_unknown_string(model, heads, tree):
    with pytest.raises(ValueError, match=r"tree must be .*'auto'.*'chain'.*got '"):
        mtp_ext.generate(model, _ids(), heads, max_new_tokens=3, tree=tree)


def test_greedy_ignores_sampling_settings_as_model_generate_does(model, heads):
    ids = _ids()
    want = model.generate(ids, max_new_tokens=6, top_p=1.5, top_k=-3)
    got = mtp_ext.generate(model, ids, heads, max_new_tokens=6, top_p=1.5, top_k=-3, tree=4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 2e-39])
def test_temperature_too_small_for_float32(model, heads, temperature):
    with pytest.raises(ValueError, match="temperature"):
        mtp_ext.generate(model, _ids(), heads, max_new_tokens=3, do_sample=True,
                         temperature=temperature)


def test_right_padding_warns_as_transformers_does(model, heads):
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.warns(UserWarning, match="right-padding"):
        mtp_ext.generate(model, ids, heads, attention_mask=mask, max_new_tokens=3, tree=4)
    left = torch.ones_like(ids)
    left[0, :2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # left padding: no warning
        mtp_ext.generate(model, ids, heads, attention_mask=left, max_new_tokens=3, tree=4)


def test_mask_values_other_than_one_count_as_one(model, heads, monkeypatch):
    """transformers treats any non-zero mask value as 1 (a token): the positions must not shift."""
    ids = _ids()
    ones = torch.ones_like(ids)
    ones[1, 0] = 0
    twos = ones.clone()
    twos[1, 2] = 2
    twos[0, 3] = 7
    seen = []
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        if kwargs.get("position_ids") is not None:
            seen.append(kwargs["position_ids"].clone())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    a = mtp_ext.generate(model, ids, heads, attention_mask=ones, max_new_tokens=5, tree=4)
    first = list(seen)
    seen.clear()
    b = mtp_ext.generate(model, ids, heads, attention_mask=twos, max_new_tokens=5, tree=4)
    assert torch.equal(a, b)
    assert len(first) == len(seen) and all(torch.equal(x, y) for x, y in zip(first, seen))


@pytest.mark.parametrize("field,value,match", [
    ("num_heads", "3", "num_heads must be an int"),
    ("num_heads", True, "num_heads must be an int"),
    ("hidden_size", 48.0, "hidden_size must be an int"),
    ("rms_norm_eps", -1.0, "rms_norm_eps must be a positive"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a positive"),
    ("draft_vocab_size", "8", "draft_vocab_size must be an int"),
    ("whs_per_channel", "yes", "whs_per_channel must be a bool"),
])
def test_config_types_checked_on_load(model, heads, tmp_path, field, value, match):
    heads.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        MTPHeads.from_pretrained(tmp_path, model)


@pytest.mark.parametrize("ids", [[0, 1, VOCAB], [0, -1, 2], [3, 3, 4]])
def test_draft_vocabulary_checked_on_load(model, tmp_path, ids):
    h = MTPHeads.for_model(model, 2, kind="resblock", draft_vocab_size=3)
    h.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "heads.safetensors"
    state = load_file(path)
    state["vocab_ids"] = torch.tensor(ids)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="vocab_ids"):
        MTPHeads.from_pretrained(tmp_path, model)


def test_config_accepts_what_it_saves():
    cfg = MTPHeadsConfig(num_heads=2, hidden_size=8, vocab_size=10, rms_norm_eps=1e-5)
    assert MTPHeadsConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
