"""Distributed (data-parallel) training of MTP heads (``mtp_ext.training``, ``mtp-ext train-heads``
under ``torchrun``) on the tiny random-weight Llama of ``test_train.py``.

The strong check: a 2-process CPU run (gloo backend, launched with ``python -m
torch.distributed.run``) ends with the same heads as the single-process run on the same seed and
global batch, which holds only when every rank takes its share of the same global batch and the
gradient shares are summed across ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from helpers import cycle_texts, tiny_llama

from mtp_ext import training as T
from mtp_ext.heads import MTPHeads
from mtp_ext.training import steps
from mtp_ext.training.distributed import check_distributed, rank_slice
from mtp_ext.training.forward import heads_forward
from mtp_ext.training.losses import head_counts, teacher_logits

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, LAYERS, SEQ = 200, 32, 2, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 300


def _cycle_texts(n_seqs: int, seed: int) -> torch.Tensor:
    return cycle_texts(VOCAB, SEQ, n_seqs, seed)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# Unit tests (one process)
# ----------------------------------------------------------------------------------------------


def test_rank_slices_are_contiguous_equal_and_cover_the_batch():
    P, W = 12, 3
    slices = [rank_slice(P, r, W) for r in range(W)]
    assert [(s.start, s.stop) for s in slices] == [(0, 4), (4, 8), (8, 12)]
    items = torch.arange(P)
    assert torch.equal(torch.cat([items[s] for s in slices]), items)
    assert rank_slice(5, 0, 1) == slice(0, 5)


def test_rank_slice_and_config_divisibility_errors():
    with pytest.raises(ValueError, match=r"batch_positions=10 must be divisible by the world size 4"):
        rank_slice(10, 1, 4, "batch_positions")
    with pytest.raises(ValueError, match="rank must be in"):
        rank_slice(8, 2, 2)
    with pytest.raises(ValueError, match="batch_positions=6 must be divisible by the world size 4"):
        check_distributed(T.TrainConfig(batch_positions=6), 4)
    with pytest.raises(ValueError, match="joint_seqs=3 must be divisible by the world size 2"):
        check_distributed(T.TrainConfig(joint=True, joint_seqs=3, batch_positions=7), 2)
    check_distributed(T.TrainConfig(batch_positions=8), 4)  # no error


@pytest.mark.parametrize("joint", [False, True])
def test_each_rank_steps_on_its_share_of_the_same_global_batch(monkeypatch, joint):
    """Rank ``r`` of 2 runs the heads on exactly its half of the positions (joint: sequences) the
    single process draws with the same seed."""
    model = tiny_llama(VOCAB, HIDDEN, 64, LAYERS, 0)
    heads = MTPHeads.for_model(model, num_heads=2)
    ids = _cycle_texts(8, seed=1)
    cfg = T.TrainConfig(seq_len=SEQ, batch_positions=16, joint=joint, joint_seqs=4)
    cache = None if joint else T.build_cache(model, heads, ids, cfg)
    seen = []
    forward = heads_forward

    def recording_forward(heads, feat, ids_, s, t):
        seen.append(ids_[s[:: SEQ - 2]] if joint else torch.stack([s, t], 1))
        return forward(heads, feat, ids_, s, t)

    monkeypatch.setattr(steps, "heads_forward", recording_forward)
    monkeypatch.setattr(steps, "global_scale", lambda local, world: None)  # no process group here
    for rank, world in [(0, 1), (0, 2), (1, 2)]:
        gen = torch.Generator().manual_seed(0)
        if joint:
            steps.joint_step(model, heads, ids, gen, 0, cfg, list(model.parameters()), rank, world)
        else:
            steps.frozen_step(model, heads, ids, cache, gen, cfg, rank, world)
    full, r0, r1 = seen
    assert len(r0) == len(r1) == len(full) // 2
    assert torch.equal(torch.cat([r0, r1]), full)


@pytest.mark.parametrize("kl", [False, True])
def test_scaled_shares_sum_to_the_global_loss_and_gradient(kl):
    """The per-rank loss scaling (counted positions of this share over the global count) makes
    the shares' losses and gradients sum to the global batch's, also when the shares hold
    different numbers of counted positions (positions near the end of their sequence, targets
    outside the draft vocabulary)."""
    model = tiny_llama(VOCAB, HIDDEN, 64, LAYERS, 0)
    heads = MTPHeads.for_model(model, num_heads=3, kind="linear", draft_vocab_size=40)
    ids = _cycle_texts(4, seed=5)
    cycle = ids.unique()
    others = torch.tensor([i for i in range(VOCAB) if i not in set(cycle.tolist())])
    heads.set_draft_vocab(torch.cat([cycle[:8], others[:32]]))  # half the targets drop out
    cfg = T.TrainConfig(seq_len=SEQ, target="kl" if kl else "text")
    cache = T.build_cache(model, heads, ids, cfg)
    s = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    t = torch.tensor([29, 28, 27, 26, 3, 4, 5, 6])  # the first share ends its sequences

    def targets(sel):
        return T.head_targets(cache["ids"], cache["greedy"], s[sel], t[sel], 3, cfg.target)

    def counts(sel):
        return head_counts(heads, *targets(sel), kl).double()

    def loss_and_grad(sel, scale=None):
        heads.zero_grad(set_to_none=True)
        logits = heads_forward(heads, cache["feat"], cache["ids"], s[sel], t[sel])
        tg, valid = targets(sel)
        tl = teacher_logits(heads, cache, s[sel], t[sel], valid) if kl else None
        loss, _ = T.mtp_loss(heads, logits, tg, valid, tl, scale)
        loss.backward()
        return float(loss.detach()), heads.weight.grad.clone()

    everything = slice(0, 8)
    ref_loss, ref_grad = loss_and_grad(everything)
    shares = [slice(0, 4), slice(4, 8)]
    assert not torch.equal(counts(shares[0]), counts(shares[1]))
    loss_sum, grad_sum = 0.0, torch.zeros_like(ref_grad)
    for sel in shares:
        scale = (counts(sel) / counts(everything).clamp(min=1)).tolist()
        loss, grad = loss_and_grad(sel, scale)
        loss_sum += loss
        grad_sum += grad
    assert abs(loss_sum - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    torch.testing.assert_close(grad_sum, ref_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Two processes under torchrun (gloo, CPU)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved tiny Llama + word tokenizer folder and pre-tokenized data for the CLI."""
    from test_train import _cli_inputs

    data = (_cycle_texts(24, seed=1), _cycle_texts(4, seed=2))
    _, folder, toks = _cli_inputs(tmp_path_factory.mktemp("dist"), data)
    return folder, toks


