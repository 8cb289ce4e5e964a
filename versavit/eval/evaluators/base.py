"""What every evaluator is: a protocol module with a typed config and `run(candidate, benchmark) -> EvalResult`.

big_vision's way: one module per protocol, picked by name from the config (`eval.evaluators`), each knowing which
benchmarks it scores and what its numbers mean. The comparison (versavit.eval.run) only loops:

    for evaluator in eval.evaluators:          # registry order: the report's section order
        for candidate in backbones:            # baseline, trained, ...
            for benchmark in evaluator's benchmarks:
                result = evaluator.run(candidate, benchmark)      # -> EvalResult (typed metrics + artifacts)

Metric values are raw (fractions, metres); `Metric.scale` turns them into the units a person reads (%, metres).
MLflow names: `<backbone>/<evaluator>/<benchmark>/<metric>`; the report's column key `<evaluator>/<benchmark>/<metric>`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from versavit.eval.results import EvalResult, Metric, MetricSpec, Skipped

__all__ = ["EVALUATORS", "EvalContext", "EvalResult", "Evaluator", "Metric", "MetricSpec", "Skipped", "register"]

if TYPE_CHECKING:
    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark


@dataclass
class EvalContext:
    """What evaluators share within one comparison: the run's config, the feature cache and the output folder."""

    cfg: RunConfig
    cache: Path  # eval cache (features, targets)
    out_dir: Path  # the report folder; figures under out_dir / "figures"
    device: str | None = None  # None = cuda if available, else cpu


class Evaluator(ABC):
    """A protocol. Subclasses set the class attributes, read their settings from `ctx.cfg.eval`, implement
    `applies_to` and `run`, and may draw a figure."""

    name: ClassVar[str]  # registry key, e.g. "da2k"
    title: ClassVar[str]  # report section title, with the paper table it reproduces
    paper_table: ClassVar[str] = ""  # e.g. "Table 9"
    kind: ClassVar[Literal["inference", "training"]] = "inference"  # training: runs as its own job on a cluster
    benchmarks_help: ClassVar[str] = ""  # which benchmarks it scores (for `versavit eval --list`)
    needs_heads: ClassVar[tuple[str, ...]] = ()  # multi-task heads it uses (from a versavit export)
    metric_specs: ClassVar[dict[str, MetricSpec]] = {}  # the report's columns, in order (others: not shown)

    def __init__(self, ctx: EvalContext) -> None:
        self.ctx = ctx

    @abstractmethod
    def applies_to(self, benchmark: Benchmark) -> bool:
        """Whether this protocol scores `benchmark` (by its tasks or its name)."""

    @abstractmethod
    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        """Score one backbone on one benchmark; raise Skipped when it cannot (a note in the report)."""

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        """One figure of every backbone's results on one benchmark (depth maps, matches, masks), or None."""
        return None

    def figures(self, results: list[EvalResult], out_dir: Path) -> list[Path]:
        """The figures of every backbone's results on one benchmark, written into out_dir (default: `figure`'s
        one, named `<evaluator>_<benchmark>.png`)."""
        if not results:
            return []
        path = self.figure(results, out_dir / f"{self.name}_{results[0].benchmark}.png")
        return [path] if path is not None else []

    def columns(self) -> dict[str, MetricSpec]:
        """The metrics the report shows as columns, in order (default: metric_specs)."""
        return dict(self.metric_specs)

    def protocol_note(self) -> str:
        """One sentence on the protocol as configured, for the report's notes."""
        return ""

    def settings(self) -> dict[str, Any]:
        """The evaluator's effective settings (logged with the results)."""
        return {}


EVALUATORS: dict[str, type[Evaluator]] = {}


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: add an evaluator to the registry under `cls.name`."""
    if cls.name in EVALUATORS and EVALUATORS[cls.name] is not cls:
        raise ValueError(f"evaluator {cls.name!r} registered twice")
    EVALUATORS[cls.name] = cls
    return cls
