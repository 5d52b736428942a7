"""Chat data for drafter training: requests built from the texts (mtp_ext.data.chat_requests, on
the prepared texts; skipped when they are missing), the backbone's answers
(mtp_ext.data.chat_answers, on a tiny random model and a word-level tokenizer with a small chat
template), and ``mtp-ext chat-data``."""

from __future__ import annotations

import collections
import hashlib
import json
import re
import unicodedata
from pathlib import Path

import pytest
import torch

from helpers import perturbed_heads, tiny_llama, word_tokenizer
from mtp_ext.data import texts
from mtp_ext.data import chat_answers as ca
from mtp_ext.data.chat_answers import answer_requests, chat_token_rows, load_chat_data
from mtp_ext.data.chat_requests import (KINDS, PHRASINGS, _touches_bench, chat_requests,
                                        split_sentences)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "prompts" / "chat.json"
V = 40  # the tiny vocabulary: "w0" .. "w37", <unk> 38, </s> 39 (EOS)
EOS = V - 1
MAX_NEW = 10
# User turns open with w1, assistant turns with w2; every turn ends with </s> (the EOS).
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w1 {% else %}w2 {% endif %}"
            "{{ m['content'] }}</s> {% endfor %}{% if add_generation_prompt %}w2 {% endif %}")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- requests (on the prepared texts) -------------------------------------------------------


def _need_texts():
    for name in ("web", "rv1909", "en-es", "austen"):
        if not texts.text_path(name).is_file():
            pytest.skip(f"text {name!r} is not prepared ({texts.text_path(name)} missing); "
                        f"run: mtp-ext assets prepare")


@pytest.fixture(scope="module")
def train_requests():
    _need_texts()
    return chat_requests("train", 70, seed=0)


@pytest.fixture(scope="module")
def validation_requests():
    _need_texts()
    return chat_requests("validation", 35, seed=0)


def _turns(request) -> list[str]:
    return [m["content"] for m in request["messages"]] + (
        [request["follow_up"]] if "follow_up" in request else [])


def test_requests_deterministic_and_balanced(train_requests):
    assert chat_requests("train", 70, seed=0) == train_requests
    assert chat_requests("train", 70, seed=1) != train_requests
    counts = collections.Counter(r["kind"] for r in train_requests)
    assert counts == {kind: 10 for kind in KINDS}
    for kind in KINDS:
        ids = sorted(int(r["id"].rsplit("-", 1)[1]) for r in train_requests if r["kind"] == kind)
        assert ids == list(range(10))
    for r in train_requests:
        assert r["id"].startswith(r["kind"] + "-")
        assert set(r) == {"id", "kind", "source", "messages"} | (
            {"follow_up"} if r["kind"] == "multi-turn" else set())
        assert [m["role"] for m in r["messages"]] == ["user"]
        assert r["source"] in texts.TEXTS
    small = collections.Counter(r["kind"] for r in chat_requests("validation", 10, seed=3))
    assert set(small) == set(KINDS) and max(small.values()) - min(small.values()) <= 1