def _cli_args(folder, toks, out, *extra: str) -> list[str]:
    return [
        "train-heads", "--model", str(folder), "--tokens", str(toks), "--kind", "resblock",
        "--num-heads", "2", "--layer", "-1", "--seq-len", str(SEQ), "--target", "text",
        "--lr", "3e-2", "--warmup-steps", "2", "--eval-every", "3", "--out", str(out),
        "--no-progress", *extra,
    ]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc -m mtp_ext *args`` on localhost
    (a free port), one CPU thread per process."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), "-m", "mtp_ext", *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)


def _heads_state(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from mtp_ext.heads import WEIGHTS_NAME

    return load_file(str(out / "heads" / WEIGHTS_NAME))


def _log_lines(out) -> list[dict]:
    with open(out / "log.jsonl") as f:
        return [json.loads(x) for x in f]


def _assert_same_run(dist_out, ref_out):
    """Same heads (up to float rounding), one log line per evaluation, same evaluations."""
    ref, got = _heads_state(ref_out), _heads_state(dist_out)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)
    ref_log, log = _log_lines(ref_out), _log_lines(dist_out)
    assert [r["step"] for r in log] == [r["step"] for r in ref_log]
    for a, b in zip(log, ref_log):
        torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)
        assert a["positions"] == b["positions"]
    ref_sum = json.loads((ref_out / "summary.json").read_text())
    got_sum = json.loads((dist_out / "summary.json").read_text())
    assert got_sum["step"] == ref_sum["step"]
    torch.testing.assert_close(got_sum["final"]["loss"], ref_sum["final"]["loss"],
                               rtol=1e-4, atol=1e-5)


