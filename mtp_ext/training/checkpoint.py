"""Training checkpoints (``out_dir/checkpoint``): the heads via ``save_pretrained`` plus
``trainer.pt`` with the step, the optimizer, the schedule, the sampling generator, the loss
history and, in joint mode, the backbone; everything a resumed run needs to continue exactly as
the uninterrupted run would.

``trainer.pt`` holds tensors and plain containers only and is read with ``weights_only=True``:
a file that holds anything else is refused, never run.

One complete checkpoint exists at every moment: a new one is written into a temporary folder
(``checkpoint.tmp-<unique>``), the previous one is renamed to ``checkpoint.old``, the new one is
renamed into place, then ``checkpoint.old`` is deleted. A run killed between the two renames
leaves ``checkpoint.old`` alone, and :func:`find_checkpoint` resumes from it.

A checkpoint resumes only into heads of the same configuration and the same mode (frozen or
joint); :func:`load_checkpoint` names what differs otherwise."""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil
import uuid

import torch

from ..heads import CONFIG_NAME, WEIGHTS_NAME, MTPHeads

TRAINER_NAME = "trainer.pt"
OLD_SUFFIX = ".old"
TMP_SUFFIX = ".tmp"
_REQUIRED = {"step": int, "optimizer": dict, "scheduler": dict, "generator": torch.Tensor}


def _start_fresh(dirpath: str) -> str:
    return (f"to start fresh, choose another --out folder (out_dir) or delete {dirpath}; "
            "--no-resume (resume=False) starts from step 0 and replaces it at the first "
            "checkpoint")


def save_checkpoint(dirpath: str, heads: MTPHeads, optimizer, scheduler, step: int,
                    gen: torch.Generator, history: dict, model=None) -> None:
    """Writes the checkpoint folder ``dirpath``, replacing any previous one by renames (see the
    module docstring); ``model`` (joint mode) adds the backbone's state on the CPU."""
    old = dirpath + OLD_SUFFIX
    for stale in glob.glob(glob.escape(dirpath + TMP_SUFFIX) + "*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = f"{dirpath}{TMP_SUFFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    heads.save_pretrained(tmp)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "generator": gen.get_state(),
        "history": history,
    }
    if model is not None:
        state["backbone"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(tmp, TRAINER_NAME))
    if os.path.isdir(dirpath):
        if os.path.isdir(old):  # dirpath is complete: the older copy is not needed
            shutil.rmtree(old)
        os.rename(dirpath, old)
    os.rename(tmp, dirpath)
    if os.path.isdir(old):
        shutil.rmtree(old)


def find_checkpoint(dirpath: str) -> str | None:
    """The folder to resume from: ``dirpath`` when it holds a checkpoint, else
    ``dirpath + ".old"`` when a run was killed while replacing it, else None."""
    for folder in (dirpath, dirpath + OLD_SUFFIX):
        if os.path.isfile(os.path.join(folder, TRAINER_NAME)):
            return folder
    return None


def _read_trainer_state(dirpath: str) -> dict:
    """``trainer.pt`` of ``dirpath``, loaded with ``weights_only=True`` and checked for the
    entries a resume needs; ValueError naming the file otherwise."""
    path = os.path.join(dirpath, TRAINER_NAME)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        detail = f" (it refers to {found.group(1)})" if found else ""
        raise ValueError(
            f"{path} was not loaded: it holds objects other than tensors and plain "
            f"containers{detail}, which train-heads never writes; {_start_fresh(dirpath)}"
        ) from None
    except Exception as exc:  # noqa: BLE001  (truncated or not a torch file: any reader error)
        raise ValueError(f"{path} cannot be read ({exc}); {_start_fresh(dirpath)}") from exc
    missing = [k for k, kind in _REQUIRED.items()
               if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if missing:
        raise ValueError(
            f"{path} is not a train-heads checkpoint (no valid {', '.join(missing)}); "
            f"{_start_fresh(dirpath)}"
        )
    return state


def _check_same_run(dirpath: str, heads: MTPHeads, joint: bool, state: dict) -> None:
    """ValueError naming every difference between the checkpoint's heads configuration and mode
    and this run's."""
    with open(os.path.join(dirpath, CONFIG_NAME)) as f:
        saved = json.load(f)
    wanted = heads.config.to_dict()
    diffs = [f"{k}: saved {saved.get(k)!r}, requested {v!r}"
             for k, v in wanted.items() if saved.get(k) != v]
    saved_joint = "backbone" in state
    if saved_joint != joint:
        diffs.append(f"joint: saved {saved_joint!r}, requested {joint!r}")
    if diffs:
        raise ValueError(
            f"the checkpoint in {dirpath} was written for other heads or another mode than this "
            f"run asks for ({'; '.join(diffs)}); {_start_fresh(dirpath)}"
        )


def load_checkpoint(dirpath: str, heads: MTPHeads, optimizer, scheduler, gen: torch.Generator,
                    model=None) -> tuple[int, dict]:
    """Restores what :func:`save_checkpoint` wrote into ``heads``, ``optimizer``, ``scheduler``,
    ``gen`` (and ``model``, joint mode); returns ``(step, history)``. Raises ValueError, before
    changing anything, when the trainer file is not plain data or the checkpoint was written
    for other heads or the other mode."""
    from safetensors.torch import load_file

    state = _read_trainer_state(dirpath)
    _check_same_run(dirpath, heads, model is not None, state)
    device = str(heads.lm_head_weight.device)
    weights = load_file(os.path.join(dirpath, WEIGHTS_NAME), device=device)
    heads.load_state_dict(weights, strict=True)
    if model is not None:
        model.load_state_dict(state["backbone"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    return int(state["step"]), state.get("history", {})
