"""The backbone's own answers to chat requests (:mod:`mtp_ext.data.chat_requests`): the data a
drafter trains on when it is to draft what users actually get, chat answers of the backbone.

``answer_requests(model, tokenizer, requests, out_dir)`` answers greedily, in the tokenizer's
chat template (``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``, then
tokenized with ``add_special_tokens=False``), in batches of prompts of similar length (sorted by
length, longest first, left-padded), up to ``max_new_tokens`` new tokens each, stopping at EOS
(the tokenizer's EOS and those of ``model.generation_config``). Two engines give the same tokens
for a float32 model: ``"hf"`` (``model.generate``) and ``"mtp"`` (:func:`mtp_ext.generate` with
MTP heads, lossless for greedy decoding, faster). A multi-turn request is answered twice: its
first turn with all the first turns, then, after every first turn is done, the conversation
(first turn, the answer, the follow-up) again.

Files in ``out_dir``:

- ``answers-NNNNN.jsonl``: one shard per batch, written whole (temporary file, then renamed), one
  record per line::

      {"id", "kind", "source", "messages": [user, assistant(, user, assistant)],
       "answers": 1 or 2, "prompt_tokens": int, "answer_tokens": int, "truncated": int,
       "answer_spans": [[start, end], ...], "ids": [int, ...]}

  ``ids`` are the token ids of the whole templated conversation: the prompt, each answer as
  generated (with the EOS that ended it), and for a multi-turn request the template's tokens
  between the answer and the second answer; ``answer_spans`` are the answers' positions in
  ``ids`` (``ids[start:end]``); ``answer_tokens`` counts the answers' tokens in ``ids`` (EOS
  included), ``prompt_tokens`` the others (``prompt_tokens + answer_tokens == len(ids)``),
  ``answers`` the assistant turns generated, ``truncated`` those that hit ``max_new_tokens``
  without EOS. (Should a chat template rewrite an answer's text, the second turn's prompt is the
  whole conversation tokenized again, and only the second answer has a span.) The assistant messages hold the answers decoded
  with special tokens kept, without the EOS that ended them.
- ``pending-NNNNN.jsonl``: the first turns of multi-turn requests, waiting for their second turn.
- ``manifest.json``: the settings and totals (see :func:`answer_requests`), rewritten after every
  shard, with ``"complete": true`` once every request is answered.

An interrupted run loses at most the batch in flight: a rerun with the same ``out_dir`` skips the
requests already answered (and the first turns already pending). A rerun with another model,
chat template or ``max_new_tokens``, or with another request under an id already answered, is
refused (ValueError).

:func:`load_chat_data` reads the records back and :func:`chat_token_rows` packs their ids into the
``[N, T]`` rows of ``mtp-ext train-heads --tokens``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["MANIFEST_NAME", "answer_requests", "chat_template_sha256", "chat_token_rows",
           "load_chat_data"]

MANIFEST_NAME = "manifest.json"
ENGINES = ("hf", "mtp")
_SHARD = re.compile(r"(answers|pending)-(\d{5,})\.jsonl$")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def chat_template_sha256(tokenizer) -> str:
    """sha256 (hex) of the tokenizer's chat template (a dict of named templates as sorted JSON)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("the tokenizer has no chat template (tokenizer.chat_template is empty)")
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _eos_ids(model, tokenizer) -> list[int]:
    """The tokenizer's EOS id, then those of ``model.generation_config`` (in order, no repeats)."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        for t in (value if isinstance(value, (list, tuple)) else [value]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    if not ids:
        raise ValueError("neither the tokenizer nor model.generation_config has an EOS token")
    return ids


def _template(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _shards(out_dir: Path, which: str) -> list[Path]:
    """``which`` ("answers" or "pending") shard files of ``out_dir``, in order."""
    found = []
    for path in out_dir.iterdir() if out_dir.is_dir() else []:
        m = _SHARD.match(path.name)
        if m and m.group(1) == which:
            found.append((int(m.group(2)), path))
    return [p for _, p in sorted(found)]


def _read_jsonl(paths: list[Path]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    out[record["id"]] = record
    return out


def _check_requests(requests) -> None:
    if not isinstance(requests, (list, tuple)):
        raise ValueError(f"requests must be a list of dicts, got {type(requests).__name__}")
    seen = set()
    for i, r in enumerate(requests):
        if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not r["id"]:
            raise ValueError(f"request {i} is not a dict with a non-empty string 'id'")
        if r["id"] in seen:
            raise ValueError(f"request id {r['id']!r} appears twice")
        seen.add(r["id"])
        msgs = r.get("messages")
        if (not isinstance(msgs, list) or not msgs
                or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                           and isinstance(m.get("role"), str) for m in msgs)
                or msgs[-1]["role"] != "user"):
            raise ValueError(f"request {r['id']!r}: 'messages' must be a non-empty list of "
                             f"{{'role', 'content'}} dicts ending with a user turn")
        follow = r.get("follow_up")
        if follow is not None and (not isinstance(follow, str) or not follow.strip()):
            raise ValueError(f"request {r['id']!r}: 'follow_up' must be a non-empty string")


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _generate(model, prompts: list[list[int]], engine: str, generate_fn, max_new_tokens: int,
              pad: int, eos: list[int]) -> list[list[int]]:
    """Greedy answers to ``prompts`` (one batch, left-padded): per prompt the new tokens up to and
    including the first EOS, or ``max_new_tokens`` tokens without one."""
    device = model.get_input_embeddings().weight.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long,
                       device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        dtype=torch.long, device=device)
    if engine == "hf":
        out = model.generate(ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    else:
        out = generate_fn(model, ids, attention_mask=mask, do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    stop = set(eos)
    answers = []
    for row in out[:, width:].tolist():
        answer = []
        for t in row[:max_new_tokens]:
            answer.append(t)
            if t in stop:
                break
        answers.append(answer)
    return answers


def _answer_text(tokenizer, answer: list[int], eos: set) -> tuple[str, bool]:
    """The answer's text (the EOS that ended it left out) and whether an EOS ended it."""
    ended = bool(answer) and answer[-1] in eos
    return _decode(tokenizer, answer[:-1] if ended else answer), ended


