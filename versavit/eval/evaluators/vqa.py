"""VQA with the trained encoder in an MLLM (paper Table 2): the frozen backbone + a fresh projector + an LLM (paper:
Qwen3-8B), the projector trained on captions, then projector + LLM on VQA pairs; greedy answers scored by exact
match (versavit.eval.vqa.protocol has the protocol, versavit.eval.vqa.lmms_adapter runs the trained MLLM under
lmms-eval for the public suites).

A training evaluator: `run` trains in this process; on a cluster it runs as its own job (versavit.eval.jobs) and
hands back what it writes (`write_result` / `load_result`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, register
from versavit.eval.vqa.protocol import METRIC_SPECS, is_vqa_benchmark, vqa_eval
from versavit.eval.vqa.train import VqaSettings, describe_protocol

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark


@register
class VQA(Evaluator):
    name = "vqa"
    title = "VQA with the frozen encoder in an MLLM, projector then projector + LLM trained (paper Table 2)"
    paper_table = "Table 2"
    kind = "training"
    benchmarks_help = "benchmarks with question/answer pairs: synthetic (its QA), the OpenCompass suite as " \
        "VLMEvalKit distributes it (mmbench, mmstar, mmmu, mathvista, hallusionbench, ai2d, ocrbench, mmvet)"
    metric_specs = dict(METRIC_SPECS)

    def applies_to(self, benchmark: Benchmark) -> bool:
        return is_vqa_benchmark(benchmark)

    def columns(self) -> dict[str, MetricSpec]:
        """Accuracy (the headline) and the chance level it must beat."""
        return dict(self.metric_specs)

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        return vqa_eval(candidate, benchmark, self.ctx.cfg, device=self.ctx.device, out_dir=self.ctx.out_dir / "vqa")

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        """The first evaluation images with their question, the answer and every backbone's prediction."""
        from versavit.eval import report

        shown = [r for r in results if (r.artifacts.get("examples") or {}).get("image")]
        if not shown:
            return None
        first = shown[0].artifacts["examples"]
        row = []
        for i, image in enumerate(first["image"]):
            lines = [first["question"][i], f"answer: {first['answer'][i]}"]
            lines += [f"{r.backbone}: {r.artifacts['examples']['prediction'][i]}" for r in shown]
            row.append(("\n".join(lines), image, {}))
        return report._grid([row], path, f"{results[0].benchmark}: VQA, greedy answers of the trained MLLM", cell=3.0)

    def figures(self, results: list[EvalResult], out_dir: Path) -> list[Path]:
        """The answers, and the two stages' training losses of every backbone (same seed and data)."""
        from versavit.eval import report

        files = super().figures(results, out_dir)
        curves = {f"stage {s}": {r.backbone: r.curves[f"stage{s}_loss"] for r in results
                                 if r.curves.get(f"stage{s}_loss")} for s in (1, 2)}
        curves = {k: v for k, v in curves.items() if v}
        if curves:
            files.append(report.curves_figure(out_dir / f"{self.name}_loss_{results[0].benchmark}.png", curves,
                                              f"{results[0].benchmark}: VQA training loss (answer tokens)"))
        return files

    def protocol_note(self) -> str:
        return describe_protocol(VqaSettings.from_config(self.ctx.cfg))

    def settings(self) -> dict[str, Any]:
        return VqaSettings.from_config(self.ctx.cfg).as_dict()
