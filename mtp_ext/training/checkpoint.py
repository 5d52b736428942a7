"""Training checkpoints (``out_dir/checkpoint``): the heads via ``save_pretrained`` plus
``trainer.pt`` with the step, the optimizer, the schedule, the sampling generator, the loss
history and, in joint mode, the backbone; everything a resumed run needs to continue exactly as
the uninterrupted run would. Each is written to a ``.tmp`` folder first, then renamed over the
previous one."""

from __future__ import annotations

import os
import shutil

import torch

from ..heads import WEIGHTS_NAME, MTPHeads


def save_checkpoint(dirpath: str, heads: MTPHeads, optimizer, scheduler, step: int,
                    gen: torch.Generator, history: dict, model=None) -> None:
    """Writes the checkpoint folder ``dirpath`` (replacing any previous one); ``model`` (joint
    mode) adds the backbone's state on the CPU."""
    tmp = dirpath + ".tmp"
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
    torch.save(state, os.path.join(tmp, "trainer.pt"))
    if os.path.isdir(dirpath):
        shutil.rmtree(dirpath)
    os.replace(tmp, dirpath)


def load_checkpoint(dirpath: str, heads: MTPHeads, optimizer, scheduler, gen: torch.Generator,
                    model=None) -> tuple[int, dict]:
    """Restores what :func:`save_checkpoint` wrote into ``heads``, ``optimizer``, ``scheduler``,
    ``gen`` (and ``model`` when given and saved); returns ``(step, history)``."""
    from safetensors.torch import load_file

    state = load_file(os.path.join(dirpath, WEIGHTS_NAME), device=str(heads.lm_head_weight.device))
    heads.load_state_dict(state, strict=True)
    tr = torch.load(os.path.join(dirpath, "trainer.pt"), map_location="cpu", weights_only=False)
    if model is not None and "backbone" in tr:
        model.load_state_dict(tr["backbone"])
    optimizer.load_state_dict(tr["optimizer"])
    scheduler.load_state_dict(tr["scheduler"])
    gen.set_state(tr["generator"])
    return int(tr["step"]), tr.get("history", {})