def test_requests_clean_short_and_varied(train_requests):
    assert all(len(PHRASINGS[kind]) >= 8 for kind in KINDS)
    lengths = []
    for r in train_requests:
        for text in _turns(r):
            assert text == text.strip() and text
            bad = [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")]
            assert not bad, (r["id"], bad)
            if r["source"] != "python":  # prose: collapsed whitespace
                assert "  " not in text and " \n" not in text and "\n " not in text, r["id"]
                assert "\n\n\n" not in text, r["id"]
        lengths.append(len(r["messages"][0]["content"]))
    # about 4 characters a token: prompts mostly under ~400 tokens
    assert sum(n < 1700 for n in lengths) >= 0.95 * len(lengths) and max(lengths) < 2500
    code = [r for r in train_requests if r["kind"] in ("code-explain", "code-write")]
    assert all(r["source"] == "python" for r in code)
    assert all("```python\n" in r["messages"][0]["content"] for r in code
               if r["kind"] == "code-explain")
    assert all("function" in r["messages"][0]["content"] for r in code if r["kind"] == "code-write")
    # the same phrasing is not used every time
    for kind in ("question", "summary", "translation"):
        firsts = {r["messages"][0]["content"][:12] for r in train_requests if r["kind"] == kind}
        assert len(firsts) >= 4, kind


def test_requests_hold_out_the_benchmark(train_requests, validation_requests):
    if not BENCH.is_file():
        pytest.skip(f"{BENCH} is missing")
    norm = lambda s: " ".join(s.split()).lower()  # noqa: E731
    bench = []
    for entry in json.loads(BENCH.read_text(encoding="utf-8")):
        bench += [norm(m["content"]) for m in entry.get("messages", []) if m["role"] == "user"]
        bench += [norm(entry["text"])] if entry.get("text") else []
    assert len(bench) >= 20
    for r in train_requests + validation_requests:
        for text in _turns(r):
            assert not any(b == norm(text) or b in norm(text) for b in bench), r["id"]
    # A request around a benchmark sentence (Genesis 1:1, in the demo's translation) is refused.
    req = {"messages": [{"role": "user", "content": "Translate this verse into Spanish: In the "
                         "beginning God created the heavens and the earth."}]}
    assert _touches_bench(req)
    assert not _touches_bench({"messages": [{"role": "user", "content": "Translate: Jesus wept."}]})


def _passage_sentences(requests) -> set[str]:
    """Sentences of 60+ characters of the requests, the phrasings' own words left out."""
    fragments = [f.strip() for templates in PHRASINGS.values() for t in templates
                 for f in re.split(r"\{\w+\}", t) if len(f.strip()) >= 15]
    out = set()
    for r in requests:
        for line in _turns(r)[0].split("\n"):
            for s in split_sentences(line):
                if len(s) >= 60 and not any(f in s for f in fragments):
                    out.add(s)
    return out


def _code_blocks(requests) -> set[str]:
    return {m for r in requests for m in re.findall(r"```python\n(.*?)\n```", _turns(r)[0], re.S)}


def test_train_and_validation_requests_share_no_passage(train_requests, validation_requests):
    train, val = _passage_sentences(train_requests), _passage_sentences(validation_requests)
    assert len(train) > 50 and len(val) > 20
    assert not train & val
    assert not _code_blocks(train_requests) & _code_blocks(validation_requests)


@pytest.mark.parametrize("split,num,seed", [
    ("dev", 3, 0), ("", 3, 0), ("train", 0, 0), ("train", -2, 0), ("train", 2.0, 0),
    ("train", True, 0), ("train", "3", 0), ("train", 3, "0"),
])
def test_chat_requests_bad_arguments(split, num, seed):
    with pytest.raises(ValueError):
        chat_requests(split, num, seed=seed)


# --- answers (tiny model) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    t = word_tokenizer(V)
    t.chat_template = TEMPLATE
    return t


@pytest.fixture(scope="module")
def model():
    """A tiny Llama with its own random output layer (tied embeddings only repeat the input), so
    that some answers end at EOS within MAX_NEW tokens and some do not."""
    m = tiny_llama(V, 32, 64, 2, seed=1)
    m.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32, generator=torch.Generator().manual_seed(1)))
    m.generation_config.eos_token_id = EOS
    m.generation_config.pad_token_id = EOS
    return m


def _requests() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(7):
        words = " ".join(f"w{int(x)}" for x in torch.randint(3, V - 2, (2 + i,), generator=g))
        r = {"id": f"r-{i}", "kind": "multi-turn" if i % 2 == 0 else "question",
             "messages": [{"role": "user", "content": words}]}
        if i % 2 == 0:
            r["follow_up"] = f"w7 w{8 + i}"
        out.append(r)
    return out


def _answer(model, tok, out, **kw):
    kw = {"max_new_tokens": MAX_NEW, "batch_size": 3, "model_name": "tiny", **kw}
    return answer_requests(model, tok, _requests(), out, **kw)


def _encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _by_id(out) -> dict[str, dict]:
    return {r["id"]: r for r in load_chat_data(out)}


