"""Progress reporting of head training: the bars (or lines) on stderr and the JSON log
(``log.jsonl``, one line per evaluation)."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

from .config import TrainConfig


def token_progress(total: int, desc: str, enabled: bool) -> Callable[[int], None]:
    """A callable advancing a bar over ``total`` tokens (tqdm when installed and ``enabled``,
    otherwise a no-op); the bar closes when it reaches ``total``."""
    if not enabled:
        return lambda n: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return lambda n: None
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


class StepProgress:
    """Training steps: tqdm when installed, otherwise a line every ``log_every`` steps; nothing
    without ``config.progress``."""

    def __init__(self, total: int, initial: int, config: TrainConfig):
        self.config = config
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = initial
        if not config.progress:
            return
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train-heads")
        except ImportError:
            self.bar = None

    def update(self, step: int, info: dict[str, float]) -> None:
        """Step ``step`` is done; ``info`` (the step's losses) goes in the postfix or line."""
        if not self.config.progress:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in info.items()})
        elif step % max(1, self.config.log_every) == 0 or step == self.config.steps:
            dt = time.perf_counter() - self.t0
            rate = (step - self.start) / dt if dt > 0 else 0.0
            items = " ".join(f"{k}={v:.4g}" for k, v in info.items())
            print(f"train-heads step {step}/{self.config.steps} {items} ({rate:.2f} steps/s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_record(step: int, res: dict, extra: dict | None = None) -> dict:
    """The JSON log's record of an evaluation: ``step``, wall-clock ``time``, then ``res`` (and
    ``extra``)."""
    rec = {"step": step, "time": time.time()}
    rec.update(res)
    if extra:
        rec.update(extra)
    return rec


def append_log(config: TrainConfig, record: dict) -> None:
    """Appends ``record`` as one JSON line to ``out_dir/log.jsonl`` (nothing without
    ``out_dir``)."""
    if config.out_dir:
        os.makedirs(config.out_dir, exist_ok=True)
        with open(os.path.join(config.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
