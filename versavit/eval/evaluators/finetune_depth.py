"""Fine-tuned metric depth (paper Table 9, "fine-tuned"): backbone + DPT head trained on each depth benchmark's train
split, AbsRel and δ1 in metres on its evaluation split (versavit.eval.finetune.depth has the protocol).

A training evaluator: `run` fine-tunes in this process; on a cluster the lead's launcher can run
`finetune_depth` as its own job and hand back what it writes (`write_result` / `load_result`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, register
from versavit.eval.finetune.depth import METRIC_SPECS, FinetuneSettings, describe_protocol, finetune_depth

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark


@register
class FinetuneDepth(Evaluator):
    name = "finetune-depth"
    title = "Fine-tuned metric depth, backbone + DPT head (paper Table 9)"
    paper_table = "Table 9"
    kind = "training"
    benchmarks_help = "depth benchmarks with a train split (nyu, kitti, synthetic)"
    metric_specs = dict(METRIC_SPECS)

    def applies_to(self, benchmark: Benchmark) -> bool:
        return "depth" in benchmark.tasks and benchmark.train is not None

    def columns(self) -> dict[str, MetricSpec]:
        """Table 9's columns: AbsRel and δ1 (RMSE is kept in the results, not shown)."""
        return {k: self.metric_specs[k] for k in ("absrel", "delta1")}

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        return finetune_depth(candidate, benchmark, self.ctx.cfg, device=self.ctx.device,
                              out_dir=self.ctx.out_dir / "finetune")

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        from versavit.eval import report

        shown = [r for r in results if (r.artifacts.get("examples") or {}).get("pred")]
        if not shown:
            return None
        first = shown[0].artifacts["examples"]
        return report.depth_figure(path, first["image"], first["gt"], first["valid"],
                                   {f"{r.backbone} fine-tuned": r.artifacts["examples"]["pred"] for r in shown},
                                   f"{results[0].benchmark}: fine-tuned metric depth (backbone + DPT head)")

    def figures(self, results: list[EvalResult], out_dir: Path) -> list[Path]:
        """The depth maps, and the training loss of every backbone (same seed and schedule)."""
        from versavit.eval import report

        files = super().figures(results, out_dir)
        curves = {r.backbone: r.curves["train_loss"] for r in results if r.curves.get("train_loss")}
        if curves:
            files.append(report.curves_figure(out_dir / f"{self.name}_loss_{results[0].benchmark}.png",
                                              {"SiLog loss": curves},
                                              f"{results[0].benchmark}: fine-tuned depth, training loss"))
        return files

    def protocol_note(self) -> str:
        return describe_protocol(FinetuneSettings.from_config(self.ctx.cfg))

    def settings(self) -> dict[str, Any]:
        return FinetuneSettings.from_config(self.ctx.cfg).as_dict()