def test_answer_records_round_trip_and_manifest(model, tok, tmp_path):
    manifest = _answer(model, tok, tmp_path, seed=5, split="train")
    records = _by_id(tmp_path)
    requests = {r["id"]: r for r in _requests()}
    assert set(records) == set(requests)
    truncated = answers = 0
    for rid, rec in records.items():
        req, ids = requests[rid], rec["ids"]
        assert rec["kind"] == req["kind"] and all(isinstance(t, int) for t in ids)
        two = "follow_up" in req
        assert rec["answers"] == len(rec["answer_spans"]) == (2 if two else 1)
        assert [m["role"] for m in rec["messages"]] == (
            ["user", "assistant", "user", "assistant"] if two else ["user", "assistant"])
        assert rec["messages"][0] == req["messages"][0]
        # the prompt is the chat template, tokenized without special tokens added
        first = rec["answer_spans"][0][0]
        assert ids[:first] == _encode(tok, tok.apply_chat_template(
            req["messages"], tokenize=False, add_generation_prompt=True))
        if two:
            assert rec["messages"][2]["content"] == req["follow_up"]
            second = rec["answer_spans"][1][0]
            assert ids[:second] == _encode(tok, tok.apply_chat_template(
                rec["messages"][:3], tokenize=False, add_generation_prompt=True))
        assert ids[rec["answer_spans"][-1][1]:] == []
        for (a, b), msg in zip(rec["answer_spans"], rec["messages"][1::2]):
            answer = ids[a:b]
            assert 1 <= len(answer) <= MAX_NEW and EOS not in answer[:-1]
            ended = answer[-1] == EOS
            assert ended or len(answer) == MAX_NEW
            truncated += not ended
            answers += 1
            assert msg["content"] == tok.decode(answer[:-1] if ended else answer)
        assert rec["prompt_tokens"] + rec["answer_tokens"] == len(ids)
        assert rec["answer_tokens"] == sum(b - a for a, b in rec["answer_spans"])
        # the ids decode to text that tokenizes back to them
        assert _encode(tok, tok.decode(ids)) == ids
    assert 0 < truncated < answers, "the tiny model should end some answers and not others"
    assert manifest == json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"] == "tiny" and manifest["engine"] == "hf"
    assert manifest["chat_template_sha256"] == hashlib.sha256(TEMPLATE.encode()).hexdigest()
    assert (manifest["max_new_tokens"], manifest["batch_size"]) == (MAX_NEW, 3)
    assert (manifest["seed"], manifest["split"], manifest["eos_token_ids"]) == (5, "train", [EOS])
    assert manifest["requests_per_kind"] == manifest["answered_per_kind"] == \
        {"multi-turn": 4, "question": 3}
    assert (manifest["num_requests"], manifest["answered"], manifest["records"]) == (7, 7, 7)
    assert manifest["answers"] == answers and manifest["truncated_answers"] == truncated
    assert manifest["prompt_tokens"] == sum(r["prompt_tokens"] for r in records.values())
    assert manifest["answer_tokens"] == sum(r["answer_tokens"] for r in records.values())
    assert manifest["run_answer_tokens"] == manifest["answer_tokens"]
    assert manifest["complete"] is True and manifest["wall_seconds"] > 0
    assert manifest["torch"] == torch.__version__ and manifest["transformers"]
    assert manifest["shards"] == sorted(p.name for p in tmp_path.glob("answers-*.jsonl"))
    # 7 first turns in batches of 3, then the 4 second turns: 3 + 2 batches, a shard number
    # each (answers, pending first turns of multi-turn requests, or both)
    numbers = {int(p.stem.split("-")[1]) for p in tmp_path.glob("*-*.jsonl")}
    assert numbers == set(range(5))
    assert sum(len(p.read_text().splitlines()) for p in tmp_path.glob("pending-*.jsonl")) == 4


def test_hf_engine_equals_model_generate_per_request(model, tok, tmp_path):
    _answer(model, tok, tmp_path, batch_size=4)
    for rec in _by_id(tmp_path).values():
        for a, b in rec["answer_spans"]:
            prompt = torch.tensor([rec["ids"][:a]])
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=MAX_NEW, pad_token_id=EOS)
            new = out[0, a:].tolist()
            want = new[: new.index(EOS) + 1] if EOS in new else new
            assert rec["ids"][a:b] == want, rec["id"]


class _Stop(Exception):
    pass