def test_two_process_gloo_run_matches_single_process(tiny_folder, tmp_path):
    """Frozen mode, disk cache: exits 0, rank 0 alone writes the log, summary, checkpoint and
    heads, and the heads equal the single-process run's."""
    from mtp_ext import cli

    folder, toks = tiny_folder
    extra = ("--steps", "6", "--batch-positions", "64", "--checkpoint-every", "3")
    ref_out = tmp_path / "ref"
    assert cli.main(_cli_args(folder, toks, ref_out, *extra)) == 0
    out, cache = tmp_path / "dist", tmp_path / "cache"
    proc = _torchrun(_cli_args(folder, toks, out, *extra, "--cache-dir", str(cache)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert sorted(os.listdir(out)) == ["checkpoint", "heads", "log.jsonl", "summary.json"]
    assert sorted(os.listdir(out / "heads")) == sorted(os.listdir(ref_out / "heads"))
    assert len(os.listdir(cache)) == 2  # train and validation caches, built once by rank 0
    assert proc.stdout.count('"step": 6') == 1  # only rank 0 prints the summary
    assert [r["step"] for r in _log_lines(out)] == [3, 6]
    _assert_same_run(out, ref_out)


def test_two_process_joint_run_matches_single_process(tiny_folder, tmp_path):
    """Joint mode (the backbone unfrozen after one step): same heads and, in the checkpoint, the
    same backbone as the single-process run."""
    from mtp_ext import cli

    folder, toks = tiny_folder
    extra = ("--steps", "3", "--joint", "--joint-seqs", "4", "--head-warmup-steps", "1",
             "--backbone-lr", "1e-3", "--checkpoint-every", "3")
    ref_out = tmp_path / "ref"
    assert cli.main(_cli_args(folder, toks, ref_out, *extra)) == 0
    out = tmp_path / "dist"
    proc = _torchrun(_cli_args(folder, toks, out, *extra))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    _assert_same_run(out, ref_out)
    ref_bb = torch.load(ref_out / "checkpoint" / "trainer.pt", weights_only=False)["backbone"]
    got_bb = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["backbone"]
    start = tiny_llama(VOCAB, HIDDEN, 64, LAYERS, 0).state_dict()
    assert any(not torch.equal(ref_bb[k], start[k]) for k in start)  # the backbone did train
    for k in ref_bb:
        torch.testing.assert_close(got_bb[k], ref_bb[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow
def test_two_process_run_resumes_from_rank0_checkpoint(tiny_folder, tmp_path):
    """A 2-process run stopped after 3 steps (checkpoint) and relaunched for 6 ends where the
    uninterrupted single-process 6-step run does (constant schedule: the LR does not depend on
    the total number of steps)."""
    from mtp_ext import cli

    folder, toks = tiny_folder
    common = ("--batch-positions", "64", "--schedule", "constant", "--checkpoint-every", "3")
    ref_out = tmp_path / "ref"
    assert cli.main(_cli_args(folder, toks, ref_out, "--steps", "6", *common)) == 0
    out = tmp_path / "dist"
    first = _torchrun(_cli_args(folder, toks, out, "--steps", "3", *common))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    second = _torchrun(_cli_args(folder, toks, out, "--steps", "6", *common))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert second.stderr.count("resumed from") == 1  # printed by rank 0 only
    assert "at step 3" in second.stderr
    _assert_same_run(out, ref_out)
