"""The ``mtp-ext`` command line on tiny random-weight models: a bad value or a missing input is one
line ``mtp-ext <command>: error: <message>`` and exit status 2 (as argparse reports), a bug keeps
its traceback (and ``--debug`` or ``MTP_EXT_DEBUG=1`` keep it for every error), and ``generate
--chat`` prints the text without the chat template's special tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from helpers import tiny_llama, word_tokenizer

from mtp_ext import cli
from mtp_ext.heads import MTPHeads

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ = 120, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model folder, token file, heads folder)`` of a tiny Llama."""
    root = tmp_path_factory.mktemp("cli")
    model = tiny_llama(VOCAB, 32, 64, 2, 0)
    model.save_pretrained(root / "model")
    word_tokenizer(VOCAB).save_pretrained(root / "model")
    ids = torch.randint(0, VOCAB - 2, (8, SEQ), generator=torch.Generator().manual_seed(0))
    torch.save({"train": ids, "validation": ids[:2]}, root / "toks.pt")
    MTPHeads.for_model(model, num_heads=2).save_pretrained(root / "heads")
    return root / "model", root / "toks.pt", root / "heads"


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    env.pop("MTP_EXT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mtp_ext", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _cases(model, toks, heads, tmp):
    gen = ["generate", "--model", model, "--heads", heads, "--prompt", "w1 w2 w3"]
    train = ["train-heads", "--model", model, "--tokens", toks, "--seq-len", SEQ,
             "--out", tmp / "out", "--no-progress"]
    return [
        (gen + ["--max-new-tokens", "-3"], "generate", "max_new_tokens must be >= 0, got -3"),
        (gen + ["--heads", tmp / "no-heads"], "generate", str(tmp / "no-heads")),
        (gen + ["--do-sample", "--top-p", "1.5"], "generate",
         "top_p must be in (0, 1]"),
        (["generate", "--model", tmp / "no-model", "--prompt", "w1"], "generate",
         str(tmp / "no-model")),
        (train + ["--steps", "-1"], "train-heads", "steps must be >= 0"),
        (train + ["--init-heads", tmp / "no-heads"], "train-heads", str(tmp / "no-heads")),
    ]


@pytest.mark.parametrize("case", range(6))
def test_user_errors_are_one_line_and_status_2(tiny, tmp_path, case):
    args, command, words = _cases(*tiny, tmp_path)[case]
    proc = _run(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"mtp-ext {command}: error: "), lines
    assert words in lines[0], lines[0]


def _failing(exc):
    def run(args):
        raise exc
    return run


def test_bugs_keep_their_traceback_and_debug_keeps_every_one(monkeypatch, capsys):
    from mtp_ext.cli import info

    monkeypatch.setattr(info, "run", _failing(ValueError("bad\nvalue")))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == "mtp-ext info: error: bad value\n"
    with pytest.raises(ValueError, match="bad"):
        cli.main(["--debug", "info"])
    monkeypatch.setenv("MTP_EXT_DEBUG", "1")
    with pytest.raises(ValueError, match="bad"):
        cli.main(["info"])
    monkeypatch.delenv("MTP_EXT_DEBUG")
    monkeypatch.setattr(info, "run", _failing(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info"])


def _chat_model_folder(root):
    """A tiny Llama that always predicts token 0 (its final norm weight is zero, so every logit
    is 0), with a ChatML-style tokenizer whose token 0 is ``<|im_end|>``, also the EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny_llama(VOCAB, 32, 64, 2, 0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.config.eos_token_id = model.generation_config.eos_token_id = 0
    model.save_pretrained(root)
    vocab = {"<|im_end|>": 0, "<|im_start|>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = ("{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> "
                          "{% endfor %}<|im_start|>")
    fast.save_pretrained(root)
    return model


@pytest.mark.parametrize("stream", [True, False])
def test_generate_chat_prints_no_special_tokens(tmp_path, capsys, stream):
    model = _chat_model_folder(tmp_path / "model")
    MTPHeads.for_model(model, num_heads=2).save_pretrained(tmp_path / "heads")
    rc = cli.main([
        "generate", "--model", str(tmp_path / "model"), "--heads", str(tmp_path / "heads"),
        "--prompt", "w5 w6 w7", "--chat", "--max-new-tokens", "4", "--tree", "3",
        *([] if stream else ["--no-stream"]),
    ])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "1 tokens" in out, out  # the end token was generated (and ended the answer)
    text = out.split("[mtp-ext]")[0]
    assert "w5 w6 w7" in text and "<|im_end|>" not in text and "<|im_start|>" not in text, text
