"""Benchmarks of whole generations: ``mtp_ext.generate`` against ``model.generate`` and
transformers' prompt-lookup decoding (same group per prompt), greedy, batch 1, each checked to
equal ``model.generate``'s tokens before it is timed.

Full mode: SmolLM2-135M with the shipped heads, 128 new tokens, prompts from the validation split of
three texts. Small mode (``--bench-small``): a tiny random-weight Llama with random heads, 24 new
tokens. ``bench/generate_speed.py`` gives the interleaved table with ratios (``bench/README.md``).
"""

from __future__ import annotations

import pytest
import torch

from benchlib import small_mode  # imports the extension (retrying during a rebuild)

import mtp_ext

transformers = pytest.importorskip("transformers")

IMPLS = ("model.generate", "prompt_lookup", "mtp_ext")


def _tiny():
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        heads = mtp_ext.MTPHeads.for_model(model, 3, kind="conditioned")
        with torch.no_grad():
            for p in heads.parameters():
                p.add_(torch.randn(p.shape) * 0.05)
        prompts = {f"random{i}": torch.randint(1, 300, (1, 12)) for i in range(2)}
    model.generation_config.eos_token_id = None
    return model, heads, prompts, 24, 8


def _smollm2():
    from mtp_ext.data.assets import load_model
    from mtp_ext.data.texts import load_text

    try:
        model, tok = load_model("smollm2-135m")
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"SmolLM2 not available: {exc}")
    heads = mtp_ext.load_heads("smollm2-135m", model)
    prompts = {}
    for name in ("web", "austen", "python"):
        text = next(t for t in load_text(name, "validation") if len(t) > 1000)
        prompts[name] = tok(text[:2000], return_tensors="pt")["input_ids"][:, :64]
    return model, heads, prompts, 128, None


@pytest.fixture(scope="module")
def setup():
    return _tiny() if small_mode() else _smollm2()


PROMPTS = ["random0", "random1"] if small_mode() else ["web", "austen", "python"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_generate(benchmark, setup, prompt, impl):
    model, heads, prompts, new_tokens, tree = setup
    ids = prompts[prompt]
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, **kw)
    if impl == "model.generate":
        fn = lambda: model.generate(ids, **kw)  # noqa: E731
    elif impl == "prompt_lookup":
        fn = lambda: model.generate(ids, prompt_lookup_num_tokens=10, **kw)  # noqa: E731
    else:
        fn = lambda: mtp_ext.generate(model, ids, heads, tree=tree, **kw)  # noqa: E731
    benchmark.group = f"generate[{prompt}, {new_tokens} tokens]"
    benchmark.extra_info.update(impl=impl, prompt=prompt, new_tokens=new_tokens)
    with torch.no_grad():
        out = fn()
        assert torch.equal(out, want), f"{impl} differs from model.generate"
        benchmark.extra_info["checked"] = True
        benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
