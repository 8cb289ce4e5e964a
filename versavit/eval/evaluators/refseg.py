"""Referring segmentation with the multi-task export's own head, no fine-tuning (versavit.eval.refseg): cIoU and
mIoU over every (image, expression) query, on each evaluation split (RefCOCO val / testA / testB). Paper Table 10
fine-tunes first: that protocol is `refseg-finetune`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from versavit.eval.candidates import load_multitask
from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, Skipped, register
from versavit.eval.refseg import RefSegSkipped, evaluate_refseg

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark


def text_embedder(cfg: RunConfig, benchmark: Benchmark) -> Callable[[list[str]], np.ndarray] | None:
    """The run's text embedder for benchmarks without precomputed embeddings (RefCOCO), loaded on first use;
    None for the synthetic world (emb.npy or nothing: the head was trained on exactly those embeddings)."""
    if benchmark.name == "synthetic":
        return None
    state: dict[str, Any] = {}

    def embed(sentences: list[str]) -> np.ndarray:
        if "model" not in state:
            from versavit.labeling.embed import TextEmbedder

            try:
                state["model"] = TextEmbedder(cfg.labeling.teachers.embedder, device=cfg.labeling.device)
            except Exception as exc:  # no weights on this machine: a skipped benchmark, not a failed stage
                raise RefSegSkipped(f"embedder {cfg.labeling.teachers.embedder} cannot be loaded ({exc})") from exc
        return state["model"].encode(sentences)

    return embed


@register
class RefSeg(Evaluator):
    name = "refseg"
    title = "Referring segmentation, multi-task head without fine-tuning"
    paper_table = "Table 10 (zero-shot)"
    needs_heads = ("refseg",)
    benchmarks_help = "refcoco, refcoco+, refcocog (every evaluation split), synthetic; needs an export with a " \
                      "refseg head"
    metric_specs = {"ciou": MetricSpec("cIoU"), "miou": MetricSpec("mIoU")}

    def applies_to(self, benchmark: Benchmark) -> bool:
        return "refseg" in benchmark.tasks

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        if "refseg" not in candidate.heads:
            raise Skipped(f"{candidate.name} has no referring-segmentation head (not a multi-task export with one)")
        cfg = self.ctx.cfg
        model = load_multitask(candidate, cfg, ["refseg"])
        try:
            r = evaluate_refseg(model, benchmark.eval, cfg.train.resolution.refseg, text_embedder(cfg, benchmark),
                                device=self.ctx.device, label=candidate.name)
        except RefSegSkipped as exc:
            raise Skipped(str(exc)) from exc
        result = EvalResult(self.name, benchmark.name, candidate.name)
        result.add("ciou", r["metrics"]["ciou"], self.metric_specs["ciou"])
        result.add("miou", r["metrics"]["miou"], self.metric_specs["miou"])
        result.artifacts["examples"] = r["examples"]
        return result

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        from versavit.eval import report

        examples = {r.backbone: r.artifacts["examples"] for r in results if r.artifacts.get("examples")}
        if not examples:
            return None
        return report.refseg_figure(path, examples, f"{results[0].benchmark}: referring segmentation (multi-task "
                                    "head)")

    def protocol_note(self) -> str:
        return (f"Referring segmentation: the export's head at {self.ctx.cfg.train.resolution.refseg} px, no "
                "fine-tuning; cIoU = cumulative intersection / union over all queries.")
