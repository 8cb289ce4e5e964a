"""What an evaluation produces: typed metrics and results (versavit.eval.evaluators' protocols return them; the
report, the fan-out's JSON and the fine-tune libraries read them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is: its label in tables, direction, display scale and format."""

    label: str
    higher_is_better: bool = True
    scale: float = 100.0  # raw -> display (fractions -> %); 1 for metres
    fmt: str = ".1f"

    def display(self, value: float) -> float:
        return float(value) * self.scale


@dataclass(frozen=True)
class Metric:
    """One number of one evaluator on one benchmark for one backbone (raw value; `spec` says how to show it)."""

    name: str  # e.g. "seg_miou", "accuracy", "recall@0.10"
    value: float
    spec: MetricSpec

    @property
    def display(self) -> float:
        return self.spec.display(self.value)

    @property
    def finite(self) -> bool:
        return isinstance(self.value, int | float) and math.isfinite(self.value)


@dataclass
class EvalResult:
    """One evaluator's result for one backbone on one benchmark."""

    evaluator: str
    benchmark: str
    backbone: str
    metrics: list[Metric] = field(default_factory=list)
    # what the evaluator's figure draws (images, predictions, matches: in memory) and files it wrote
    artifacts: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)  # e.g. a probe's training loss per step
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def add(self, name: str, value: float, spec: MetricSpec) -> None:
        self.metrics.append(Metric(name, float(value), spec))

    def value(self, name: str) -> float | None:
        return next((m.value for m in self.metrics if m.name == name), None)

    def as_dict(self) -> dict[str, float]:
        """name -> raw value (what comparison.json stores)."""
        return {m.name: m.value for m in self.metrics}

    def to_json(self) -> dict[str, Any]:
        """The result without its artifacts, as JSON: what a fan-out step or an evaluation job hands on
        (`from_json` reads it back)."""
        return {"evaluator": self.evaluator, "benchmark": self.benchmark, "backbone": self.backbone,
                "metrics": [{"name": m.name, "value": m.value, **asdict(m.spec)} for m in self.metrics],
                "curves": self.curves, "notes": self.notes, "elapsed_s": self.elapsed_s}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EvalResult:
        """A result from `to_json`'s JSON (its "artifacts", when present, are taken as they are). Metrics are a
        list of {name, value, label, ...} or, as earlier versions wrote them, a mapping name -> {value, label, ...}."""
        result = cls(doc["evaluator"], doc["benchmark"], doc["backbone"], curves=dict(doc.get("curves") or {}),
                     notes=list(doc.get("notes") or []), elapsed_s=float(doc.get("elapsed_s") or 0.0))
        metrics = doc.get("metrics") or []
        items = [dict(m, name=name) for name, m in metrics.items()] if isinstance(metrics, Mapping) else metrics
        for m in items:
            result.add(m["name"], m["value"], MetricSpec(m["label"], m.get("higher_is_better", True),
                                                         m.get("scale", 100.0), m.get("fmt", ".1f")))
        result.artifacts.update(doc.get("artifacts") or {})
        return result


class Skipped(Exception):
    """An evaluator cannot score this backbone on this benchmark (no heads, no text embedder): a note, not a
    failure of the stage."""


class ReportedEvaluator(Protocol):
    """What the report needs of an evaluator: its name, its section title and its columns."""

    name: str
    title: str

    def columns(self) -> dict[str, MetricSpec]: ...
