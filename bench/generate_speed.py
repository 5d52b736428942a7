"""Decoding speed on a real model: ``mtp_ext.generate`` against ``model.generate`` and
transformers' prompt-lookup decoding, with identical-output checks.

SmolLM2-135M (float32 by default) with the shipped heads (or ``--heads DIR``), greedy, on two
prompt sets (``--set continuation|chat|both``, default both):

- ``continuation``: prompts cut from the validation split of several texts (prose, translation,
  code), or the token ids of ``--prompts FILE``;
- ``chat``: the requests of ``bench/prompts/chat.json`` (the four prompts of ``mtp-ext demo``, then
  questions about a passage, instructions, code explanation and writing, summaries, translations
  and multi-turn conversations), sent in the model's chat template.

For every prompt the methods run interleaved (one call each per round) and the set's table reports
median tokens per second, the ratios measured in the same rounds, the mean tokens per tree step,
whether the tokens equal ``model.generate``'s in every round, and the agreement (the common prefix
of the new tokens over the new tokens, lowest round). Then per set a left-padded batch of 4 and a
sampling run. ``--dtypes float32,bfloat16`` runs one section per dtype, one after the other.

    python bench/generate_speed.py                       # markdown on stdout
    python bench/generate_speed.py --quick               # 2 prompts per set, 32 tokens, 1 round
    python bench/generate_speed.py --json out.json --rounds 3 --tree 8
    python bench/generate_speed.py --dtypes float32,bfloat16 --set chat
    python bench/generate_speed.py --device cuda --prompts bench/prompts/smollm2.json

Without ``--tree`` no tree is passed: ``mtp_ext.generate`` decides (its default). ``--save-prompts
FILE`` writes the continuation prompts' token ids, and ``--prompts FILE`` reads them instead of the
texts (for machines where the texts are not installed). On CUDA every timed call ends with a device
synchronization. Importing this file runs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import mtp_ext
from mtp_ext.heads import MTPHeads

TEXTS = ("web", "austen", "python", "en-es")
SETS = ("continuation", "chat")
CHAT_FILE = Path(__file__).resolve().parent / "prompts" / "chat.json"
# The kinds of request bench/prompts/chat.json holds, besides the demo's prompts ("demo-<name>").
CHAT_KINDS = ("question", "instruction", "code", "summary", "translation", "multi-turn")
QUICK = {"per_set": 2, "new_tokens": 32, "rounds": 1}
BATCH = 4
TREE_DEFAULT = "controller (default)"


# ---- prompts -------------------------------------------------------------------------------------

def prompts(tokenizer, per_text: int, length: int) -> list[tuple[str, torch.Tensor]]:
    """``(label, ids [1, P])``: the first ``length`` tokens of validation items of each text
    (items long enough; en-es pairs become 'English: ...\\nSpanish:' prompts)."""
    from mtp_ext.data.texts import load_text

    out = []
    for name in TEXTS:
        items = load_text(name, "validation")
        stride = max(1, len(items) // (3 * per_text))  # spread the prompts over the split
        taken = 0
        for i in range(0, len(items), stride):
            if name == "en-es":
                en = items[i].split("\t")[0]
                text = f"Translate into Spanish.\nEnglish: {en}\nSpanish:"
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
            else:
                ids = tokenizer(items[i][:20 * length], return_tensors="pt")["input_ids"]
                if ids.shape[1] < length:
                    continue
                ids = ids[:, :length]
            out.append((f"{name}#{i}", ids))
            taken += 1
            if taken == per_text:
                break
    return out


def save_prompts(path: str, ps: list[tuple[str, torch.Tensor]]) -> None:
    with open(path, "w") as f:
        json.dump([{"label": label, "ids": ids[0].tolist()} for label, ids in ps], f)


def read_prompts(path: str) -> list[tuple[str, torch.Tensor]]:
    with open(path) as f:
        return [(p["label"], torch.tensor([p["ids"]], dtype=torch.long)) for p in json.load(f)]


def read_chat_prompts(path: str | Path = CHAT_FILE) -> list[dict]:
    """The entries of a chat prompt file: ``{"label", "kind", "messages": [{"role", "content"}]}``
    (sent in the chat template) or ``{"label", "kind", "text", "chat": false}`` (plain text).
    Raises ValueError on an entry of neither form or a repeated label."""
    with open(path) as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of prompts")
    seen = set()
    for i, e in enumerate(entries):
        where = f"{path}: entry {i} ({e.get('label', '?') if isinstance(e, dict) else e!r})"
        if not isinstance(e, dict) or not isinstance(e.get("label"), str) or not e.get("kind"):
            raise ValueError(f"{where}: needs a 'label' and a 'kind'")
        if e["label"] in seen:
            raise ValueError(f"{where}: label repeated")
        seen.add(e["label"])
        if "messages" in e:
            msgs = e["messages"]
            if (not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "user"
                    or any(set(m) != {"role", "content"} or not isinstance(m["content"], str)
                           or m["role"] not in ("system", "user", "assistant") for m in msgs)):
                raise ValueError(f"{where}: 'messages' must be role/content pairs ending with "
                                 "the user's")
        elif not (isinstance(e.get("text"), str) and e.get("chat") is False):
            raise ValueError(f"{where}: needs 'messages', or 'text' with \"chat\": false")
    return entries


def encode_chat_prompt(tokenizer, entry: dict) -> torch.Tensor:
    """``[1, P]`` int64 ids of one chat file entry: its messages in the tokenizer's chat template
    (with the assistant's generation prompt, the template's text not re-tokenized with special
    tokens, as ``mtp_ext.cli.compare.encode_prompt`` does), or its plain text."""
    if "messages" not in entry:
        return tokenizer(entry["text"], return_tensors="pt")["input_ids"]
    text = tokenizer.apply_chat_template(entry["messages"], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def chat_prompts(tokenizer, path: str | Path = CHAT_FILE) -> list[tuple[str, torch.Tensor]]:
    """``(label, ids [1, P])`` of every entry of the chat prompt file, in its order."""
    return [(e["label"], encode_chat_prompt(tokenizer, e)) for e in read_chat_prompts(path)]


def spread(items: list, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (the first included; all of them without ``n``)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[round(i * len(items) / n)] for i in range(n)]


def firsts(ps: list[tuple[str, torch.Tensor]], key, size: int = BATCH) -> list:
    """The first prompt of each distinct ``key(label)`` (prompts whose key is None skipped), at
    most ``size`` of them: the rows of a set's batch."""
    out: dict = {}
    for label, ids in ps:
        k = key(label)
        if k is not None and k not in out and len(out) < size:
            out[k] = (label, ids)
    return list(out.values())


