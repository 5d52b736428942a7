"""Evaluation harness re-measuring the findings of "On multi-token prediction for efficient LLM
inference" (Mehra, Alonso Garcia, Mauch, 2025) on any transformers causal LM (CLI ``mtp-ext eval``).

Teacher-forced over text samples (:mod:`.samples`), for every scored position:

- NTP: the model's own next-token prediction (:func:`.marginal.score_ntp`);
- numerical marginalization for ``t + 2`` with ``k`` intermediate tokens, with and without
  renormalization, the exact marginal on a small slice, and ``t + 3`` through paths of two
  intermediate tokens (:mod:`.marginal`), all branches of a window in few forward passes with a
  tree attention mask (:mod:`.branches`);
- heads on a frozen backbone at a grid of layers, WHS, and joint training variants
  (:mod:`.head_study`), plus the heads that ship for the model.

Each result is a record ``{model, dataset, split, method, k, layer, offset, metric, value,
positions, model_tokens, windows}`` (``windows``: ``[sum, count]`` per text window), with ``lo``
and ``hi``, its 95% interval from a bootstrap over windows (:mod:`.intervals`), where two or more
windows scored it. :mod:`.claims` judges the paper's claims from paired differences of records by
a stated rule; :mod:`.report` writes records and verdicts as JSON, markdown tables and PNG
figures with error bars.
"""

from .head_study import HeadStudyConfig
from .report import write_report
from .samples import DATASETS, Sample, build_samples
from .study import EvalConfig, evaluate, quick_config

__all__ = ["EvalConfig", "HeadStudyConfig", "evaluate", "quick_config", "write_report",
           "DATASETS", "Sample", "build_samples"]
