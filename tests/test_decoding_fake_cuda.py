"""The decoding step on CUDA tensors without a GPU: the model and heads are made of fake CUDA
tensors (``FakeTensorMode``: shapes, dtypes and devices propagate, nothing is computed), so any
mixing of host and device tensors in the step, or an operation that reads device data, fails
here as it would on a GPU. The custom ops run their fake implementations. The step's one host
read (``read_step``) is replaced by fixed counts, since fake tensors hold no values; ``generate``'s
own loop around the steps (prefill with a 2-D mask, first token, bookkeeping) is left to the GPU
tests in tests/test_generate_loop.py.

Needs a CUDA build of torch (CI's CUDA build step runs it, scripts/build_cuda.sh); skipped on a
CPU build, which cannot make CUDA tensors, fake or not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mtp_ext import ops, tree_step  # noqa: E402
from mtp_ext.attention_masks import sequence_mask  # noqa: E402
from mtp_ext.decoding import GenerationSettings  # noqa: E402
from mtp_ext.heads import MTPHeads  # noqa: E402
from mtp_ext.hf_compat import cache_kwarg, cache_layers  # noqa: E402
from mtp_ext.trees import DynamicTree, StaticTree  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.version.cuda is None, reason="needs a CUDA build of torch (fake CUDA tensors)"
)

VOCAB, B, P = 120, 2, 9


def fake_cuda(module: nn.Module) -> nn.Module:
    """Replaces every parameter and buffer by a fake CUDA tensor of its shape and dtype (tied
    parameters stay tied). Call inside the FakeTensorMode."""
    done: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for store, wrap in ((mod._parameters, True), (mod._buffers, False)):
            for name, t in list(store.items()):
                if t is None:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device="cuda")
                    done[id(t)] = nn.Parameter(new, requires_grad=False) if wrap else new
                store[name] = done[id(t)]
    return module


def tiny_model(kind: str):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    heads = MTPHeads.for_model(model, 3, kind=kind)
    return model, heads


def on_cuda(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.device.type == "cuda"
    return all(on_cuda(t) for t in x)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("kind", ["conditioned", "resblock", "transformer"])
def test_tree_steps_stay_on_the_device(kind, do_sample, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    model, heads = tiny_model(kind)
    # The step's one host read (a real GPU copies the values; fake tensors have none): fixed
    # counts that differ between the rows, so the cache keeps slots one row did not fill.
    reads = []

    def read_step(num_accepted, tokens):
        assert num_accepted.device.type == "cuda" and tokens.device.type == "cuda"
        reads.append(tokens.shape[1])
        accepted = [min(len(reads) % 3, tokens.shape[1] - 1), 0]
        return accepted, [[7] * (a + 1) for a in accepted]

    monkeypatch.setattr(tree_step, "read_step", read_step)
    settings = GenerationSettings(max_new_tokens=8, do_sample=do_sample, temperature=0.7,
                                  top_k=20, top_p=0.9, eos_token_ids=(), pad_token_id=0)
    host_ids = torch.arange(B * P).view(B, P) % 50 + 1
    host_mask = torch.ones(B, P, dtype=torch.long)
    host_mask[1, :3] = 0
    contexts = tree_step.HostContexts(host_ids, host_mask, 16)  # lives on the host
    specs = [DynamicTree(6, 2), StaticTree([(0,), (1,), (0, 0), (0, 0, 0)]), DynamicTree(1, 1)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_cuda(model)
        fake_cuda(heads)
        ids, mask = host_ids.cuda(), host_mask.cuda()
        cache = transformers.DynamicCache()
        # The prefill as generate runs it, but with a 4-D mask: the 2-D one makes transformers
        # test the mask's values (a host read, which fake tensors cannot answer).
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        mask4 = sequence_mask(None, mask.bool(), pos, torch.float32, None)
        out = model(ids, attention_mask=mask4, position_ids=pos, use_cache=True,
                    output_hidden_states=True, **cache_kwarg(model, cache))
        state = tree_step.start_state(model, heads, cache, out, mask.bool(), pos, ids[:, -1])

        def uniforms(shape):
            return torch.rand(shape, device="cuda")

        for step in range(6):
            with unset_fake_temporarily():  # prompt lookup works on real host tensors
                branch = contexts.lookup(4, [True, True]) if step % 2 else None
            res = tree_step.run_step(model, heads, state, specs[step % 3], settings, uniforms,
                                     ops, branch)
            assert on_cuda([res.num_accepted, res.path, res.tree.tokens, res.tree.parents])
            assert on_cuda([state.root, state.next_pos, state.slots.valid, state.slots.pos])
            assert on_cuda(state.feature if isinstance(state.feature, tuple) else [state.feature])
            for layer in cache_layers(cache):
                assert layer.keys.device.type == "cuda"
                assert layer.keys.shape[-2] == state.slots.length
            if kind == "transformer":
                assert state.features.state.length == state.slots.length
    assert len(reads) == 6
