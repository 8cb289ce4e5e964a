"""Fine-tuned referring segmentation (paper Table 10): backbone + refseg head + a LoRA-tuned text encoder trained on
the benchmark's train split (the synthetic world's) plus the training sets of `eval.refseg_finetune.train`
(RefCOCO/+/g train, COCO-Stuff: prepared URLs), cIoU and mIoU on the evaluation split (versavit.eval.finetune.refseg
has the protocol).

A training evaluator: `run` fine-tunes in this process; on a cluster the lead's launcher can run `finetune_refseg` as
its own job and hand back what it writes (`write_result` / `load_result`). The RefCOCO family's evaluation splits
(refcoco, refcoco-testA, refcoco-testB, refcoco+, refcocog, ...) have no train split of their own and share the
training sets, so one fine-tune per backbone serves them all: the last fine-tuned model is kept (on the CPU) and
reused while the backbone and the training sets are the same.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from versavit import storage
from versavit.eval.evaluators.base import EvalResult, Evaluator, Skipped, register
from versavit.eval.finetune.refseg import (
    METRIC_SPECS,
    FinetunedRefseg,
    RefsegFinetuneSettings,
    TextEncoderUnavailable,
    describe_protocol,
    score_finetuned,
    train_refseg,
    training_readers,
    write_result,
)
from versavit.eval.refseg import RefSegSkipped

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark
    from versavit.eval.datasets.base import BenchmarkReader
    from versavit.eval.evaluators.base import EvalContext

log = logging.getLogger(__name__)


def open_training_set(url: str) -> BenchmarkReader:
    """A prepared referring-segmentation training set (`versavit data prepare refcoco|coco-stuff|...`): the split
    folder itself (manifest.json) or a root holding `train/`; read as queries by `PreparedRefSeg`, named as its
    manifest (the prepare source: refcoco, coco-stuff, ...)."""
    from versavit.data.shards import read_manifest
    from versavit.eval.datasets.prepared import PreparedRefSeg, is_prepared

    url = url.rstrip("/")
    for split_url in (url, storage.join(url, "train")):
        if is_prepared(split_url):
            parts = [p for p in split_url.split("/") if p]
            folder = parts[-2] if parts[-1] == "train" and len(parts) > 1 else parts[-1]
            return PreparedRefSeg(split_url, (read_manifest(split_url).name or folder).split("/")[0], "train")
    raise storage.StorageError(f"refseg-finetune: no prepared training set at {url} (expected {url}/manifest.json or "
                               f"{url}/train/manifest.json; write it with `versavit data prepare refcoco` or "
                               "`coco-stuff`)", kind="missing")


@register
class RefsegFinetune(Evaluator):
    name = "refseg-finetune"
    title = "Referring segmentation, fine-tuned: backbone + refseg head + LoRA text encoder (paper Table 10)"
    paper_table = "Table 10"
    kind = "training"
    benchmarks_help = "refcoco, refcoco+, refcocog (every evaluation split; training sets from " \
                      "eval.refseg_finetune.train), synthetic (its train split)"
    metric_specs = dict(METRIC_SPECS)

    def __init__(self, ctx: EvalContext) -> None:
        super().__init__(ctx)
        self._train_sets: list[BenchmarkReader] | None = None
        self._trained: tuple[tuple[Any, ...], FinetunedRefseg] | None = None

    def applies_to(self, benchmark: Benchmark) -> bool:
        return "refseg" in benchmark.tasks

    def training_sets(self) -> list[BenchmarkReader]:
        """The readers of `eval.refseg_finetune.train`, opened once."""
        if self._train_sets is None:
            self._train_sets = [open_training_set(url) for url in self.ctx.cfg.eval.refseg_finetune.train]
        return self._train_sets

    def _key(self, candidate: Candidate, benchmark: Benchmark, readers: list[BenchmarkReader]) -> tuple[Any, ...]:
        """What a fine-tune depends on besides the config: the backbone and the training data."""
        return (candidate.name, candidate.source, str(candidate.export),
                tuple((type(r).__name__, r.name, r.split, r.digest()) for r in readers))

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        extra = self.training_sets()
        try:
            readers = training_readers(benchmark, extra)
        except ValueError as exc:
            raise Skipped(str(exc)) from exc
        key = self._key(candidate, benchmark, readers)
        out_dir = self.ctx.out_dir / "finetune"
        if self._trained is not None and self._trained[0] == key:
            run = self._trained[1]
            log.info("refseg-finetune %s: reusing the model fine-tuned on %s for %s", candidate.name,
                     ", ".join(run.train_sets), benchmark.name)
        else:
            self._trained = None  # free the previous model before training the next
            try:
                run = train_refseg(candidate, benchmark, self.ctx.cfg, extra, device=self.ctx.device,
                                   out_dir=out_dir)
            except TextEncoderUnavailable as exc:
                raise Skipped(str(exc)) from exc
        try:
            result = score_finetuned(run, benchmark, device=self.ctx.device)
        except RefSegSkipped as exc:
            raise Skipped(str(exc)) from exc
        finally:
            run.model.to("cpu")  # the next evaluator gets the device back
        self._trained = (key, run)
        write_result(result, out_dir)
        return result

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        from versavit.eval import report

        examples = {f"{r.backbone} fine-tuned": r.artifacts["examples"] for r in results
                    if (r.artifacts.get("examples") or {}).get("pred")}
        if not examples:
            return None
        return report.refseg_figure(path, examples, f"{results[0].benchmark}: referring segmentation, fine-tuned "
                                    "(backbone + head + LoRA text encoder)")

    def figures(self, results: list[EvalResult], out_dir: Path) -> list[Path]:
        """The masks, and the training loss of every backbone (same seed and schedule)."""
        from versavit.eval import report

        files = super().figures(results, out_dir)
        curves = {r.backbone: r.curves["train_loss"] for r in results if r.curves.get("train_loss")}
        if curves:
            files.append(report.curves_figure(out_dir / f"{self.name}_loss_{results[0].benchmark}.png",
                                              {"BCE + Dice loss": curves},
                                              f"{results[0].benchmark}: referring segmentation fine-tune, "
                                              "training loss"))
        return files

    def protocol_note(self) -> str:
        return describe_protocol(RefsegFinetuneSettings.from_config(self.ctx.cfg))

    def settings(self) -> dict[str, Any]:
        return RefsegFinetuneSettings.from_config(self.ctx.cfg).as_dict() | \
            {"train": list(self.ctx.cfg.eval.refseg_finetune.train)}
