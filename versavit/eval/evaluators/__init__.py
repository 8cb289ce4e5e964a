"""The evaluation protocols, one module each (big_vision's evaluators), picked by name from `eval.evaluators`.

    linear-probe      frozen features, linear heads: segmentation mIoU, depth RMSE (Tables 3, 14)
    zero-shot-depth   the multi-task DPT head on depth benchmarks: AbsRel, delta1 (Table 9)
    da2k              the multi-task DPT head on annotated point pairs: accuracy (Table 9)
    refseg            the multi-task referring-segmentation head, zero-shot: cIoU (Table 10's setting, no fine-tune)
    finetune-depth    backbone + DPT head fine-tuned on the benchmark: AbsRel, delta1 (Table 9)      [training]
    refseg-finetune   backbone + refseg head + LoRA text encoder fine-tuned: cIoU (Table 10)         [training]
    correspondence    Probe3D: final-layer features, nearest neighbours, keypoint recall (Table 8)

Modules are imported on first use (`get`), so the registry costs nothing until an evaluation runs.
"""

from __future__ import annotations

import importlib

from versavit.config.schema import EVALUATOR_NAMES
from versavit.eval.evaluators.base import (
    EVALUATORS,
    EvalContext,
    EvalResult,
    Evaluator,
    Metric,
    MetricSpec,
    Skipped,
    register,
)

MODULES: dict[str, str] = {
    "linear-probe": "linear_probe",
    "zero-shot-depth": "zero_shot_depth",
    "da2k": "da2k",
    "refseg": "refseg",
    "finetune-depth": "finetune_depth",
    "refseg-finetune": "refseg_finetune",
    "correspondence": "correspondence",
    "vqa": "vqa",
    "retrieval": "retrieval",
}
assert tuple(MODULES) == EVALUATOR_NAMES, "the config's evaluator names and the registry must agree"

__all__ = ["EVALUATORS", "MODULES", "EvalContext", "EvalResult", "Evaluator", "Metric", "MetricSpec", "Skipped",
           "all_evaluators", "get", "register"]


def get(name: str) -> type[Evaluator]:
    """The evaluator class registered as `name` (its module imported on first use)."""
    if name not in MODULES:
        raise KeyError(f"unknown evaluator {name!r}; valid: {', '.join(MODULES)}")
    if name not in EVALUATORS:
        importlib.import_module(f"versavit.eval.evaluators.{MODULES[name]}")
    return EVALUATORS[name]


def all_evaluators() -> dict[str, type[Evaluator]]:
    """Every evaluator, in report order."""
    return {name: get(name) for name in MODULES}
