"""The heads shipped for SmolLM2-135M (``mtp_ext.load_heads``).

Fast: the files are there, hold what the config says, finite values, a valid draft vocabulary.
Slow (real model): they load onto SmolLM2, reach at least half the accuracy goal on a validation
slice (a broken or stale file fails), and 512 greedy tokens equal ``model.generate``'s.
"""

from __future__ import annotations

import json

import pytest
import torch

from mtp_ext.heads.shipped import SHIPPED_HEADS, SHIPPED_VARIANTS, load_heads, shipped_heads_dir

VARIANTS = sorted(SHIPPED_VARIANTS["smollm2-135m"])

# The goal for head 1 (top-1 / top-5 agreement with the backbone's greedy token); tests ask half.
GOAL_TOP1, GOAL_TOP5 = 0.50, 0.75


@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_files_are_consistent(variant):
    from safetensors.torch import load_file

    folder = shipped_heads_dir("smollm2-135m", variant)
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone"] == "smollm2-135m"
    assert (config["hidden_size"], config["vocab_size"], config["num_layers"]) == (576, 49152, 30)
    state = load_file(folder / "heads.safetensors")
    H, D = config["num_heads"], config["hidden_size"]
    assert all(torch.isfinite(v.float()).all() for v in state.values() if v.is_floating_point())
    assert config["kind"] == {"eagle3": "eagle"}.get(variant, variant.split("-")[0])
    if config["kind"] == "conditioned":
        assert state["proj"].shape == (H, D, 2 * D) and state["weight"].shape == (H, D, D)
    if variant == "eagle3":  # EAGLE-3: fc over three fused layers, attention over [embed; h]
        assert config["fuse_layers"] == [2, 15, 27]
        assert state["fc.weight"].shape == (D, 3 * D)
        assert state["layer.self_attn.q_proj.weight"].shape == (D, 2 * D)
    if config["draft_vocab_size"]:
        ids = state["vocab_ids"]
        assert ids.shape == (config["draft_vocab_size"],)
        assert ids.unique().numel() == ids.numel() and 0 <= int(ids.min()) and int(ids.max()) < 49152
    size = sum((folder / f).stat().st_size for f in ("config.json", "heads.safetensors"))
    assert size < 16 * 2**20, size  # a few MB inside the package


def test_unknown_name_and_variant():
    with pytest.raises(ValueError, match="no heads ship"):
        load_heads("gpt-17")
    with pytest.raises(ValueError, match="no 'medusa' heads ship"):
        shipped_heads_dir("smollm2-135m", "medusa")
    assert "smollm2-135m" in SHIPPED_HEADS
    default = SHIPPED_HEADS["smollm2-135m"]
    assert default in VARIANTS
    assert shipped_heads_dir("smollm2-135m") == shipped_heads_dir("smollm2-135m", default)


@pytest.fixture(scope="module")
def smollm2():
    from mtp_ext.data.assets import load_model

    try:
        return load_model("smollm2-135m")
    except (FileNotFoundError, ImportError) as exc:  # assets not prepared on this machine
        pytest.skip(f"SmolLM2 not available: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_shipped_heads_reach_half_the_goal(smollm2, variant):
    from mtp_ext.data.texts import load_text
    from mtp_ext.training import TrainConfig, build_cache, evaluate, tokenize_texts

    model, tok = smollm2
    heads = load_heads("smollm2-135m", model, variant=variant)
    ids = tokenize_texts(load_text("web", "validation"), tok, 256, max_tokens=2048)
    cfg = TrainConfig(seq_len=256, progress=False)
    res = evaluate(heads, build_cache(model, heads, ids, cfg), cfg)
    top1, top5 = res["top1_greedy"][0], res["top5_greedy"][0]
    assert top1 >= GOAL_TOP1 / 2 and top5 >= GOAL_TOP5 / 2, (top1, top5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_512_greedy_tokens_equal_model_generate(smollm2, variant):
    import mtp_ext
    from mtp_ext.cli.compare import encode_prompt

    model, tok = smollm2
    heads = load_heads("smollm2-135m", model, variant=variant)
    ids = encode_prompt(tok, "Write a long story about a lighthouse keeper and a storm.", chat=True)
    kw = dict(max_new_tokens=512, do_sample=False, eos_token_id=[])  # no early stop: 512 tokens
    want = model.generate(ids, **kw)
    out = mtp_ext.generate(model, ids, heads, tree=8, return_dict_in_generate=True, **kw)
    assert out.sequences.shape[1] == ids.shape[1] + 512
    assert torch.equal(out.sequences, want)
    assert out.tokens_per_step > 1.0


@pytest.mark.slow
def test_gemma3_real_model_decodes_like_generate():
    """The real Gemma 3 270M (sliding windows, soft-capping, 262k vocabulary) with fresh heads."""
    import mtp_ext
    from mtp_ext.data.assets import load_model
    from mtp_ext.heads import MTPHeads

    try:
        model, tok = load_model("gemma3-270m")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"Gemma 3 not available: {exc}")
    heads = MTPHeads.for_model(model, 2, kind="conditioned")
    ids = tok("The three primary colors are", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=40, do_sample=False)
    want = model.generate(ids, **kw)
    for tree in (1, 6):
        assert torch.equal(mtp_ext.generate(model, ids, heads, tree=tree, **kw), want), tree
