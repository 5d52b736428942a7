"""The evaluation harness: every method on every dataset of one model, as records."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import torch

from .head_study import HeadStudyConfig, TrainedHeads, score_heads, train_head_sets
from .marginal import score_exact, score_marginal, score_ntp, scored_positions
from .progress import bar as progress_bar, log
from .samples import DATASETS, Sample, build_samples, load_items, training_windows
from .intervals import with_intervals
from .tally import Tally

__all__ = ["EvalConfig", "evaluate", "quick_config"]


@dataclasses.dataclass
class EvalConfig:
    """What :func:`evaluate` measures (defaults: the full study; :func:`quick_config`: the quick
    mode).

    Attributes:
        datasets: dataset names (see :mod:`mtp_ext.evaluation.samples`).
        split: the split that is scored (heads always train on ``"train"`` and validate on
            ``"validation"``).
        samples: samples per dataset; seq_len: their length in tokens.
        ks: ``k`` values of ``t + 2`` marginalization; ks3: ``k`` per level for ``t + 3``.
        exact_positions: positions per dataset where the exact ``t + 2`` marginal (all ``V``
            intermediate tokens: ``V + 1`` tokens evaluated per position) is computed.
        chunk_nodes: branch tokens per forward pass.
        heads: the heads study, or None to skip it.
        shipped_heads: also score the heads that ship for the model (when there are any).
    """

    datasets: tuple[str, ...] = DATASETS
    split: str = "test"
    samples: int = 16
    seq_len: int = 128
    ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    ks3: tuple[int, ...] = (1, 2, 4)
    exact_positions: int = 0
    chunk_nodes: int = 512
    heads: HeadStudyConfig | None = dataclasses.field(default_factory=HeadStudyConfig)
    shipped_heads: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("datasets must name at least one dataset")
        if any(k < 1 for k in tuple(self.ks) + tuple(self.ks3)):
            raise ValueError(f"every k must be >= 1, got ks={self.ks}, ks3={self.ks3}")
        if self.samples < 1 or self.chunk_nodes < 1 or self.exact_positions < 0:
            raise ValueError("samples and chunk_nodes must be >= 1, exact_positions >= 0")


def quick_config(**over) -> EvalConfig:
    """The quick mode: every method and metric on a few short samples, tiny training runs."""
    heads = HeadStudyConfig(layer_step=10**6, steps=30, batch_positions=128, train_tokens=4096,
                            val_tokens=256, seq_len=64, joint_steps=2, joint_seqs=1)
    base = dict(samples=2, seq_len=64, ks=(1, 2, 4, 8), ks3=(1, 2), exact_positions=0,
                heads=heads)
    base.update(over)
    return EvalConfig(**base)


def _model_label(model) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def _shipped(model) -> TrainedHeads | None:
    from ..heads.shipped import SHIPPED_HEADS, SHIPPED_VARIANTS, load_heads

    name = _model_label(model)
    if name not in SHIPPED_HEADS:
        return None
    # the study scores heads that read one position's hidden state: the conditioned variant
    variant = "conditioned" if "conditioned" in SHIPPED_VARIANTS[name] else None
    heads = load_heads(name, model, variant=variant)
    return TrainedHeads("head_shipped", int(model.config.num_hidden_layers), heads, model)


@torch.inference_mode()
def _score_sample(tally, model, sample: Sample, config: EvalConfig, head_sets, exact: bool):
    want_hidden = any(th.model is model for th in head_sets)
    out = model(sample.ids[None], output_hidden_states=want_hidden, use_cache=False)
    logits = out.logits[0].float()
    score_ntp(tally, sample, logits)
    for th in head_sets:
        if th.model is model:
            score_heads(tally, th, sample, out.hidden_states, logits)
    for th in head_sets:  # joint copies: their own forward, NTP and heads
        if th.model is not model:
            o = th.model(sample.ids[None], output_hidden_states=True, use_cache=False)
            lg = o.logits[0].float()
            score_ntp(tally, sample, lg, method=th.ntp_method or "ntp")
            score_heads(tally, th, sample, o.hidden_states, lg)
    score_marginal(tally, model, sample, logits, tuple(config.ks), tuple(config.ks3),
                   config.chunk_nodes)
    if exact:
        t = scored_positions(sample, 2)
        if t.numel():
            mid = int(t[t.numel() // 2])
            score_exact(tally, model, sample, mid, logits, tuple(config.ks), config.chunk_nodes,
                        progress=config.progress)


def evaluate(
    model,
    tokenizer,
    config: EvalConfig | None = None,
    model_name: str | None = None,
    items_for: Callable[[str, str], Sequence[str]] | None = None,
) -> dict:
    """Measures NTP, marginalization and heads on ``model`` teacher-forced over text samples.

    Args:
        model: a transformers causal LM (eval mode; left unchanged).
        tokenizer: its tokenizer.
        config: an :class:`EvalConfig` (default: the full study).
        model_name: the ``model`` field of the records (default ``model.name_or_path``).
        items_for: ``(dataset, split) -> items`` instead of the project's texts (en-es items are
            ``"English\\tSpanish"``).
    Returns:
        ``{"records": [...], "timing": {...}, "config": {...}}``; each record is
        ``{model, dataset, split, method, k, layer, offset, metric, value, positions,
        model_tokens}`` (see :mod:`mtp_ext.evaluation`).
    """
    config = config or EvalConfig()
    items_for = items_for or load_items
    name = model_name or _model_label(model)
    model.eval()
    timing: dict[str, float] = {}
    head_sets: list[TrainedHeads] = []
    if config.heads is not None:
        hc = config.heads
        t0 = time.perf_counter()
        per = max(hc.seq_len, hc.train_tokens // len(config.datasets))
        train_ids = training_windows(tokenizer, config.datasets, "train", per, hc.seq_len,
                                     config.seed, items_for)
        val_ids = training_windows(tokenizer, config.datasets, "validation",
                                   max(hc.seq_len, hc.val_tokens // len(config.datasets)),
                                   hc.seq_len, config.seed, items_for)
        log(config.progress, f"heads study: {train_ids.numel()} training tokens, {val_ids.numel()} "
                     f"validation tokens")
        head_sets = train_head_sets(model, train_ids, val_ids, hc, config.progress)
        timing["heads_train_s"] = time.perf_counter() - t0
    if config.shipped_heads:
        shipped = _shipped(model)
        if shipped is not None:
            head_sets.append(shipped)
    records: list[dict] = []
    for dataset in config.datasets:
        t0 = time.perf_counter()
        samples = build_samples(tokenizer, dataset, config.split, config.samples, config.seq_len,
                                config.seed, items=items_for(dataset, config.split))
        if not samples:
            raise ValueError(f"no samples of {dataset!r} ({config.split})")
        tally = Tally()
        bar = progress_bar(config.progress, len(samples), f"{name} {dataset}")
        for i, sample in enumerate(samples):
            tally.window = i
            _score_sample(tally, model, sample, config, head_sets, i < config.exact_positions)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        records += with_intervals(tally.records(model=name, dataset=dataset, split=config.split),
                                  seed=config.seed)
        timing[f"{dataset}_s"] = time.perf_counter() - t0
        log(config.progress, f"{name} {dataset}: {len(samples)} samples in {timing[f'{dataset}_s']:.0f} s")
    timing["train_s_per_head_set"] = {f"{th.method}@{th.layer}": round(th.train_s, 1)
                                      for th in head_sets}
    cfg = dataclasses.asdict(config)
    return {"records": records, "timing": timing, "config": cfg, "model": name}
