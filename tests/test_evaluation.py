"""The evaluation harness (mtp_ext.evaluation): tree-attention branches against explicit forward
passes, marginalization against brute force, the heads study, records, report and CLI."""

from __future__ import annotations

import json
import time

import pytest
import torch

from helpers import tiny_causal_lm, tiny_llama, word_tokenizer
from mtp_ext.evaluation import EvalConfig, HeadStudyConfig, evaluate, quick_config, write_report
from mtp_ext.evaluation.branches import branch_mask, forward_with_nodes
from mtp_ext.evaluation.head_study import grid_layers
from mtp_ext.evaluation.marginal import score_exact, score_marginal, score_ntp
from mtp_ext.evaluation.samples import Sample, build_samples, training_windows
from mtp_ext.evaluation.tally import Tally

V = 24


def _model(arch: str = "llama"):
    if arch == "llama":
        return tiny_llama(V, 32, 64, layers=2, name="tiny")
    return tiny_causal_lm(arch, vocab=V)


def _sample(L: int = 9, seed: int = 0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (L,), generator=g)
    scored = torch.ones(L, dtype=torch.bool)
    scored[0] = False
    return Sample(ids, scored)


def _next_probs(model, prefix: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(prefix[None]).logits[0, -1].double(), -1)


def _values(tally: Tally) -> dict:
    return {(r["method"], r["offset"], r["k"], r["metric"]): r for r in tally.records()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_nodes_see_only_their_prefix(arch):
    model = _model(arch)
    ids = torch.randint(0, V, (11,), generator=torch.Generator().manual_seed(1))
    attach = torch.tensor([2, 2, 2, 6, 6, 6, 0, 10])
    parent = torch.tensor([-1, -1, 0, -1, 3, 4, -1, -1])
    tokens = torch.randint(0, V, (8,), generator=torch.Generator().manual_seed(2))
    out = forward_with_nodes(model, ids, attach, parent, tokens).logits[0].float()
    paths = {0: [0], 1: [1], 2: [0, 2], 3: [3], 4: [3, 4], 5: [3, 4, 5], 6: [6], 7: [7]}
    with torch.no_grad():
        text = model(ids[None]).logits[0].float()
        torch.testing.assert_close(out[:11], text, atol=1e-5, rtol=1e-5)
        for i, path in paths.items():
            x = torch.cat([ids[: attach[i] + 1], tokens[path]])[None]
            torch.testing.assert_close(out[11 + i], model(x).logits[0, -1].float(),
                                       atol=1e-5, rtol=1e-5)


def test_branch_mask_shape_positions_and_bad_trees():
    allowed, pos = branch_mask(4, torch.tensor([1, 1, 3]), torch.tensor([-1, 0, -1]))
    assert allowed.shape == (7, 7)
    assert pos.tolist() == [0, 1, 2, 3, 2, 3, 4]
    assert allowed[5].tolist() == [True, True, False, False, True, True, False]
    with pytest.raises(ValueError, match="earlier node"):
        branch_mask(4, torch.tensor([1, 1]), torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="same text position"):
        branch_mask(4, torch.tensor([1, 2]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="attach positions"):
        branch_mask(4, torch.tensor([4]), torch.tensor([-1]))


def test_ntp_scores_match_direct_computation():
    model, s = _model(), _sample()
    with torch.no_grad():
        logits = model(s.ids[None]).logits[0]
    tally = Tally()
    score_ntp(tally, s, logits)
    got = _values(tally)
    lp = torch.log_softmax(logits[:-1].double(), -1)
    top1 = (logits[:-1].argmax(-1) == s.ids[1:]).double().mean()
    nll = -lp.gather(-1, s.ids[1:, None]).mean()
    assert got[("ntp", 1, None, "top1_text")]["value"] == pytest.approx(float(top1))
    assert got[("ntp", 1, None, "nll_text")]["value"] == pytest.approx(float(nll), rel=1e-5)
    assert got[("ntp", 1, None, "nll_text")]["positions"] == 8


def test_marginal_with_all_tokens_is_the_exact_marginal():
    """k = V for t+2 and for t+3 (V^2 paths) against brute force over every intermediate token."""
    model, s = _model(), _sample(L=6)
    with torch.no_grad():
        logits = model(s.ids[None]).logits[0]
    tally = Tally()
    score_marginal(tally, model, s, logits, ks=(1, V), ks3=(V,), chunk_nodes=200)
    got = _values(tally)
    nll2, nll3 = [], []
    for t in range(0, 6 - 2):
        p1 = _next_probs(model, s.ids[: t + 1])
        q2 = sum(p1[v] * _next_probs(model, torch.cat([s.ids[: t + 1], torch.tensor([v])]))
                 for v in range(V))
        nll2.append(-q2[s.ids[t + 2]].log())
        if t + 3 < 6:
            q3 = torch.zeros(V, dtype=torch.float64)
            for v in range(V):
                pre = torch.cat([s.ids[: t + 1], torch.tensor([v])])
                p2 = _next_probs(model, pre)
                for u in range(V):
                    q3 += p1[v] * p2[u] * _next_probs(model, torch.cat([pre, torch.tensor([u])]))
            nll3.append(-q3[s.ids[t + 3]].log())
    r2 = got[("marginal", 2, V, "nll_text")]
    assert r2["value"] == pytest.approx(float(torch.stack(nll2).mean()), rel=1e-4)
    assert r2["model_tokens"] == 4 * (1 + V)
    assert got[("marginal", 2, V, "mass")]["value"] == pytest.approx(1.0, abs=1e-5)
    assert got[("marginal_raw", 2, V, "nll_text")]["value"] == pytest.approx(r2["value"], rel=1e-5)
    assert got[("marginal", 3, V, "nll_text")]["value"] == pytest.approx(
        float(torch.stack(nll3).mean()), rel=1e-4)
    assert got[("marginal", 3, V, "mass")]["model_tokens"] == 3 * (1 + V + V * V)
    # k = 1: the mixture is the single branch of the argmax token; raw NLL adds -log p(argmax).
    k1 = got[("marginal", 2, 1, "nll_text")]["value"]
    raw1 = got[("marginal_raw", 2, 1, "nll_text")]["value"]
    assert raw1 > k1


def test_exact_slice_matches_brute_force_and_tv_shrinks_to_zero():
    model, s = _model(), _sample()
    with torch.no_grad():
        logits = model(s.ids[None]).logits[0]
    tally = Tally()
    score_exact(tally, model, s, 3, logits, ks=(1, 4, V), chunk_nodes=7)
    got = _values(tally)
    p1 = _next_probs(model, s.ids[:4])
    q = sum(p1[v] * _next_probs(model, torch.cat([s.ids[:4], torch.tensor([v])])) for v in range(V))
    assert got[("marginal_slice", 2, V, "nll_text")]["value"] == pytest.approx(
        float(-q[s.ids[5]].log()), rel=1e-6)
    tv = [got[("marginal_slice", 2, k, "tv_exact")]["value"] for k in (1, 4, V)]
    assert tv[2] == pytest.approx(0.0, abs=1e-9)
    assert tv[0] >= tv[1] - 1e-9 > -1


def test_scored_mask_limits_positions():
    model = _model()
    ids = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(3))
    scored = torch.zeros(10, dtype=torch.bool)
    scored[6:] = True  # e.g. the Spanish half of a pair
    s = Sample(ids, scored)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    tally = Tally()
    score_ntp(tally, s, logits)
    score_marginal(tally, model, s, logits, ks=(2,), ks3=(2,))
    got = _values(tally)
    assert got[("ntp", 1, None, "top1_text")]["positions"] == 4  # targets 6..9
    assert got[("marginal", 2, 2, "top1_text")]["positions"] == 4
    assert got[("marginal", 3, 2, "top1_text")]["positions"] == 4


def test_samples_score_only_the_spanish_side():
    tok = word_tokenizer(V)
    items = ["w1 w2 w3\tw4 w5", "w6\tw7 w8 w9"]
    out = build_samples(tok, "en-es", count=2, seq_len=64, items=items)
    assert len(out) == 2
    for s in out:
        n = int(s.scored.sum())
        assert n in (2, 3) and bool(s.scored[-n:].all()) and not bool(s.scored[:-n].any())
    windows = build_samples(tok, "web", count=3, seq_len=5, items=["w1 w2 w3 w4"] * 10)
    assert len(windows) == 3 and all(w.ids.numel() == 5 and not w.scored[0] for w in windows)
    with pytest.raises(ValueError, match="English"):
        build_samples(tok, "en-es", count=1, items=["no tab here"])
    with pytest.raises(ValueError, match="same length|one length"):
        Sample(torch.zeros(3, dtype=torch.long), torch.ones(2, dtype=torch.bool))


def test_grid_layers_include_first_and_last():
    assert grid_layers(30, 3) == tuple(range(0, 31, 3))
    assert grid_layers(18, 4) == (0, 4, 8, 12, 16, 18)


def test_train_heads_on_a_shared_all_layer_cache_matches_its_own_cache(monkeypatch):
    from mtp_ext.training import cache as cache_mod
    from mtp_ext.heads import MTPHeads
    from mtp_ext.training import TrainConfig, build_cache, select_layer, train_heads

    model = tiny_llama(V, 32, 64, layers=3)
    ids = torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(4))
    cfg = TrainConfig(steps=5, seq_len=16, batch_positions=32, eval_every=0, progress=False)
    whs = MTPHeads.for_model(model, 2, layer="whs")
    with pytest.warns(UserWarning, match="caching all"):
        allc = build_cache(model, whs, ids, cfg)
    a = MTPHeads.for_model(model, 2, layer=1)
    b = MTPHeads.for_model(model, 2, layer=1)
    ra = train_heads(model, None, a, ids, ids[:2], cfg)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("given caches must not be rebuilt")

    monkeypatch.setattr(cache_mod, "build_cache", no_rebuild)
    rb = train_heads(model, None, b, ids, ids[:2], cfg, train_cache=select_layer(allc, 1),
                     val_cache=select_layer(allc, 1))
    assert ra["history"]["loss"] == pytest.approx(rb["history"]["loss"], rel=1e-5)
    torch.testing.assert_close(a.weight, b.weight)
    with pytest.raises(ValueError, match="all-layer cache"):
        select_layer(select_layer(allc, 1), 0)


