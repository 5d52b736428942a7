"""``generate``'s default tree: the controller's steps (``mtp_ext.controlled_steps``), the plain
floor step and the measured step costs (``mtp_ext.step_costs``), on tiny random-weight models with
injected cost models of different machines."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import decoding_llama, left_padded_prompts, perturbed_heads, tiny_causal_lm

from mtp_ext import controlled_steps, ops, step_costs
from mtp_ext.decoding import generate
from mtp_ext.settings import GenerationSettings
from mtp_ext.tree_step import plain_step, prefill

transformers = pytest.importorskip("transformers")

VOCAB = 120


class Costs:
    """An injected cost model (milliseconds)."""

    def __init__(self, plain_ms, draft_ms, per_node):
        self.plain_ms, self.draft_ms, self.per_node = plain_ms, draft_ms, per_node

    def step_ms(self, tree, lookup):
        if tree <= 1 and lookup <= 0:
            return self.plain_ms
        return self.plain_ms + self.per_node * (tree + lookup - 1) + (self.draft_ms if tree > 1 else 0)


CHEAP = Costs(30.0, 0.5, 0.05)  # trees cost almost nothing: always draft
COSTLY = Costs(30.0, 3000.0, 300.0)  # no tree can pay: plain steps, occasional re-checks


@pytest.fixture(scope="module")
def model():
    return decoding_llama(VOCAB)


@pytest.fixture
def inject(monkeypatch):
    def use(costs):
        monkeypatch.setattr(controlled_steps, "step_costs", lambda *a, **k: costs)
    return use


def _prompts(B, P, seed, pad=()):
    return left_padded_prompts(VOCAB, B, P, seed, pad)


@pytest.mark.parametrize("costs", [CHEAP, COSTLY], ids=["cheap", "costly"])
@pytest.mark.parametrize("lookup", [0, 8])
@pytest.mark.parametrize("kind", ["conditioned", "linear", "transformer"])
def test_greedy_equals_model_generate(model, inject, costs, lookup, kind):
    inject(costs)
    heads = perturbed_heads(model, kind, 0, 0.05)
    ids, _ = _prompts(1, 9, seed=1)
    ids = torch.cat([ids, ids, ids], 1)  # repeats: prompt lookup finds matches
    want = model.generate(ids, max_new_tokens=40, do_sample=False)
    out = generate(model, ids, heads, max_new_tokens=40, do_sample=False,
                   prompt_lookup_num_tokens=lookup, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert len(out.plans) == out.steps
    if costs is COSTLY:
        assert sum(p == (1, 0) for p in out.plans) >= out.steps - 6  # plain, bar the re-checks
    elif lookup:  # the repeated prompt: the lookup branch runs on (almost) every step
        assert sum(k > 0 for _, k in out.plans) >= out.steps - 2
    else:  # random heads are barely confident, yet trees this cheap still pay
        assert sum(t > 1 for t, _ in out.plans) >= out.steps // 2


@pytest.mark.parametrize("costs", [CHEAP, COSTLY], ids=["cheap", "costly"])
def test_padded_batch_equals_model_generate(model, inject, costs):
    inject(costs)
    heads = perturbed_heads(model, "conditioned", 1, 0.05)
    ids, mask = _prompts(3, 10, seed=2, pad=[(0, 3), (2, 6)])
    want = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out = generate(model, ids, heads, attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(out, want)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("costs", [CHEAP, COSTLY], ids=["cheap", "costly"])
def test_other_families_and_sliding_windows(inject, arch, costs):
    inject(costs)
    m = tiny_causal_lm(arch, vocab=150)
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    heads = perturbed_heads(m, "conditioned", 0, 0.05)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 150, (1, 20), generator=g)  # + 40 new tokens: past the window of 24
    want = m.generate(ids, max_new_tokens=40, do_sample=False)
    assert torch.equal(generate(m, ids, heads, max_new_tokens=40, do_sample=False), want)
    ids2 = torch.randint(1, 150, (2, 20), generator=g)
    mask = torch.ones_like(ids2)
    mask[1, :5] = 0
    ids2 = ids2.masked_fill(mask == 0, 0)
    want = m.generate(ids2, attention_mask=mask, max_new_tokens=40, do_sample=False)
    assert torch.equal(generate(m, ids2, heads, attention_mask=mask, max_new_tokens=40,
                                do_sample=False), want)


def test_plain_steps_do_not_draft(model, inject, monkeypatch):
    """With trees that never pay, the heads draft only on the re-checks (first step, then
    intervals 4, 8, 16, ...), and a plain step runs no tree op."""
    inject(COSTLY)
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    drafts = {"n": 0}
    real = type(heads).draft_step

    def counting(self, *a, **k):
        drafts["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(type(heads), "draft_step", counting)
    ids, _ = _prompts(1, 9, seed=4)
    calls = {"mask": 0, "verify": 0}
    for name in ("tree_attention_mask", "verify_tree_from_hidden"):
        fn = getattr(ops, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls["mask" if _name == "tree_attention_mask" else "verify"] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(ops, name, wrapped)
    out = generate(model, ids, heads, max_new_tokens=100, do_sample=False,
                   prompt_lookup_num_tokens=0, return_dict_in_generate=True)
    probes = sum(t > 1 for t, _ in out.plans)
    assert 1 <= probes <= 6
    assert drafts["n"] == probes * heads.config.num_heads
    assert calls["verify"] == probes and calls["mask"] == probes


def test_plain_step_sampling_with_top_k_1_is_greedy(model):
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    ids, _ = _prompts(2, 6, seed=5)
    settings = GenerationSettings(max_new_tokens=0, do_sample=True, temperature=1.0, top_k=1,
                                  top_p=1.0, eos_token_ids=(), pad_token_id=None)
    greedy = GenerationSettings(max_new_tokens=0, do_sample=False, temperature=1.0, top_k=0,
                                top_p=1.0, eos_token_ids=(), pad_token_id=None)
    uni = lambda shape: torch.rand(shape)  # noqa: E731
    outs = []
    for s in (settings, greedy):
        state, _ = prefill(model, heads, ids, torch.ones_like(ids), s, uni, ops)
        outs.append([plain_step(model, heads, state, s, uni, ops).emitted for _ in range(5)])
    assert outs[0] == outs[1]


def test_sampling_runs_and_emits_valid_tokens(model, inject):
    inject(CHEAP)
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    ids, _ = _prompts(2, 6, seed=6)
    out = generate(model, ids, heads, max_new_tokens=20, do_sample=True, temperature=0.8,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 26) and int(out.min()) >= 0 and int(out.max()) < VOCAB


# ---------------------------------------------------------------------------- measured costs


def test_measure_step_costs_on_a_tiny_model(model):
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    c = step_costs.measure_step_costs(model, heads, batch=2, nodes=(1, 4, 16), repeats=2)
    assert c.nodes == [1, 4, 16] and len(c.forward_ms) == 3 and c.batch == 2
    assert c.plain_ms > 0 and c.draft_ms > 0 and all(v > 0 for v in c.forward_ms)
    assert c.step_ms(1, 0) == c.plain_ms
    assert c.step_ms(4, 0) == pytest.approx(c.forward_ms[1] + c.draft_ms)
    assert c.step_ms(1, 3) == pytest.approx(c.forward_ms[1])
    mid = c.forward(10)
    assert min(c.forward_ms[1:]) - 1e-9 <= mid <= max(c.forward_ms[1:]) + 1e-9


def _count_measurements(monkeypatch) -> dict:
    """Counts step-cost measurements, each cut to 2 node counts and 1 round (nothing known from
    other tests)."""
    monkeypatch.setattr(step_costs, "_KNOWN", {})
    calls = {"n": 0}
    real = step_costs.measure_step_costs

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a[:5], nodes=(1, 2), repeats=1)

    monkeypatch.setattr(step_costs, "measure_step_costs", counted)
    return calls


def test_step_costs_cache(model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path))
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    calls = _count_measurements(monkeypatch)
    first = step_costs.step_costs(model, heads)
    assert calls["n"] == 1 and "measuring decoding step costs" in capsys.readouterr().err
    assert step_costs.step_costs(model, heads) == first and calls["n"] == 1
    files = list((tmp_path / "step_costs").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["plain_ms"] == first.plain_ms
    step_costs.step_costs(model, heads, batch=4)  # another batch size: another entry
    assert calls["n"] == 2
    files[0].write_text("{ damaged")
    assert step_costs.step_costs(model, heads) == first  # read once per process
    monkeypatch.setattr(step_costs, "_KNOWN", {})  # a new process finds the damaged file
    step_costs.step_costs(model, heads)
    assert calls["n"] == 3  # re-measured, no error


def test_step_costs_unwritable_cache(model, tmp_path, monkeypatch, capsys):
    """Where the cache cannot be written the costs are kept for the process, said once."""
    monkeypatch.setenv("MTP_EXT_CACHE", str(tmp_path))

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(step_costs, "write_file", refuse)
    heads = perturbed_heads(model, "linear", 0, 0.05)
    calls = _count_measurements(monkeypatch)
    step_costs.step_costs(model, heads, quiet=True)
    assert "kept for this process" in capsys.readouterr().err
    step_costs.step_costs(model, heads, quiet=True)
    assert calls["n"] == 1 and "kept" not in capsys.readouterr().err


def test_a_second_call_with_the_same_heads_starts_from_what_the_first_learned(model, inject):
    """Where trees never pay, a call after a first one with the same heads does not draft its
    first step (the floor costs no re-check at the start); other heads, or after
    ``forget_priors``, learn again."""
    inject(COSTLY)
    controlled_steps.forget_priors()
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    ids, _ = _prompts(1, 9, seed=5)
    kw = dict(max_new_tokens=60, do_sample=False, prompt_lookup_num_tokens=0,
              return_dict_in_generate=True)
    first = generate(model, ids, heads, **kw)
    assert first.plans[0][0] > 1  # drafted to learn the heads
    second = generate(model, ids, heads, **kw)
    assert torch.equal(second.sequences, first.sequences)
    assert second.plans[0] == (1, 0) and all(t == 1 for t, _ in second.plans)
    other = perturbed_heads(model, "conditioned", 1, 0.05)
    assert generate(model, ids, other, **kw).plans[0][0] > 1
    controlled_steps.forget_priors()
    assert generate(model, ids, heads, **kw).plans[0][0] > 1