# ---- timing --------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn):
    """``(fn(), seconds)``, the device's queued work included."""
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return result, time.perf_counter() - start


_WARM: set = set()


def warm_up(model, heads, ids, mtp_kw: dict, **kw) -> None:
    """One short untimed ``mtp_ext.generate`` call per model and batch size, before anything of it
    is timed: what generate measures once per machine, model, dtype and batch size (its default
    tree's step costs, cached) is not counted in the first timed call."""
    key = (id(model), str(model.dtype), int(ids.shape[0]))
    if key not in _WARM:
        mtp_ext.generate(model, ids, heads, max_new_tokens=4, do_sample=False, **mtp_kw, **kw)
        _WARM.add(key)


def agreement(seqs: torch.Tensor, ref: torch.Tensor, prompt_len: int) -> float:
    """The lowest over rows of (length of the common prefix of the new tokens of ``seqs`` and
    ``ref``) / (the new tokens of ``ref``): 1.0 when equal."""
    a, b = seqs[:, prompt_len:], ref[:, prompt_len:]
    n = min(a.shape[1], b.shape[1])
    if b.shape[1] == 0:
        return 1.0
    worst = 1.0
    for row in range(b.shape[0]):
        diff = (a[row, :n] != b[row, :n]).nonzero()
        prefix = int(diff[0, 0]) if diff.numel() else n
        worst = min(worst, prefix / b.shape[1])
    return worst


