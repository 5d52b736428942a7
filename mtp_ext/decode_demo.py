"""The main demonstration (``mtp-ext demo``): SmolLM2-135M with the shipped MTP heads generates
for a few prompts of different kinds, and for each one prints the text, the tokens accepted per
step, the speed against ``model.generate`` run with the same settings, and whether the tokens are
identical."""

from __future__ import annotations

import statistics

import torch

PROMPTS = [
    ("chat", "What is the capital of France, and what is it famous for?", True),
    ("story", "Once upon a time, in a small village by the sea, there lived", False),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ("translation", "Translate into Spanish.\nEnglish: In the beginning God created the heavens "
                    "and the earth.\nSpanish:", False),
]


def run_decode_demo(model_name: str = "smollm2-135m", max_new_tokens: int = 96, tree=None) -> bool:
    """Runs the demonstration; returns True when every output equals ``model.generate``'s."""
    from .assets import load_model
    from .compare import compare_generate, encode_prompt
    from .shipped import load_heads
    from .tree_tuning import auto_tree

    model, tokenizer = load_model(model_name)
    heads = load_heads(model_name, model)
    print(f"{model_name} with {heads.config.num_heads} shipped {heads.config.kind} heads "
          f"({torch.get_num_threads()} threads)")
    if tree is None:
        ids = encode_prompt(tokenizer, PROMPTS[1][1])
        tree = auto_tree(model, heads, ids, progress=True)
        print(f"draft tree: {tree.size} nodes (the size that measured fastest here; cached)")
    all_same, ratios = True, []
    for kind, prompt, chat in PROMPTS:
        ids = encode_prompt(tokenizer, prompt, chat=chat)
        res = compare_generate(model, heads, ids, max_new_tokens=max_new_tokens, do_sample=False,
                               tree=tree)
        text = tokenizer.decode(res.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        all_same &= bool(res.identical)
        ratios.append(res.speedup)
        print(f"\n--- {kind}: {prompt!r}")
        print(text.strip())
        print(f"[{res.new_tokens} tokens, {res.tokens_per_step:.2f} tokens per step, "
              f"{res.tokens_per_second:.1f} tokens/s, {res.speedup:.2f}x model.generate, "
              f"identical tokens: {'yes' if res.identical else 'NO'}]")
    print(f"\nmedian speed-up over model.generate: {statistics.median(ratios):.2f}x; "
          f"all outputs identical: {'yes' if all_same else 'NO'}")
    return all_same