def _stop_at(round_no: int):
    def on_batch(info):
        if info["round"] == round_no:
            raise _Stop
    return on_batch


def _count_prompts(monkeypatch) -> list[int]:
    """Patches the generation so that every prompt it answers is counted."""
    calls = []
    real = ca._generate

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(ca, "_generate", counting)
    return calls


def test_resume_skips_done_requests(model, tok, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    _answer(model, tok, whole)
    want = _by_id(whole)
    out = tmp_path / "out"
    # killed after the first batch of first turns
    with pytest.raises(_Stop):
        _answer(model, tok, out, on_batch=_stop_at(1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and manifest["answered"] < 7
    calls = _count_prompts(monkeypatch)
    # killed after the first batch of second turns: the first turns are not redone
    with pytest.raises(_Stop):
        _answer(model, tok, out, on_batch=_stop_at(2))
    assert calls == [3, 1, 3]  # 4 first turns left (3 + 1), then one batch of second turns
    calls.clear()
    manifest = _answer(model, tok, out)
    assert calls == [1]  # the last second turn
    assert manifest["complete"] is True and manifest["answered"] == 7
    assert _by_id(out) == want
    assert manifest["records"] == 7 and manifest["answer_tokens"] == sum(
        r["answer_tokens"] for r in want.values())
    calls.clear()
    assert _answer(model, tok, out)["complete"] is True and calls == []


def test_resume_refuses_other_settings_or_requests(model, tok, tmp_path):
    _answer(model, tok, tmp_path)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _answer(model, tok, tmp_path, max_new_tokens=MAX_NEW - 1)
    with pytest.raises(ValueError, match="model"):
        _answer(model, tok, tmp_path, model_name="other")
    changed = _requests()
    changed[1]["messages"][0]["content"] += " w5"
    with pytest.raises(ValueError, match="another request under id 'r-1'"):
        answer_requests(model, tok, changed, tmp_path, max_new_tokens=MAX_NEW, model_name="tiny")


def test_mtp_engine_gives_the_hf_answers(model, tok, tmp_path):
    _answer(model, tok, tmp_path / "hf")
    heads = perturbed_heads(model)
    from mtp_ext.decoding import generate

    manifest = _answer(model, tok, tmp_path / "mtp", engine="mtp",
                       generate_fn=lambda m, ids, **kw: generate(m, ids, heads, tree=4, **kw))
    assert manifest["engine"] == "mtp" and manifest["complete"]
    assert _by_id(tmp_path / "mtp") == _by_id(tmp_path / "hf")


def test_mtp_engine_without_heads_falls_back_to_hf(model, tok, tmp_path):
    messages = []
    manifest = _answer(model, tok, tmp_path, engine="mtp", log=messages.append)
    assert manifest["engine"] == "hf" and manifest["complete"]
    assert len(messages) == 1 and "no heads ship for it" in messages[0]


def test_answer_bad_inputs(model, tok, tmp_path):
    good = _requests()
    for kw in [dict(engine="vllm"), dict(batch_size=0), dict(max_new_tokens=0),
               dict(max_new_tokens=2.5)]:
        with pytest.raises(ValueError):
            answer_requests(model, tok, good, tmp_path, **kw)
    bad_lists = [
        good + [dict(good[0])],  # repeated id
        [{"id": "a", "kind": "q", "messages": []}],
        [{"id": "a", "kind": "q", "messages": [{"role": "assistant", "content": "w3"}]}],
        [{"id": "", "kind": "q", "messages": [{"role": "user", "content": "w3"}]}],
        [{"id": "a", "kind": "q", "messages": [{"role": "user", "content": "w3"}],
          "follow_up": " "}],
        "not a list",
    ]
    for requests in bad_lists:
        with pytest.raises(ValueError):
            answer_requests(model, tok, requests, tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        answer_requests(model, word_tokenizer(V), good, tmp_path)
    with pytest.raises(FileNotFoundError):
        load_chat_data(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):
        load_chat_data(tmp_path)  # a folder without answers


def test_chat_token_rows_packing():
    records = [{"ids": [1, 2, 3]}, {"ids": [4, 5, 6, 7, 8]}, [9]]
    rows = chat_token_rows(records, 4, pad_id=0)
    assert rows.dtype == torch.int64 and rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    padded = chat_token_rows(records, 4, pad_id=0, pad_last=True)
    assert padded.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert chat_token_rows(records, 3, pad_id=0).tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert chat_token_rows(records, 100, pad_id=0).shape == (0, 100)
    assert chat_token_rows([], 8, pad_id=0).shape == (0, 8)
    for args in [(records, 0, 0), (records, 4, -1), (records, 4, 1.5), ([{"x": 1}], 4, 0),
                 ([None], 4, 0)]:
        with pytest.raises(ValueError):
            chat_token_rows(*args)


def test_chat_token_rows_of_answers_feed_training(model, tok, tmp_path):
    """Rows of real records: the conversations back to back, as train-heads --tokens reads them."""
    from mtp_ext.training.tokens import tokenize_texts

    _answer(model, tok, tmp_path)
    records = load_chat_data(tmp_path)
    flat = [t for r in records for t in r["ids"]]
    rows = chat_token_rows(records, 16, pad_id=EOS)
    assert rows.shape == (len(flat) // 16, 16)
    assert rows.flatten().tolist() == flat[: rows.numel()]
    assert torch.equal(tokenize_texts(rows, None, 16), rows)


# --- the command line -------------------------------------------------------------------------


def test_cli_chat_data_end_to_end(model, tok, tmp_path, capsys):
    """``mtp-ext chat-data`` on a model folder (the tiny model): requests from both splits,
    answered (engine mtp falls back to hf: no heads ship for a folder), packed into a tokens file
    that train-heads reads."""
    _need_texts()
    from mtp_ext.cli import main

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out, tokens = tmp_path / "data", tmp_path / "tokens.pt"
    argv = ["chat-data", "--model", str(folder), "--num", "7", "--num-validation", "7",
            "--out", str(out), "--max-new-tokens", "3", "--batch-size", "8",
            "--tokens-out", str(tokens), "--seq-len", "32", "--no-progress"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "no heads ship" in captured.err
    summary = json.loads(captured.out)
    for split in ("train", "validation"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert manifest["complete"] and manifest["split"] == split and manifest["records"] == 7
        assert summary[split]["records"] == 7 and summary[split]["engine"] == "hf"
    data = torch.load(tokens, weights_only=True)
    assert set(data) == {"train", "validation"}
    for split, rows in data.items():
        assert rows.dtype == torch.int64 and rows.shape[1] == 32 and rows.shape[0] >= 1
        flat = [t for r in load_chat_data(out / split) for t in r["ids"]]
        assert rows.flatten().tolist() == flat[: rows.numel()]
    # a rerun finds everything done
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["train"]["run_answer_tokens"] == 0
    # mixing continuation text into the train rows: chat rows kept, a third more rows of text
    chat_rows = data["train"]
    assert main(argv + ["--mix-texts", "web", "--mix-share", "0.25"]) == 0
    mixed = torch.load(tokens, weights_only=True)
    assert torch.equal(mixed["validation"], data["validation"])
    n_text = round(0.25 / 0.75 * chat_rows.shape[0])
    assert mixed["train"].shape == (chat_rows.shape[0] + n_text, 32)
    have = {tuple(r) for r in mixed["train"].tolist()}
    assert all(tuple(r) in have for r in chat_rows.tolist())


@pytest.mark.parametrize("args,message", [
    (["--num", "0"], "--num must be >= 1"),
    (["--num-validation", "-1"], "--num-validation must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--num-validation", "0", "--tokens-out", "t.pt"], "--tokens-out needs validation"),
    (["--mix-texts", "web"], "--mix-texts needs --tokens-out"),
    (["--tokens-out", "t.pt", "--mix-texts", "klingon"], "unknown texts"),
    (["--mix-share", "1.0"], "--mix-share must be in"),
    (["--model", "no-such-model"], "neither a known model"),
])
def test_cli_bad_values_are_one_line_errors(args, message, tmp_path, capsys):
    from mtp_ext.cli import main

    assert main(["chat-data", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtp-ext chat-data: error:") and message in err
    assert len(err.splitlines()) == 1
