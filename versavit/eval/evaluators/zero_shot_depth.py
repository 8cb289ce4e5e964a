"""Zero-shot relative depth with the multi-task export's own DPT head (paper Table 9; versavit.eval.zeroshot):
per-image scale-and-shift alignment in the head's space, AbsRel and δ1 in metres."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from versavit.eval.candidates import load_multitask
from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, Skipped, register
from versavit.eval.zeroshot import evaluate_zeroshot_depth

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark


def depth_space(candidate: Candidate, model: Any) -> str:
    """The space the export's depth head was trained in (depth or disparity): recorded by the export if it says so,
    else the head's own setting."""
    assert candidate.export is not None
    meta = json.loads((candidate.export / "versavit.json").read_text())
    return meta.get("depth_target") or (meta.get("heads_config") or {}).get("depth", {}).get("target") \
        or model.heads["depth"].target


@register
class ZeroShotDepth(Evaluator):
    name = "zero-shot-depth"
    title = "Zero-shot relative depth, multi-task DPT head (paper Table 9)"
    paper_table = "Table 9"
    needs_heads = ("depth",)
    benchmarks_help = "depth benchmarks (nyu, kitti, synthetic); needs an export with a depth head"
    metric_specs = {
        "absrel": MetricSpec("AbsRel", higher_is_better=False),
        "delta1": MetricSpec("δ1"),
        "rmse": MetricSpec("RMSE", higher_is_better=False, scale=1.0, fmt=".3f"),
    }

    def applies_to(self, benchmark: Benchmark) -> bool:
        return "depth" in benchmark.tasks

    def columns(self) -> dict[str, MetricSpec]:
        return {k: self.metric_specs[k] for k in ("absrel", "delta1")}

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        if "depth" not in candidate.heads:
            raise Skipped(f"{candidate.name} has no depth head (not a multi-task export with one)")
        cfg = self.ctx.cfg
        model = load_multitask(candidate, cfg, ["depth"])
        z = evaluate_zeroshot_depth(model, benchmark.eval, cfg.train.resolution.depth, depth_space(candidate, model),
                                    batch_size=cfg.eval.probe.batch_size, device=self.ctx.device,
                                    label=candidate.name)
        result = EvalResult(self.name, benchmark.name, candidate.name)
        for k in ("absrel", "delta1", "rmse"):
            result.add(k, z["metrics"][k], self.metric_specs[k])
        result.artifacts["examples"] = z["examples"]
        return result

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        from versavit.eval import report

        shown = [r for r in results if r.artifacts.get("examples")]
        if not shown:
            return None
        first = shown[0].artifacts["examples"]
        return report.depth_figure(path, first["image"], first["gt"], first["valid"],
                                   {f"{r.backbone} zero-shot": r.artifacts["examples"]["pred"] for r in shown},
                                   f"{results[0].benchmark}: zero-shot depth (multi-task DPT head)")

    def protocol_note(self) -> str:
        return (f"Zero-shot depth: the export's DPT head at {self.ctx.cfg.train.resolution.depth} px, per-image "
                "least-squares scale and shift in the head's space, AbsRel and δ1 at label size.")