def _second_prompt(tokenizer, pending: dict, follow_up: str) -> tuple[list[int], bool]:
    """The ids of the conversation before the second answer, and whether they extend the first
    turn's ids exactly (the generated answer kept as generated).

    The chat template is rendered for (user, assistant, follow-up); when it starts with the first
    prompt's text followed by the answer's text, the rest (the end of the assistant turn, the
    follow-up, the generation prompt) is tokenized and appended to the first turn's ids, the end
    marker left out when the generated EOS already is it. Otherwise (a template that changes the
    content) the whole rendering is tokenized."""
    head = _template(tokenizer, pending["messages"][:-1]) + pending["messages"][-1]["content"]
    full = _template(tokenizer, pending["messages"] + [{"role": "user", "content": follow_up}])
    if not full.startswith(head):
        return _encode(tokenizer, full), False
    rest = full[len(head):]
    ids = list(pending["ids"])
    if pending["ended"]:
        eos_text = _decode(tokenizer, ids[-1:])
        if eos_text and rest.startswith(eos_text):
            rest = rest[len(eos_text):]
    return ids + _encode(tokenizer, rest), True


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _stats(records: dict[str, dict]) -> dict:
    kinds = collections.Counter(r["kind"] for r in records.values())
    return {
        "records": len(records),
        "answered_per_kind": dict(sorted(kinds.items())),
        "answers": sum(r["answers"] for r in records.values()),
        "prompt_tokens": sum(r["prompt_tokens"] for r in records.values()),
        "answer_tokens": sum(r["answer_tokens"] for r in records.values()),
        "truncated_answers": sum(r["truncated"] for r in records.values()),
    }