def _items():
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, V - 2, (n,), generator=g))

    texts = {s: [words(30) for _ in range(40)] for s in ("train", "validation", "test")}
    pairs = {s: [words(8) + "\t" + words(10) for _ in range(40)] for s in ("train", "validation", "test")}
    return lambda name, split: pairs[split] if name == "en-es" else texts[split]


def test_quick_evaluation_records_every_method(tmp_path):
    model, tok = tiny_llama(V, 32, 64, layers=3, name="tiny"), word_tokenizer(V)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = quick_config(exact_positions=1, progress=False)
    res = evaluate(model, tok, cfg, items_for=_items())
    recs = res["records"]
    fields = {"model", "dataset", "split", "method", "k", "layer", "offset", "metric", "value",
              "positions", "model_tokens", "windows"}
    assert all(fields <= set(r) <= fields | {"lo", "hi"} for r in recs)
    # per-window sums add up to the record; 95% intervals around the value where 2+ windows scored
    for r in recs:
        assert sum(c for _, c in r["windows"]) == r["positions"]
        assert sum(t for t, _ in r["windows"]) == pytest.approx(r["value"] * r["positions"])
        if sum(c > 0 for _, c in r["windows"]) >= 2:
            assert r["lo"] <= r["value"] + 1e-12 and r["value"] <= r["hi"] + 1e-12
    assert any("lo" in r for r in recs)
    methods = {r["method"] for r in recs}
    assert {"ntp", "marginal", "marginal_raw", "marginal_slice", "head_frozen", "head_whs",
            "head_heads-only", "head_joint", "head_joint+difflr", "head_joint+difflr+warmup",
            "ntp_joint", "ntp_joint+difflr+warmup"} <= methods
    assert {r["dataset"] for r in recs} == {"en-es", "web", "austen", "python"}
    assert {r["layer"] for r in recs if r["method"] == "head_frozen"} == {0, 3}
    for r in recs:
        assert r["positions"] > 0 and r["model_tokens"] > 0
        if r["metric"].startswith("top"):
            assert 0.0 <= r["value"] <= 1.0
    # The model the caller passed is unchanged (joint training works on copies).
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # Heads-only joint variant never touches the backbone: its NTP equals the model's.
    ntp = {(r["dataset"], r["method"]): r["value"] for r in recs if r["metric"] == "top1_text"}
    for ds in ("web", "en-es"):
        assert ntp[(ds, "ntp_heads-only")] == pytest.approx(ntp[(ds, "ntp")])
    paths = write_report([res], str(tmp_path), plot=True, command="mtp-ext eval --quick")
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["records"]) == len(recs) and data["command"] == "mtp-ext eval --quick"
    md = (tmp_path / "results.md").read_text()
    assert "Marginalization for t+2" in md and "| web | 4 |" in md
    assert len(paths["figures"]) == 4 and all((tmp_path / p.split("/")[-1]).stat().st_size > 1000
                                              for p in paths["figures"])


