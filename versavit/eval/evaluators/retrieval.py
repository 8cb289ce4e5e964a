"""Image-text retrieval (paper Table 11): attention pooling on the ViT + a frozen SigLIP2 text encoder with an MLP,
trained with SigLIP's sigmoid loss on image-caption pairs; recall@k on COCO (Karpathy test) and the synthetic world
(versavit.eval.retrieval has the protocol).

Two variants, each a set of metrics: "projection-only" (the ViT frozen: t2i_r1, ..., the headline column first) and
"backbone-trained" (the ViT trained too: t2i_r1_bb, ...). A training evaluator: `run` trains in this process; each
variant is trained once per backbone and training set and scored on every benchmark of the comparison.
"""

from __future__ import annotations

import logging
import textwrap
from typing import TYPE_CHECKING, Any

from versavit.eval.evaluators.base import EvalContext, EvalResult, Evaluator, MetricSpec, Skipped, register
from versavit.eval.retrieval import (
    METRIC_SPECS,
    VARIANTS,
    RetrievalSettings,
    TextEncoderUnavailable,
    TrainedVariant,
    describe_protocol,
    evaluate_retrieval,
    metric_name,
)

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark

log = logging.getLogger(__name__)


@register
class Retrieval(Evaluator):
    name = "retrieval"
    title = "Image-text retrieval: attention pooling + SigLIP2 text encoder, sigmoid loss (paper Table 11)"
    paper_table = "Table 11"
    kind = "training"
    benchmarks_help = "coco-karpathy (test: 5k images, 25k captions), synthetic (val; trained on its train split " \
                      "unless eval.retrieval.train is set)"
    metric_specs = dict(METRIC_SPECS)

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        # trained variants of the current backbone, reused across benchmarks; dropped when the backbone changes
        self._trained: dict[tuple, TrainedVariant] = {}
        self._backbone: tuple[str, str] | None = None

    def applies_to(self, benchmark: Benchmark) -> bool:
        return benchmark.name == "synthetic" or "retrieval" in benchmark.tasks

    def columns(self) -> dict[str, MetricSpec]:
        """Table 11's columns: R@1 both ways, per configured variant (projection-only's T→I R@1 first)."""
        variants = [v for v in VARIANTS if v in self.ctx.cfg.eval.retrieval.variants]
        names = [metric_name(d, 1, v) for v in variants for d in ("t2i", "i2t")]
        return {n: self.metric_specs[n] for n in names}

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        backbone = (candidate.name, candidate.source)
        if self._backbone != backbone:
            self._trained.clear()  # free the previous backbone's models before training the next
            self._backbone = backbone
        try:
            return evaluate_retrieval(candidate, benchmark, self.ctx.cfg, device=self.ctx.device,
                                      out_dir=self.ctx.out_dir / "retrieval", cache=self._trained)
        except TextEncoderUnavailable as exc:
            raise Skipped(str(exc)) from exc
        except ValueError as exc:
            if "no image-caption pairs to train on" in str(exc):
                raise Skipped(str(exc)) from exc
            raise

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        """Per backbone: the first captions' top retrieved images (projection-only), the true one marked."""
        from versavit.eval import report

        rows: list[list[tuple[str, Any, dict]]] = []
        for r in results:
            shown = (r.artifacts.get("examples") or {})
            variant = next((v for v in VARIANTS if v in shown), None)
            if variant is None:
                continue
            ex = shown[variant]
            for caption, gt, top, hit in zip(ex["caption"], ex["gt"], ex["top"], ex["hit"], strict=True):
                lines = textwrap.wrap(caption, 30)
                text = "\n".join(lines[:3]) + ("..." if len(lines) > 3 else "")
                row = [(f"{r.backbone}:\n{text}", gt, {})]
                row += [(f"#{i + 1}{' (true)' if h else ''}", image, {}) for i, (image, h) in enumerate(zip(top, hit,
                                                                                                          strict=True))]
                rows.append(row)
        if not rows:
            return None
        return report._grid(rows, path, f"{results[0].benchmark}: text → image retrieval (the caption's image, then "
                            "the top retrieved), projection-only", cell=2.2)

    def figures(self, results: list[EvalResult], out_dir: Path) -> list[Path]:
        """The retrieved images, and the training loss of every backbone and variant (same seed and schedule)."""
        from versavit.eval import report

        files = super().figures(results, out_dir)
        curves: dict[str, dict[str, list[float]]] = {}
        for r in results:
            for curve, values in r.curves.items():
                group = "backbone-trained" if curve.endswith("_bb") else "projection-only"
                curves.setdefault(f"{group}: sigmoid loss", {})[r.backbone] = values
        if curves:
            files.append(report.curves_figure(out_dir / f"{self.name}_loss_{results[0].benchmark}.png", curves,
                                              f"{results[0].benchmark}: retrieval training loss", smooth=5))
        return files

    def protocol_note(self) -> str:
        return describe_protocol(RetrievalSettings.from_config(self.ctx.cfg))

    def settings(self) -> dict[str, Any]:
        return RetrievalSettings.from_config(self.ctx.cfg).as_dict()
