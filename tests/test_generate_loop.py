"""The decoding loop's own discipline: one host read of device data per step, buffers that grow
without copying per step, host-side prompt lookup; and on a GPU, greedy equality with
``model.generate`` plus exactly one device synchronization per step (CUDA's sync debug mode)."""

from __future__ import annotations

import collections
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

from helpers import CUDA_AVAILABLE, decoding_llama, perturbed_heads

from mtp_ext.decoding import generate
from mtp_ext.tree_step import HostContexts, SlotTable
from mtp_ext.trees import lookup_draft

transformers = pytest.importorskip("transformers")

VOCAB = 120

# Tensor methods that hand device data to the host (each one a synchronization on a GPU).
_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


class ReadCounter:
    """Counts calls of the reading Tensor methods, by (method, calling function), and snapshots
    the total at every decoding step through ``generate``'s step hook."""

    def __init__(self, exclude_callers=()):
        self.exclude = set(exclude_callers)
        self.calls = collections.Counter()
        self.total = 0
        self.at_step: list[int] = []
        self._orig = {}

    def on_step(self, *args):
        self.at_step.append(self.total)

    def __enter__(self):
        for name in _READS:
            self._orig[name] = orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                caller = sys._getframe(1).f_code.co_name
                if caller not in self.exclude:
                    self.calls[(_name, caller)] += 1
                    self.total += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)

    def per_step(self) -> list[int]:
        return [b - a for a, b in zip(self.at_step, self.at_step[1:])]


@pytest.fixture(scope="module")
def model():
    return decoding_llama(VOCAB)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("tree", [6, [(0,), (1,), (0, 0), (0, 0, 0)]], ids=["dynamic", "static"])
def test_one_host_read_per_step(model, do_sample, tree):
    """Between two steps the loop reads device data exactly once (the accepted counts and tokens,
    in one copy); prompt lookup works on host buffers only (its reads are excluded here, and
    ``test_lookup_contexts_are_host_buffers`` checks they are host tensors)."""
    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    # Prompt lookup and its length schedule read only host tensors (the contexts, the branch).
    with ReadCounter(exclude_callers={"lookup_draft", "_next_lookup_length"}) as rc:
        out = generate(model, ids, heads, max_new_tokens=40, tree=tree, do_sample=do_sample,
                       top_k=20, generator=torch.Generator().manual_seed(0),
                       return_dict_in_generate=True, prompt_lookup_num_tokens=4,
                       _on_step=rc.on_step)
    assert out.steps >= 8
    assert rc.per_step() == [1] * (out.steps - 1), rc.calls
    assert rc.calls[("tolist", "read_step")] == out.steps