def bench_prompt(model, heads, ids, new_tokens: int, rounds: int, mtp_kw: dict) -> dict:
    """Interleaved rounds of the three decoders on one prompt; medians. Ratios are of the time
    per token, measured in the same round (equal to the time ratios when the outputs are equal)."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False)
    fns = {
        "hf": lambda: model.generate(ids, **kw),
        "pld": lambda: model.generate(ids, prompt_lookup_num_tokens=10, **kw),
        "mtp": lambda: mtp_ext.generate(model, ids, heads, return_dict_in_generate=True,
                                        **mtp_kw, **kw),
    }
    P = ids.shape[1]
    per_token = {k: [] for k in fns}  # seconds per new token, per round
    same = pld_same = True
    steps_tokens, agree = [], []
    fns["hf"]()  # warm-up
    warm_up(model, heads, ids, mtp_kw)
    for _ in range(rounds):
        outs = {}
        for name, fn in fns.items():
            outs[name], dt = timed(fn)
            seqs = outs[name].sequences if name == "mtp" else outs[name]
            per_token[name].append(dt / max(1, seqs.shape[1] - P))
        ref = outs["hf"]
        same &= torch.equal(outs["mtp"].sequences, ref)
        pld_same &= torch.equal(outs["pld"], ref)
        agree.append(agreement(outs["mtp"].sequences, ref, P))
        steps_tokens.append(outs["mtp"].tokens_per_step)

    def ratio(a: str, b: str) -> float:  # how much faster b is than a
        return statistics.median([x / y for x, y in zip(per_token[a], per_token[b])])

    return {
        "prompt_tokens": int(P),
        "new_tokens": int(ref.shape[1] - P),
        "tok_s": {k: 1.0 / statistics.median(v) for k, v in per_token.items()},
        "mtp_vs_hf": ratio("hf", "mtp"),
        "pld_vs_hf": ratio("hf", "pld"),
        "mtp_vs_pld": ratio("pld", "mtp"),
        "tokens_per_step": statistics.median(steps_tokens),
        "identical": bool(same),
        "pld_identical": bool(pld_same),
        "agreement": min(agree),
    }


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS token (tokenizers converted from GGUF by some
    transformers releases have no pad token)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def left_pad(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, P], attention_mask [B, P])`` from 1-D rows of different lengths, left-padded."""
    width = max(r.numel() for r in rows)
    ids = rows[0].new_full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    return ids, mask


def bench_batch(model, heads, batch_ids, new_tokens: int, rounds: int, mtp_kw: dict,
                tokenizer) -> dict:
    ids, mask = left_pad(batch_ids, pad_id(tokenizer))
    kw = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=mask)
    th, tm, same, tps, agree = [], [], True, [], []
    model.generate(ids, **kw)
    warm_up(model, heads, ids, mtp_kw, attention_mask=mask)
    for _ in range(rounds):
        ref, dt = timed(lambda: model.generate(ids, **kw))
        th.append(dt)
        out, dt = timed(lambda: mtp_ext.generate(model, ids, heads, return_dict_in_generate=True,
                                                 **mtp_kw, **kw))
        tm.append(dt)
        same &= torch.equal(out.sequences, ref)
        agree.append(agreement(out.sequences, ref, ids.shape[1]))
        tps.append(out.tokens_per_step)
    return {"batch": ids.shape[0], "mtp_vs_hf": statistics.median([h / m for h, m in zip(th, tm)]),
            "tokens_per_step": statistics.median(tps), "identical": bool(same),
            "agreement": min(agree)}


def bench_sampling(model, heads, ids, new_tokens: int, rounds: int, mtp_kw: dict) -> dict:
    kw = dict(max_new_tokens=new_tokens, do_sample=True, temperature=0.7, top_p=0.9, top_k=0)
    th, tm, tps = [], [], []
    for r in range(rounds):
        torch.manual_seed(r)
        ref, dt = timed(lambda: model.generate(ids, **kw))
        th.append(dt / max(1, ref.shape[1] - ids.shape[1]))
        gen = torch.Generator(device=ids.device).manual_seed(r)
        out, dt = timed(lambda: mtp_ext.generate(model, ids, heads, generator=gen,
                                                 return_dict_in_generate=True, **mtp_kw, **kw))
        tm.append(dt / max(1, int(out.new_tokens.sum())))
        tps.append(out.tokens_per_step)
    return {"settings": "temperature 0.7, top-p 0.9",
            "mtp_vs_hf": statistics.median([h / m for h, m in zip(th, tm)]),
            "tokens_per_step": statistics.median(tps)}


# ---- tables --------------------------------------------------------------------------------------

