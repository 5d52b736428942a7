"""Safety of training checkpoints (``mtp_ext.training.checkpoint``) on the tiny random-weight Llama
of ``test_train.py``: a crafted ``trainer.pt`` runs no code, a run killed at any point of a
checkpoint swap resumes from the last complete checkpoint (bit-identically), ``mtp-ext
train-heads`` stopped by SIGINT or SIGTERM and run again ends with the uninterrupted run's heads,
and a resume with another head configuration is a clear error."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import cycle_texts, tiny_llama, word_tokenizer

from mtp_ext import training as T
from mtp_ext.heads import WEIGHTS_NAME, MTPHeads

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, SEQ = 200, 32, 2, 32


DATA = cycle_texts(VOCAB, SEQ, 24, seed=1), cycle_texts(VOCAB, SEQ, 4, seed=2)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB, HIDDEN, 64, LAYERS, 0)


def _cfg(**kw):
    base = dict(steps=6, seq_len=SEQ, target="text", batch_positions=64, lr=3e-2, warmup_steps=2,
                eval_every=0, progress=False, seed=0, checkpoint_every=2)
    base.update(kw)
    return T.TrainConfig(**base)


def _train(model, heads=None, **kw):
    tr, va = DATA
    heads = heads or MTPHeads.for_model(model, num_heads=2)
    return heads, T.train_heads(model, None, heads, tr, va, _cfg(**kw))


class _RunsCode:
    """Pickles as a call of ``exec`` that writes ``marker``: what a crafted checkpoint can hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_crafted_trainer_file_is_refused_without_running_code(model, tmp_path):
    out = str(tmp_path / "run")
    _train(model, out_dir=out, stop_at=2)
    trainer = os.path.join(out, "checkpoint", "trainer.pt")
    marker = tmp_path / "marker"
    torch.save({"step": 2, "history": {}, "payload": _RunsCode(marker)}, trainer)
    with pytest.raises(ValueError) as err:
        _train(model, out_dir=out)
    assert not marker.exists()
    msg = str(err.value)
    assert trainer in msg and "--out" in msg and "delete" in msg, msg


@pytest.mark.parametrize("joint", [False, True])
def test_genuine_checkpoint_is_plain_data(model, tmp_path, joint):
    """What train-heads writes loads with ``weights_only=True`` (tensors and plain containers)."""
    out = str(tmp_path / "run")
    extra = dict(joint=True, joint_seqs=2) if joint else {}
    _train(model, out_dir=out, stop_at=2, **extra)
    state = torch.load(os.path.join(out, "checkpoint", "trainer.pt"), weights_only=True)
    assert state["step"] == 2 and isinstance(state["generator"], torch.Tensor)
    assert ("backbone" in state) == joint


class _Killed(BaseException):
    """Stands for the process being killed (not an Exception, so nothing catches it)."""


# The file operations of one checkpoint swap, in order: write the new trainer file (into a
# temporary folder), rename the old checkpoint aside, rename the new one into place, delete the
# old one. Killed at each, the next run resumes from this step.
SWAP_KILLS = [(0, 2, "checkpoint"), (1, 2, "checkpoint"), (2, 2, "checkpoint.old"),
              (3, 4, "checkpoint")]


@pytest.mark.parametrize("kill_at,resumes_at,folder", SWAP_KILLS)
def test_kill_during_checkpoint_swap_resumes_from_last_complete(
    model, tmp_path, monkeypatch, capsys, kill_at, resumes_at, folder,
):
    ref_heads, ref = _train(model)
    out = str(tmp_path / "run")
    _train(model, out_dir=out, stop_at=2)  # a complete checkpoint at step 2
    capsys.readouterr()

    calls = []

    def killing(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            if len(calls) - 1 == kill_at:
                raise _Killed(fn.__name__)
            return fn(*args, **kwargs)
        return wrapped

    with monkeypatch.context() as mp:
        for owner, name in [(torch, "save"), (os, "rename"), (os, "replace"), (shutil, "rmtree")]:
            mp.setattr(owner, name, killing(getattr(owner, name)))
        with pytest.raises(_Killed):
            _train(model, out_dir=out)  # killed while replacing the step-2 checkpoint
    assert len(calls) == kill_at + 1
    capsys.readouterr()

    heads, res = _train(model, out_dir=out)
    err = capsys.readouterr().err
    want = f"resumed from {os.path.join(out, folder)} at step {resumes_at}"
    assert want in err, err
    assert res["step"] == 6
    assert res["history"]["step"] == list(range(6))
    assert res["history"]["loss"] == ref["history"]["loss"]  # bit-identical
    for k, v in ref_heads.state_dict().items():
        assert torch.equal(heads.state_dict()[k], v), k
    assert sorted(os.listdir(out)) == ["checkpoint", "heads", "log.jsonl"]


def test_resume_with_other_heads_is_a_clear_error(model, tmp_path):
    out = str(tmp_path / "run")
    _train(model, out_dir=out, stop_at=2)
    ckpt = os.path.join(out, "checkpoint")
    cases = [
        (MTPHeads.for_model(model, num_heads=3), {}, ["num_heads", "saved 2", "requested 3"]),
        (MTPHeads.for_model(model, num_heads=2, kind="linear"), {},
         ["kind", "saved 'resblock'", "requested 'linear'"]),
        (MTPHeads.for_model(model, num_heads=2, layer=1), {}, ["layer", "saved -1", "requested 1"]),
        (MTPHeads.for_model(model, num_heads=2), dict(joint=True, joint_seqs=2),
         ["joint", "saved False", "requested True"]),
    ]
    for heads, extra, words in cases:
        with pytest.raises(ValueError) as err:
            _train(model, heads=heads, out_dir=out, **extra)
        msg = str(err.value)
        for word in [ckpt, "--out", "delete", *words]:
            assert word in msg, (word, msg)
    # The checkpoint is untouched: the same configuration still resumes.
    _, res = _train(model, out_dir=out)
    assert res["step"] == 6


# ----------------------------------------------------------------------------------------------
# `mtp-ext train-heads` stopped by a signal, then run again with the same arguments
# ----------------------------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("signals")
    model.save_pretrained(root / "model")
    word_tokenizer(VOCAB).save_pretrained(root / "model")
    torch.save({"train": DATA[0], "validation": DATA[1]}, root / "toks.pt")
    return root


def _train_heads_cmd(root, out):
    return [sys.executable, "-m", "mtp_ext", "train-heads", "--model", str(root / "model"),
            "--tokens", str(root / "toks.pt"), "--seq-len", str(SEQ), "--batch-positions", "64",
            "--steps", "60", "--checkpoint-every", "1", "--eval-every", "0", "--no-progress",
            "--out", str(out)]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def uninterrupted(cli_inputs):
    out = cli_inputs / "ref"
    proc = subprocess.run(_train_heads_cmd(cli_inputs, out), env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "heads" / WEIGHTS_NAME))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_then_rerun_ends_as_the_uninterrupted_run(cli_inputs, uninterrupted, tmp_path,
                                                         signum):
    out = tmp_path / "run"
    cmd = _train_heads_cmd(cli_inputs, out)
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint").is_dir() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.005)
    time.sleep(0.05)  # a few steps (and checkpoint swaps) further
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run ended before the signal came")
    again = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "at step" in again.stderr, again.stderr[-3000:]
    got = load_file(str(out / "heads" / WEIGHTS_NAME))
    assert got.keys() == uninterrupted.keys()
    for k in got:
        assert torch.equal(got[k], uninterrupted[k]), k  # bit-identical