def answer_requests(
    model,
    tokenizer,
    requests: Sequence[dict],
    out_dir: str | os.PathLike,
    *,
    engine: str = "hf",
    generate_fn: Callable | None = None,
    model_name: str | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int | None = None,
    split: str | None = None,
    progress: bool = False,
    on_batch: Callable[[dict], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Answers ``requests`` with the backbone, greedily, into ``out_dir`` (see the module
    docstring); resumes what an earlier run with the same ``out_dir`` left.

    Args:
        model, tokenizer: the backbone (a transformers causal LM, float32 for the two engines to
            agree exactly) and its tokenizer, which needs a chat template.
        requests: dicts ``{"id", "kind", "messages": [..., user turn]}``, optionally
            ``"follow_up"`` (a second user turn) and ``"source"``
            (:func:`mtp_ext.data.chat_requests.chat_requests` builds them); ids unique.
        out_dir: the folder of the shards and the manifest (created).
        engine: ``"hf"`` (``model.generate``) or ``"mtp"`` (``generate_fn``; without one,
            ``"hf"`` with a message).
        generate_fn: the ``"mtp"`` engine, called as ``model.generate`` is (``generate_fn(model,
            ids, attention_mask=, do_sample=False, max_new_tokens=, pad_token_id=,
            eos_token_id=)``), e.g. :func:`mtp_ext.generate` bound to heads (``mtp-ext
            chat-data`` binds the shipped heads); this layer imports no decoding code.
        model_name: the model's name in the manifest (default: ``model.name_or_path``).
        max_new_tokens: the longest answer, in tokens (>= 1).
        batch_size: prompts per ``generate`` call (>= 1).
        seed, split: how the requests were built, recorded in the manifest.
        progress: show a tqdm bar (answers done).
        on_batch: called after each shard is written with ``{"round": 1 or 2, "shard": file
            name, "answers": answers in it}``; an exception it raises stops the run there
            (as an interruption would).
        log: where messages go (default: standard error).
    Returns:
        The manifest (also ``out_dir/manifest.json``): ``model``, ``chat_template_sha256``,
        ``engine`` (the one used), ``engines`` (all runs'), ``max_new_tokens``, ``batch_size``,
        ``seed``, ``split``, ``eos_token_ids``, ``num_requests``, ``requests_per_kind`` (of
        ``requests``), ``answered`` (of ``requests``), and over every record in ``out_dir``:
        ``records``, ``answered_per_kind``, ``answers``, ``prompt_tokens``, ``answer_tokens``,
        ``truncated_answers`` (answers that hit ``max_new_tokens`` without EOS); ``torch``,
        ``transformers``, ``wall_seconds`` (all runs), ``run_seconds``, ``run_answer_tokens`` and
        ``run_tokens_per_second`` (this run's generated tokens per second of generation),
        ``shards``, ``complete``.
    Raises:
        ValueError: a bad argument, a tokenizer without a chat template, or an ``out_dir`` holding
            answers of another model / template / ``max_new_tokens`` or other requests.
    """
    t_start = time.perf_counter()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    _int_at_least("max_new_tokens", max_new_tokens, 1)
    _int_at_least("batch_size", batch_size, 1)
    _check_requests(requests)
    template_sha = chat_template_sha256(tokenizer)
    eos = _eos_ids(model, tokenizer)
    eos_set = set(eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    name = model_name or getattr(model, "name_or_path", "") or str(
        getattr(model.config, "_name_or_path", ""))
    if engine == "mtp" and generate_fn is None:
        log(f"mtp_ext: no drafting generate function for {name!r} (no heads ship for it); "
            "answering with engine 'hf' (model.generate) instead")
        engine = "hf"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    previous = {}
    if manifest_path.is_file():
        with open(manifest_path, encoding="utf-8") as f:
            previous = json.load(f)
        for key, value in (("model", name), ("chat_template_sha256", template_sha),
                           ("max_new_tokens", max_new_tokens)):
            if previous.get(key) != value:
                raise ValueError(
                    f"{out} holds answers made with {key}={previous.get(key)!r}, not {value!r}; "
                    f"choose another output folder or remove it")
    done = _read_jsonl(_shards(out, "answers"))
    pending = _read_jsonl(_shards(out, "pending"))
    by_id = {r["id"]: r for r in requests}
    for rid, record, final in ([(i, x, True) for i, x in done.items()]
                               + [(i, x, False) for i, x in pending.items()]):
        r = by_id.get(rid)
        if r is None:
            continue
        n = len(r["messages"])
        same = record["kind"] == r["kind"] and record["messages"][:n] == r["messages"]
        if same and final and r.get("follow_up"):
            same = len(record["messages"]) == n + 3 and \
                record["messages"][n + 1]["content"] == r["follow_up"]
        if not same:
            raise ValueError(f"{out} holds another request under id {rid!r} (built with other "
                             f"settings?); choose another output folder or remove it")

    numbers = [int(_SHARD.match(p.name).group(2)) for p in _shards(out, "answers")
               + _shards(out, "pending")]
    next_shard = [max(numbers, default=-1) + 1]
    run = {"tokens": 0, "seconds": 0.0}
    kinds = collections.Counter(r["kind"] for r in requests)

    def manifest(complete: bool) -> dict:
        import transformers

        run_seconds = time.perf_counter() - t_start
        m = {
            "model": name,
            "chat_template_sha256": template_sha,
            "engine": engine,
            "engines": sorted(set(previous.get("engines", [])) | {engine}),
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "seed": seed,
            "split": split,
            "eos_token_ids": eos,
            "num_requests": len(requests),
            "requests_per_kind": dict(sorted(kinds.items())),
            "answered": sum(1 for r in requests if r["id"] in done),
            **_stats(done),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "wall_seconds": round(previous.get("wall_seconds", 0.0) + run_seconds, 3),
            "run_seconds": round(run_seconds, 3),
            "run_answer_tokens": run["tokens"],
            "run_tokens_per_second": round(run["tokens"] / run["seconds"], 2)
            if run["seconds"] > 0 else 0.0,
            "shards": [p.name for p in _shards(out, "answers")],
            "complete": complete,
        }
        _write_atomic(manifest_path, json.dumps(m, indent=2, ensure_ascii=False) + "\n")
        return m

    def run_batch(prompts: list[list[int]]) -> list[list[int]]:
        t0 = time.perf_counter()
        answers = _generate(model, prompts, engine, generate_fn, max_new_tokens, pad, eos)
        run["seconds"] += time.perf_counter() - t0
        run["tokens"] += sum(len(a) for a in answers)
        return answers

    def write_shard(round_no: int, records: list[dict], waiting: list[dict]) -> None:
        number = next_shard[0]
        next_shard[0] += 1
        if waiting:
            _write_jsonl(out / f"pending-{number:05d}.jsonl", waiting)
            pending.update((r["id"], r) for r in waiting)
        if records:
            _write_jsonl(out / f"answers-{number:05d}.jsonl", records)
            done.update((r["id"], r) for r in records)
        manifest(False)
        if on_batch is not None:
            on_batch({"round": round_no, "shard": f"answers-{number:05d}.jsonl",
                      "answers": len(records) + len(waiting)})

    # Round 1: every first turn not answered yet.
    todo = [r for r in requests if r["id"] not in done
            and not (r.get("follow_up") and r["id"] in pending)]
    second = [r for r in requests if r.get("follow_up") and r["id"] not in done]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo) + len(second), desc=f"chat answers ({engine})",
                       unit="answer")
        except ImportError:
            bar = None
    manifest(False)
    prompts = {r["id"]: _encode(tokenizer, _template(tokenizer, r["messages"])) for r in todo}
    order = sorted(range(len(todo)), key=lambda i: (-len(prompts[todo[i]["id"]]), i))
    for start in range(0, len(order), batch_size):
        batch = [todo[i] for i in order[start: start + batch_size]]
        answers = run_batch([prompts[r["id"]] for r in batch])
        records, waiting = [], []
        for r, answer in zip(batch, answers):
            p = prompts[r["id"]]
            text, ended = _answer_text(tokenizer, answer, eos_set)
            record = {"id": r["id"], "kind": r["kind"]}
            if "source" in r:
                record["source"] = r["source"]
            record.update(
                messages=list(r["messages"]) + [{"role": "assistant", "content": text}],
                answers=1, prompt_tokens=len(p), answer_tokens=len(answer),
                truncated=int(not ended),
                answer_spans=[[len(p), len(p) + len(answer)]], ids=p + answer,
            )
            if r.get("follow_up"):
                record["ended"] = ended
                waiting.append(record)
            else:
                records.append(record)
        write_shard(1, records, waiting)
        if bar is not None:
            bar.update(len(batch))

    # Round 2: the follow-ups, after every first turn.
    prompts2 = {}
    for r in second:
        first = pending[r["id"]]
        prompts2[r["id"]] = _second_prompt(tokenizer, first, r["follow_up"])
    order = sorted(range(len(second)), key=lambda i: (-len(prompts2[second[i]["id"]][0]), i))
    for start in range(0, len(order), batch_size):
        batch = [second[i] for i in order[start: start + batch_size]]
        answers = run_batch([prompts2[r["id"]][0] for r in batch])
        records = []
        for r, answer in zip(batch, answers):
            first = pending[r["id"]]
            p, exact = prompts2[r["id"]]
            text, ended = _answer_text(tokenizer, answer, eos_set)
            spans = (first["answer_spans"] if exact else []) + [[len(p), len(p) + len(answer)]]
            ids = p + answer
            in_ids = sum(b - a for a, b in spans)
            record = {"id": r["id"], "kind": r["kind"]}
            if "source" in r:
                record["source"] = r["source"]
            record.update(
                messages=first["messages"] + [{"role": "user", "content": r["follow_up"]},
                                              {"role": "assistant", "content": text}],
                answers=2, prompt_tokens=len(ids) - in_ids, answer_tokens=in_ids,
                truncated=first["truncated"] + int(not ended), answer_spans=spans, ids=ids,
            )
            records.append(record)
        write_shard(2, records, [])
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return manifest(all(r["id"] in done for r in requests))


# --------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------


def load_chat_data(out_dir: str | os.PathLike) -> list[dict]:
    """The records of ``out_dir`` (``answers-*.jsonl``, in shard order: generation order), as
    :func:`answer_requests` wrote them; pending first turns are not included.

    Raises:
        FileNotFoundError: ``out_dir`` is not a folder or holds no answers.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder of chat answers")
    shards = _shards(out, "answers")
    if not shards:
        raise FileNotFoundError(f"{out} holds no chat answers (no answers-*.jsonl)")
    return list(_read_jsonl(shards).values())


def chat_token_rows(records: Sequence, seq_len: int, pad_id: int,
                    pad_last: bool = False) -> torch.Tensor:
    """The conversations' token ids packed back to back (each followed directly by the next,
    in the order given) and cut into rows of ``seq_len``: the ``--tokens`` format of
    ``mtp-ext train-heads``.

    Args:
        records: records of :func:`load_chat_data` (their ``"ids"``) or lists of token ids.
        seq_len: the row length (>= 1); ``train-heads --seq-len`` must be the same.
        pad_id: the id that fills the last row when ``pad_last``.
        pad_last: keep the last partial row, padded with ``pad_id`` on the right; by default it is
            dropped (as :func:`mtp_ext.training.tokenize_texts` does: training has no padding
            mask).
    Returns:
        ``[N, seq_len]`` int64 (``N`` may be 0).
    """
    _int_at_least("seq_len", seq_len, 1)
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"pad_id must be an int >= 0, got {pad_id!r}")
    flat: list[int] = []
    for i, r in enumerate(records):
        ids = r.get("ids") if isinstance(r, dict) else r
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"record {i} has no list of token ids")
        flat.extend(int(t) for t in ids)
    n, rem = divmod(len(flat), seq_len)
    if pad_last and rem:
        flat.extend([pad_id] * (seq_len - rem))
        n += 1
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)
