"""``bench/chat_agreement.py``: heads scored against the backbone's greedy token at answer positions
only, per depth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from helpers import perturbed_heads, tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("chat_agreement",
                                                  ROOT / "bench" / "chat_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["conditioned", "eagle", "resblock"])
def test_counts_only_answer_positions_and_checks_hits_by_hand(bench, kind):
    pytest.importorskip("transformers")
    model = tiny_llama(90, 48, 96, 2, seed=3)
    heads = perturbed_heads(model, kind, seed=1, scale=0.05).eval()
    ids = torch.randint(0, 90, (1, 20), generator=torch.Generator().manual_seed(2))
    record = {"answer_spans": [[5, 9], [14, 30]]}
    in_answer = bench.answer_mask(record, 20)[None]
    assert in_answer[0].tolist() == [5 <= i < 9 or i >= 14 for i in range(20)]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        greedy = out.logits.argmax(-1)
        sums = bench.score(heads, out.hidden_states, ids, greedy, in_answer)
        logits = heads(out.hidden_states, heads.teacher_tokens(ids, 3)).float()
    for d in (1, 2, 3):
        want_hits, want_n = 0, 0
        for t in range(20 - 1 - d):
            if in_answer[0, t + 1 + d]:
                want_n += 1
                want_hits += int(logits[0, t, d - 1].argmax() == greedy[0, t + d])
        assert sums[d - 1, 2] == want_n and sums[d - 1, 0] == want_hits
        assert sums[d - 1, 0] <= sums[d - 1, 1] <= sums[d - 1, 2]
    none = bench.score(heads, out.hidden_states, ids, greedy, torch.zeros(1, 20, dtype=torch.bool))
    assert none.sum() == 0