SET_WORDS = {
    "continuation": "continuation prompts (the first tokens of validation texts: prose, code, "
                    "English-Spanish translation)",
    "chat": "chat prompts (bench/prompts/chat.json in the chat template; the demo's story, code "
            "and translation prompts as plain text)",
}
BATCH_WORDS = {
    "continuation": "the first prompt of each text",
    "chat": "the first chat-template prompt of each kind",
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _share(x: float) -> str:
    return "100%" if x >= 1.0 else f"{x:.1%}"


def set_markdown(name: str, res: dict, meta: dict) -> str:
    """One set's caption, table, median row, lowest-ratio line, batch and sampling lines."""
    rows, batch, sampling = res["prompts"], res.get("batch"), res.get("sampling")
    source = SET_WORDS.get(name, f"{name} prompts")
    if name == "continuation" and meta.get("prompt_file"):
        source = f"continuation prompts (token ids from {meta['prompt_file']})"
    lines = [
        f"SmolLM2-135M {meta['dtype']}, {source}, greedy, batch 1, at most {meta['new_tokens']} "
        f"new tokens, tree {meta['tree']}, heads {meta['heads']}, {meta['rounds']} interleaved "
        f"round(s) per prompt (medians). Machine: {meta['where']}; transformers "
        f"{meta['transformers']}.",
        "",
        "| prompt | new tokens | model.generate tok/s | prompt lookup tok/s | mtp_ext tok/s | "
        "mtp_ext / generate | prompt lookup / generate | mtp_ext / prompt lookup | tokens per step "
        "| identical | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        t = r["tok_s"]
        ident = _yes(r["identical"]) + ("" if r.get("pld_identical", True) else " (lookup: NO)")
        lines.append(
            f"| {label} | {r['new_tokens']} | {t['hf']:.1f} | {t['pld']:.1f} | {t['mtp']:.1f} | "
            f"{r['mtp_vs_hf']:.2f}x | {r['pld_vs_hf']:.2f}x | {r['mtp_vs_pld']:.2f}x | "
            f"{r['tokens_per_step']:.2f} | {ident} | {_share(r['agreement'])} |"
        )
    col = {k: [r[k] for _, r in rows]
           for k in ("mtp_vs_hf", "pld_vs_hf", "mtp_vs_pld", "tokens_per_step", "agreement")}
    med = {k: statistics.median(v) for k, v in col.items()}
    lines.append(
        f"| **median** | | | | | **{med['mtp_vs_hf']:.2f}x** | {med['pld_vs_hf']:.2f}x | "
        f"{med['mtp_vs_pld']:.2f}x | {med['tokens_per_step']:.2f} | "
        f"{_yes(all(r['identical'] for _, r in rows))} | {_share(med['agreement'])} |"
    )

    def lowest(key: str) -> str:
        label, r = min(rows, key=lambda lr: lr[1][key])
        return f"{r[key]:.2f}x ({label})"

    worst_label, worst = min(rows, key=lambda lr: lr[1]["agreement"])
    lines += [
        "",
        f"Lowest on any prompt: mtp_ext / generate {lowest('mtp_vs_hf')}, mtp_ext / prompt lookup "
        f"{lowest('mtp_vs_pld')}; identical on {sum(r['identical'] for _, r in rows)} of "
        f"{len(rows)} prompts, lowest agreement {_share(worst['agreement'])} ({worst_label}).",
    ]
    if batch:
        lines += [
            "",
            f"Batch {batch['batch']} (left-padded, {BATCH_WORDS.get(name, 'one prompt per group')}"
            f"): mtp_ext / generate {batch['mtp_vs_hf']:.2f}x, {batch['tokens_per_step']:.2f} "
            f"tokens per step, identical: {_yes(batch['identical'])}, agreement "
            f"{_share(batch.get('agreement', 1.0))}.",
        ]
    if sampling:
        lines += [
            "",
            f"Sampling ({sampling['settings']}, first prompt, time per token): mtp_ext / generate "
            f"{sampling['mtp_vs_hf']:.2f}x, {sampling['tokens_per_step']:.2f} tokens per step.",
        ]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The report: per dtype section a heading, then one table group per prompt set.
    ``result = {"sections": [{"meta": {...}, "sets": {name: {"prompts": [(label, row)], "batch",
    "sampling"}}}]}`` (what :func:`main` writes with ``--json``)."""
    parts = []
    for section in result["sections"]:
        meta = section["meta"]
        parts.append(f"#### SmolLM2-135M, {meta['dtype']}")
        for name, res in section["sets"].items():
            parts.append(set_markdown(name, res, meta))
    return "\n\n".join(parts)


# ---- the run -------------------------------------------------------------------------------------

def machine_line(device: torch.device) -> str:
    from mtp_ext.machine import describe_cpu

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, host {describe_cpu()}"
    return describe_cpu()


def run_section(dtype: str, args, sets: list[str], mtp_kw: dict) -> dict:
    """Loads the model in ``dtype`` and measures every set; the section's results."""
    import transformers

    from mtp_ext.data.assets import load_model
    from mtp_ext.machine import cpu_facts

    device = torch.device(args.device)
    model, tokenizer = load_model("smollm2-135m", getattr(torch, dtype))
    model.to(device)
    heads = (MTPHeads.from_pretrained(args.heads, model,
                                      dtype=model.get_output_embeddings().weight.dtype).eval()
             if args.heads else mtp_ext.load_heads("smollm2-135m", model))
    per_set = QUICK["per_set"] if args.quick else None
    out = {}
    with torch.no_grad():
        for name in sets:
            if name == "continuation":
                ps = (read_prompts(args.prompts) if args.prompts
                      else prompts(tokenizer, args.per_text, args.prompt_tokens))
                if args.save_prompts:
                    save_prompts(args.save_prompts, ps)
                key = lambda label: label.split("#")[0]  # noqa: E731
            else:
                entries = read_chat_prompts(args.chat_prompts)
                ps = [(e["label"], encode_chat_prompt(tokenizer, e)) for e in entries]
                kinds = {e["label"]: e["kind"] for e in entries if "messages" in e}
                key = kinds.get
            ps = [(label, ids.to(device)) for label, ids in ps]
            rows = []
            for label, ids in spread(ps, per_set):
                rows.append((label, bench_prompt(model, heads, ids, args.new_tokens, args.rounds,
                                                 mtp_kw)))
                print(f"{dtype} {name} {label}", json.dumps(rows[-1][1]), flush=True)
            batch_rows = [ids[0] for _, ids in firsts(ps, key)]  # from the whole set
            batch = (bench_batch(model, heads, batch_rows, args.new_tokens, args.rounds, mtp_kw,
                                 tokenizer) if len(batch_rows) > 1 else None)
            print(f"{dtype} {name} batch", json.dumps(batch), flush=True)
            sampling = bench_sampling(model, heads, ps[0][1], args.new_tokens,
                                      args.rounds, mtp_kw)
            print(f"{dtype} {name} sampling", json.dumps(sampling), flush=True)
            out[name] = {"prompts": rows, "batch": batch, "sampling": sampling}
    meta = {"dtype": dtype, "device": device.type, "where": machine_line(device),
            "machine": cpu_facts(), "threads": torch.get_num_threads(),
            "new_tokens": args.new_tokens, "tree": args.tree or TREE_DEFAULT,
            "heads": args.heads or "shipped", "rounds": args.rounds, "quick": bool(args.quick),
            "prompt_file": args.prompts, "chat_file": str(args.chat_prompts),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    del model, heads
    return {"meta": meta, "sets": out}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="both", choices=[*SETS, "both"],
                   help="which prompt set(s) to run (default both)")
    p.add_argument("--heads", default=None, help="heads folder (default: the shipped heads)")
    p.add_argument("--tree", default=None,
                   help="node count or 'chain' (default: none passed, generate's controller)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 prompts per set, 32 new tokens, 1 round")
    p.add_argument("--per-text", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lookup", type=int, default=None,
                   help="mtp_ext.generate's prompt_lookup_num_tokens (default: generate's default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dtypes", default=None,
                   help="comma-separated dtypes, one section each (overrides --dtype)")
    p.add_argument("--prompts", default=None,
                   help="read the continuation prompts' token ids from this JSON file")
    p.add_argument("--save-prompts", default=None,
                   help="write the continuation prompts' token ids to this file")
    p.add_argument("--chat-prompts", default=str(CHAT_FILE), help="the chat prompt file")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.new_tokens is None:
        args.new_tokens = QUICK["new_tokens"] if args.quick else 128
    if args.rounds is None:
        args.rounds = QUICK["rounds"] if args.quick else 3
    dtypes = args.dtypes.split(",") if args.dtypes else [args.dtype]
    bad = [d for d in dtypes if d not in ("float32", "bfloat16", "float16")]
    if bad:
        p.error(f"--dtypes: unknown dtype(s) {', '.join(bad)}")
    args.dtype_list = dtypes
    return args


def emit(result: dict, text: str, json_path: str | None) -> dict:
    """Prints ``text`` (the markdown) and writes ``result`` to ``json_path`` when given; returns
    ``result``."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    mtp_kw: dict = {}  # extra arguments of every mtp_ext.generate call; no tree: generate decides
    if args.lookup is not None:
        mtp_kw["prompt_lookup_num_tokens"] = args.lookup
    if args.tree is not None:
        mtp_kw["tree"] = int(args.tree) if args.tree.isdigit() else args.tree
    sets = list(SETS) if args.set == "both" else [args.set]
    sections = [run_section(dtype, args, sets, mtp_kw) for dtype in args.dtype_list]
    result = {"meta": sections[0]["meta"], "sections": sections}
    # The first section's first set under the keys of the single-set files written before.
    first = sections[0]["sets"].get("continuation") or next(iter(sections[0]["sets"].values()))
    result.update(first)
    return emit(result, markdown(result), args.json)


if __name__ == "__main__":
    main()