def test_lookup_contexts_are_host_buffers(model):
    ids = torch.tensor([[0, 0, 5, 6, 7, 5, 6], [1, 2, 3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    ctx = HostContexts(ids, mask, reserve=2)
    assert ctx.row(0).tolist() == [5, 6, 7, 5, 6] and ctx.row(0).device.type == "cpu"
    for step in range(20):  # grows past its reserve by doubling
        ctx.extend(1, [100 + step, 7])
    assert ctx.row(1).tolist()[:7] == list(range(1, 8))
    assert ctx.row(1).tolist()[7:] == sum(([100 + s, 7] for s in range(20)), [])
    drafts = ctx.lookup(3, [True, False])
    assert drafts.tolist() == [[7, 5, 6], [-1, -1, -1]]
    assert torch.equal(drafts[0], lookup_draft(ctx.row(0), 3))
    assert ctx.lookup(3, [False, False]) is None


def test_slot_table_grows_like_concatenation():
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(3, 5, generator=g) > 0.3
    pos = torch.randint(0, 50, (3, 5), generator=g)
    table = SlotTable(valid, pos)
    want_v, want_p = valid, pos
    first_buffer = table.valid.data_ptr()
    grown = False
    for n in [1, 4, 7, 2, 16, 3, 30]:
        v = torch.rand(3, n, generator=g) > 0.5
        p = torch.randint(0, 50, (3, n), generator=g)
        table.append(v, p)
        want_v, want_p = torch.cat([want_v, v], 1), torch.cat([want_p, p], 1)
        grown |= table.valid.data_ptr() != first_buffer
        assert table.length == want_v.shape[1]
        assert torch.equal(table.valid, want_v) and torch.equal(table.pos, want_p)
    assert grown and table.capacity < 2 * table.length + 16


# ------------------------------------------------------------------------------------------------
# On a GPU
# ------------------------------------------------------------------------------------------------

def _cuda_model_and_heads():
    """The tiny model and perturbed heads, built on the CPU, then both moved to the GPU."""
    m = decoding_llama(VOCAB)
    heads = perturbed_heads(m, "conditioned", 0, 0.05)
    return m.cuda(), heads.cuda()


@pytest.mark.parametrize("tree", [1, 6, "chain", [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]],
                         ids=lambda t: str(t)[:12])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
def test_cuda_greedy_equals_model_generate(tree, batch):
    m, heads = _cuda_model_and_heads()
    ids = torch.randint(1, VOCAB, (batch, 9), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :4] = 0
        ids = ids.masked_fill(mask == 0, 0)
    ids, mask = ids.cuda(), mask.cuda()
    want = m.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False)
    got = generate(m, ids, heads, attention_mask=mask, max_new_tokens=48, tree=tree)
    assert got.device == want.device and torch.equal(got, want)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA is not available")
def test_cuda_one_synchronization_per_step(do_sample, monkeypatch):
    """Under CUDA's sync debug mode every synchronizing call warns: between two steps there must
    be exactly one (the value checks of the ops, which synchronize, are switched off)."""
    monkeypatch.setenv("MTP_EXT_CUDA_VALUE_CHECKS", "0")
    m, heads = _cuda_model_and_heads()
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1)).cuda()
    syncs: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = generate(m, ids, heads, max_new_tokens=40, tree=6, do_sample=do_sample,
                           top_k=20, return_dict_in_generate=True, prompt_lookup_num_tokens=4,
                           _on_step=lambda *a: syncs.append(len(caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in zip(syncs, syncs[1:])]
    where = [str(w.message)[:120] for w in caught[syncs[0]: syncs[-1]]] if syncs else []
    assert out.steps >= 8
    assert per_step == [1] * (out.steps - 1), where


def test_finished_rows_do_not_widen_the_cache(model, monkeypatch):
    """A row that has finished may still accept long paths (its tokens are discarded): the step
    keeps only as many slots as the live rows need and cuts the finished row's path to match."""
    from mtp_ext import ops, tree_step
    from mtp_ext.hf_compat import cache_kwarg, cache_layers
    from mtp_ext.trees import DynamicTree

    heads = perturbed_heads(model, "conditioned", 0, 0.05)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(9))
    cache = transformers.DynamicCache()
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True, **cache_kwarg(model, cache))
    state = tree_step.start_state(model, heads, cache, out, torch.ones(2, 8, dtype=torch.bool),
                                  torch.arange(8).expand(2, 8), ids[:, -1])
    real = tree_step.read_step
    monkeypatch.setattr(tree_step, "read_step",
                        lambda n, t: ([3, 0], [r[:1] for r in real(n, t)[1]]))
    settings = SimpleNamespace(do_sample=False)
    with torch.no_grad():
        tree_step.run_step(model, heads, state, DynamicTree(8, 2), settings, None, ops,
                           active=[False, True])
    assert state.slots.length == 9  # the live row accepted nothing: one slot, not four
    assert all(layer.keys.shape[-2] == 9 for layer in cache_layers(cache))
    assert state.next_pos.tolist() == [9, 9]
    assert state.slots.valid[:, 8].all()


def test_lookup_branch_grows_after_a_whole_acceptance():
    from mtp_ext.decoding import _next_lookup_length

    branch = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    # row 0 accepted its 4 lookup drafts (then a bonus token): grow by 4, up to 2 x 4
    assert _next_lookup_length(4, 4, branch, [[5, 6, 7, 8, 9], [1]], [True, True]) == 8
    assert _next_lookup_length(8, 4, torch.tensor([[5] * 8]), [[5] * 9], [True]) == 8
    # only part of it, a finished row, or no branch: back to the base length
    assert _next_lookup_length(8, 4, branch, [[5, 6, 7], [1, 2]], [True, True]) == 4
    assert _next_lookup_length(4, 4, branch, [[5, 6, 7, 8, 9], [1]], [False, True]) == 4
    assert _next_lookup_length(8, 4, None, [[1]], [True]) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_verification_reads_the_models_rounded_logits_in_16_bits(dtype, monkeypatch):
    """A 16-bit model's output layer rounds its logits, and ``model.generate`` takes the first of
    the tied maxima: greedy tree steps of a bfloat16 model verify on those logits (``verify_tree``
    on the output layer's bfloat16 logits), float32 ones on the fused float32 argmax."""
    from mtp_ext import ops

    m = decoding_llama(VOCAB, seed=3).to(dtype)
    heads = perturbed_heads(m, "conditioned", 0, 0.05).to(dtype)
    seen = collections.Counter()
    real_verify, real_fused = ops.verify_tree, ops.verify_tree_from_hidden

    def verify(draft, parents, logits, *a, **k):
        seen[("verify_tree", logits.dtype)] += 1
        return real_verify(draft, parents, logits, *a, **k)

    def fused(*a, **k):
        seen["fused"] += 1
        return real_fused(*a, **k)

    monkeypatch.setattr(ops, "verify_tree", verify)
    monkeypatch.setattr(ops, "verify_tree_from_hidden", fused)
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    out = generate(m, ids, heads, max_new_tokens=12, do_sample=False, tree=4)
    assert out.shape == (1, 19)
    if dtype == torch.bfloat16:
        assert seen["fused"] == 0 and seen[("verify_tree", torch.bfloat16)] >= 1
    else:
        assert seen["fused"] >= 1 and seen[("verify_tree", torch.bfloat16)] == 0