def test_training_windows_mix_datasets():
    tok = word_tokenizer(V)
    w = training_windows(tok, ["web", "en-es"], "train", 64, 16, items_for=_items())
    assert w.dim() == 2 and w.shape[1] == 16 and w.shape[0] == 8


def test_bad_configs_name_the_problem():
    with pytest.raises(ValueError, match="k must be >= 1"):
        EvalConfig(ks=(0, 2))
    with pytest.raises(ValueError, match="unknown joint variants"):
        HeadStudyConfig(joint_variants=("nope",))
    with pytest.raises(ValueError, match="datasets"):
        EvalConfig(datasets=())


def test_cli_eval_on_a_model_folder(tmp_path, monkeypatch):
    from mtp_ext import cli
    from mtp_ext.evaluation import study

    folder = tmp_path / "tiny"
    tiny_llama(V, 32, 64, layers=2).save_pretrained(folder)
    word_tokenizer(V).save_pretrained(folder)
    monkeypatch.setattr(study, "load_items", _items())
    out = tmp_path / "out"
    rc = cli.main(["eval", "--model", str(folder), "--quick", "--datasets", "web,en-es",
                   "--ks", "1,2", "--ks3", "1", "--joint-variants", "joint", "--no-whs",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    assert {r["k"] for r in recs if r["method"] == "marginal"} == {1, 2}
    assert {r["method"] for r in recs if r["method"].startswith("head_")} == {"head_frozen",
                                                                              "head_joint"}
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(folder), "--datasets", "klingon", "--out", str(out)])


@pytest.mark.slow
def test_quick_mode_on_smollm2_under_ten_minutes(tmp_path):
    pytest.importorskip("gguf")
    from mtp_ext import cli

    t0 = time.perf_counter()
    rc = cli.main(["eval", "--quick", "--out", str(tmp_path), "--plot", "--no-progress"])
    elapsed = time.perf_counter() - t0
    assert rc == 0 and elapsed < 600
    recs = json.loads((tmp_path / "results.json").read_text())["records"]
    ntp = [r for r in recs if r["method"] == "ntp" and r["metric"] == "top1_text"]
    assert len(ntp) == 4 and all(0.15 < r["value"] < 0.7 for r in ntp)
    m = {(r["dataset"], r["k"]): r["value"] for r in recs
         if r["method"] == "marginal" and r["offset"] == 2 and r["metric"] == "mass"}
    assert all(m[(ds, 8)] > m[(ds, 1)] for ds in ("web", "python"))
