"""bench/prompts/chat.json (the chat prompt set of bench/generate_speed.py) and the script's loader
and tables, without running a model: the file parses, holds the demo's prompts and every kind of
request, every prompt encodes with SmolLM2's chat template, and a fake result renders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "bench" / "prompts" / "chat.json"


@pytest.fixture(scope="module")
def speed():
    """bench/generate_speed.py imported as a module (importing it runs nothing)."""
    spec = importlib.util.spec_from_file_location("generate_speed", ROOT / "bench" /
                                                  "generate_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("generate_speed", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2-135M's tokenizer, from the converted model's cache folder when there is one (no
    model load; ``PreTrainedTokenizerFast`` reads its tokenizer.json and chat template with the
    same ids as ``AutoTokenizer``, in a fraction of the time), else through ``load_model``;
    skipped where the model is not installed."""
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    from mtp_ext.data import assets

    for folder in sorted((assets.cache_dir() / "models").glob("smollm2-135m-*")):
        if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
            try:
                return PreTrainedTokenizerFast.from_pretrained(str(folder))
            except Exception:  # a folder being rebuilt: fall through to load_model
                pass
    try:
        assets.model_file("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return assets.load_model("smollm2-135m")[1]


def test_chat_file_holds_the_demo_prompts_and_every_kind(speed):
    from mtp_ext.cli.demo import PROMPTS

    raw = json.loads(CHAT.read_text())
    entries = speed.read_chat_prompts(CHAT)
    assert entries == raw and len(entries) >= 16
    by_kind = {}
    for e in entries:
        by_kind.setdefault(e["kind"], []).append(e)
    for name, text, chat in PROMPTS:  # same text, same chat flag
        (e,) = by_kind[f"demo-{name}"]
        if chat:
            assert e["messages"] == [{"role": "user", "content": text}]
        else:
            assert e["text"] == text and e["chat"] is False and "messages" not in e
    assert set(speed.CHAT_KINDS) <= set(by_kind)
    assert set(by_kind) <= set(speed.CHAT_KINDS) | {f"demo-{name}" for name, _, _ in PROMPTS}
    new_chat = [e for e in entries if "messages" in e and not e["kind"].startswith("demo-")]
    assert len(new_chat) >= 12
    multi = by_kind["multi-turn"]
    assert all([m["role"] for m in e["messages"]][:3] == ["user", "assistant", "user"]
               for e in multi)


def test_chat_file_rejects_malformed_entries(speed, tmp_path):
    bad = tmp_path / "bad.json"
    for entries in ([{"label": "a", "kind": "question"}],
                    [{"label": "a", "kind": "question", "text": "hi"}],  # no "chat": false
                    [{"label": "a", "kind": "q", "messages": [{"role": "assistant",
                                                               "content": "x"}]}],
                    [{"label": "a", "kind": "q", "text": "x", "chat": False}] * 2):
        bad.write_text(json.dumps(entries))
        with pytest.raises(ValueError):
            speed.read_chat_prompts(bad)


def test_every_chat_prompt_encodes_in_the_chat_template(speed, tokenizer):
    entries = speed.read_chat_prompts(CHAT)
    encoded = speed.chat_prompts(tokenizer, CHAT)
    assert [label for label, _ in encoded] == [e["label"] for e in entries]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for e, (label, ids) in zip(entries, encoded):
        assert ids.dtype == torch.long and ids.shape[0] == 1 and 8 <= ids.shape[1] <= 1024, label
        text = tokenizer.decode(ids[0])
        if "messages" in e:
            assert ids[0, 0] == start, label  # the template's own special tokens, once
            for m in e["messages"]:
                assert m["content"].strip() in text, label
            assert text.endswith("<|im_start|>assistant\n"), label
            assert int((ids[0] == start).sum()) == len(e["messages"]) + 2, label  # + system, reply
        else:
            assert e["text"].strip() in text and ids[0, 0] != start, label
    # The batch of chat prompts: the first chat-template prompt of four kinds.
    kinds = {e["label"]: e["kind"] for e in entries if "messages" in e}
    rows = speed.firsts(encoded, kinds.get)
    assert len(rows) == 4 and len({kinds[label] for label, _ in rows}) == 4


def _row(mtp: float, identical: bool = True, agreement: float = 1.0) -> dict:
    return {"prompt_tokens": 40, "new_tokens": 32, "tok_s": {"hf": 20.0, "pld": 25.0, "mtp": mtp},
            "mtp_vs_hf": mtp / 20.0, "pld_vs_hf": 1.25, "mtp_vs_pld": mtp / 25.0,
            "tokens_per_step": 2.5, "identical": identical, "pld_identical": True,
            "agreement": agreement}


def test_markdown_renders_a_fake_result(speed):
    meta = {"dtype": "bfloat16", "where": "Fake CPU (avx512_bf16; L2 1024K), torch 2.x, 2 threads",
            "new_tokens": 32, "tree": speed.TREE_DEFAULT, "heads": "shipped", "rounds": 1,
            "transformers": "5.0", "prompt_file": None}
    chat = {"prompts": [("demo-chat", _row(40.0)), ("question-x", _row(30.0, False, 0.75))],
            "batch": {"batch": 4, "mtp_vs_hf": 1.5, "tokens_per_step": 2.0, "identical": True,
                      "agreement": 1.0},
            "sampling": {"settings": "temperature 0.7, top-p 0.9", "mtp_vs_hf": 1.2,
                         "tokens_per_step": 1.8}}
    cont = {"prompts": [("web#0", _row(50.0))], "batch": None, "sampling": chat["sampling"]}
    text = speed.markdown({"sections": [{"meta": meta, "sets": {"continuation": cont,
                                                                  "chat": chat}}]})
    assert text.count("| prompt | new tokens | model.generate tok/s |") == 2
    assert "| mtp_ext / prompt lookup |" in text and "| agreement |" in text
    assert ("| demo-chat | 32 | 20.0 | 25.0 | 40.0 | 2.00x | 1.25x | 1.60x | 2.50 | yes | 100% |"
            in text)
    assert ("| question-x | 32 | 20.0 | 25.0 | 30.0 | 1.50x | 1.25x | 1.20x | 2.50 | NO | 75.0% |"
            in text)
    assert "| **median** | | | | | **1.75x** |" in text
    assert "mtp_ext / generate 1.50x (question-x)" in text
    assert "lowest agreement 75.0% (question-x)" in text
    assert "Batch 4 (left-padded, the first chat-template prompt of each kind)" in text
    assert "Fake CPU (avx512_bf16" in text and "transformers 5.0" in text
    assert "tree controller (default)" in text and "SmolLM2-135M bfloat16, chat prompts" in text


def test_quick_options_and_no_tree_by_default(speed):
    args = speed.parse_args(["--quick", "--dtypes", "float32,bfloat16"])
    assert (args.new_tokens, args.rounds, args.dtype_list) == (32, 1, ["float32", "bfloat16"])
    assert args.tree is None and args.set == "both"
    assert speed.parse_args(["--quick", "--rounds", "2"]).rounds == 2
    assert speed.parse_args([]).new_tokens == 128
    assert speed.spread(list(range(20)), 2) == [0, 10] and speed.spread([1, 2], None) == [1, 2]
    ref = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert speed.agreement(ref, ref, 2) == 1.0
    assert speed.agreement(torch.tensor([[1, 2, 3, 4, 9, 9]]), ref, 2) == 0.5
