"""VQA with the candidate's frozen backbone in an MLLM (paper Table 2): train the two stages, answer the evaluation
split's questions greedily, score exact match; write VLMEvalKit's predictions file and the trained model.

One library call per (backbone, benchmark), `vqa_eval`, returning an EvalResult:

    accuracy     exact match after the VQA normalisation over the evaluation questions (the headline, in %)
    chance       the blind guess's accuracy on the same questions: per question kind, the commonest answer of
                 stage 2's training data (versavit.eval.vqa.metrics.AnswerPrior)
    acc_<kind>   accuracy per question kind (synthetic world: count, color, shape, spatial)
    curves       stage1_loss, stage2_loss (per optimiser step)
    lmms_<task>_<metric>  with `eval.vqa.lmms_tasks`: lmms-eval's scores of the trained MLLM (lmms_adapter)
    artifacts    predictions (the .tsv), model (the saved MLLM folder), backbone_unchanged (the backbone's weights
                 digest equal before and after training), examples (a few images, questions, answers, predictions),
                 prior, settings

Files under `out_dir` (the evaluator's `<report>/vqa`): `<benchmark>-<backbone>/VersaViT-<backbone>_<benchmark>-VQA
.tsv` (versavit.eval.vqa.predictions), `<benchmark>-<backbone>/model/` (versavit.eval.vqa.model: what the lmms-eval
adapter loads) and `vqa-<benchmark>-<backbone>.json` (the result; `load_result` reads it back).

The data of the synthetic benchmark are its own shards: stages 1 and 2 read its train split (captions, QA) unless
`eval.vqa.stage1_data` / `stage2_data` name others, and the questions scored are its evaluation split's `qa`.
Another benchmark needs `"vqa"` among its reader's tasks and its targets' `qa` list ({question, answer, kind});
its training data default to the run's caption-task data (`data.tasks.caption`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from versavit.eval.finetune.common import deterministic
from versavit.eval.results import EvalResult, MetricSpec
from versavit.eval.vqa.data import QAExample, eval_examples
from versavit.eval.vqa.metrics import accuracy, accuracy_by_category
from versavit.eval.vqa.predictions import prediction_file_name, write_predictions
from versavit.eval.vqa.train import VqaSettings, build_vqa_model, predict, train_two_stages

if TYPE_CHECKING:
    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark

log = logging.getLogger(__name__)

EVALUATOR = "vqa"
EXAMPLES = 6  # evaluation questions kept for the report's figure
METRIC_SPECS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec("Accuracy"),
    "chance": MetricSpec("Chance (commonest answer)"),
}


def is_vqa_benchmark(benchmark: Benchmark) -> bool:
    """Whether the benchmark has question/answer pairs: the synthetic world's shards, or a reader with task vqa."""
    from versavit.eval.datasets import SyntheticWorld

    return isinstance(benchmark.eval, SyntheticWorld) or "vqa" in benchmark.tasks


def training_urls(benchmark: Benchmark, cfg: RunConfig, configured: tuple[str, ...] | list[str]) -> list[str]:
    """A stage's data: as configured, else the synthetic benchmark's train split, else the run's caption data."""
    from versavit.data.inputs import task_urls
    from versavit.eval.datasets import SyntheticWorld

    if configured:
        return list(configured)
    if isinstance(benchmark.train, SyntheticWorld):
        return [benchmark.train.url]
    return task_urls(cfg, "caption")


def evaluation_questions(benchmark: Benchmark, settings: VqaSettings) -> list[QAExample]:
    """The evaluation split's questions (of `qa_kinds`; the first `max_questions`), numbered from 0."""
    from versavit.eval.datasets import SyntheticWorld

    kinds, limit = settings.qa_kinds, settings.max_questions
    if isinstance(benchmark.eval, SyntheticWorld):
        return eval_examples([benchmark.eval.url], kinds, limit)
    out: list[QAExample] = []
    for image, target in benchmark.eval:
        for qa in target.get("qa") or []:
            kind = str(qa.get("kind") or "vqa")
            if (kinds and kind not in kinds) or (limit is not None and len(out) >= limit):
                continue
            out.append(QAExample(str(target.get("key", "")), image, qa["question"], qa["answer"], kind, len(out)))
    if not out:
        raise ValueError(f"vqa: benchmark {benchmark.name!r} has no question/answer pairs"
                         + (f" of kinds {list(kinds)}" if kinds else ""))
    return out


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def vqa_eval(candidate: Candidate, benchmark: Benchmark, cfg: RunConfig, device: torch.device | str | None = None,
             out_dir: Path | None = None) -> EvalResult:
    """Train the MLLM on `candidate`'s frozen backbone (stages 1 and 2), score `benchmark`'s questions; with
    `out_dir`, save the model, the predictions (.tsv) and the result (.json). See the module docstring."""
    from versavit import weights
    from versavit.eval.features import backbone_digest

    cfg = weights.resolve(cfg)  # eval.vqa.llm / the caption LLM from weights.url once staged
    if not is_vqa_benchmark(benchmark):
        raise ValueError(f"vqa: benchmark {benchmark.name!r} has no question/answer pairs (tasks: "
                         f"{', '.join(benchmark.tasks) or 'none'}); use the synthetic world")
    settings = VqaSettings.from_config(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stage1_urls = training_urls(benchmark, cfg, settings.stage1_data)
    stage2_urls = training_urls(benchmark, cfg, settings.stage2_data)
    questions = evaluation_questions(benchmark, settings)
    started = time.monotonic()
    result = EvalResult(EVALUATOR, benchmark.name, candidate.name)
    with deterministic(settings.seed, algorithms=device.type == "cpu"):
        model = build_vqa_model(candidate, cfg, settings).to(device)
        model.head.set_gradient_checkpointing(cfg.model.heads.caption.gradient_checkpointing)
        before = backbone_digest(model.backbone)
        model.cache_features(settings.in_memory)
        stage1, stage2, prior = train_two_stages(model, stage1_urls, stage2_urls, settings, label=candidate.name)
        unchanged = backbone_digest(model.backbone) == before
        predictions = predict(model, questions, settings.batch_size)
        model.cache_features(0)
    answers = [q.answer for q in questions]
    categories = [q.category for q in questions]
    acc = accuracy(predictions, answers)
    chance = prior.accuracy(answers, categories)
    result.add("accuracy", acc, METRIC_SPECS["accuracy"])
    result.add("chance", chance, METRIC_SPECS["chance"])
    for cat, value in accuracy_by_category(predictions, answers, categories).items():
        result.add(f"acc_{_safe(cat)}", value, MetricSpec(f"Accuracy ({cat})"))
    result.curves.update({"stage1_loss": stage1, "stage2_loss": stage2})
    shown = questions[:EXAMPLES]
    result.artifacts.update({
        "examples": {"image": [q.image for q in shown], "question": [q.question for q in shown],
                     "answer": [q.answer for q in shown], "prediction": predictions[:EXAMPLES]},
        "backbone_unchanged": unchanged, "prior": prior.as_dict(), "settings": settings.as_dict(),
        "questions": len(questions), "stage1_data": stage1_urls, "stage2_data": stage2_urls,
    })
    result.notes.append(f"{candidate.name}: stage 1 {len(stage1)} steps (final loss {stage1[-1]:.3f}), stage 2 "
                        f"{len(stage2)} steps (final loss {stage2[-1]:.3f}); {len(questions)} questions, accuracy "
                        f"{100 * acc:.1f}% vs chance {100 * chance:.1f}%; backbone weights "
                        f"{'unchanged' if unchanged else 'CHANGED'}")
    if not unchanged:
        log.error("vqa %s: the frozen backbone's weights changed during training", candidate.name)
    if out_dir is not None:
        folder = Path(out_dir) / f"{_safe(benchmark.name)}-{_safe(candidate.name)}"
        rows = [{"index": q.index, "question": q.question, "answer": q.answer, "category": q.category,
                 "prediction": p} for q, p in zip(questions, predictions, strict=True)]
        tsv = write_predictions(folder / prediction_file_name(f"VersaViT-{candidate.name}", f"{benchmark.name}-VQA"),
                                rows)
        saved = model.cpu().save(folder / "model", backbone=candidate.source, benchmark=benchmark.name,
                                 llm=settings.llm)
        result.artifacts.update({"predictions": str(tsv), "model": str(saved)})
    if settings.lmms_tasks:
        lmms_eval_scores(result, model.to(device), questions, benchmark.name, settings,
                         Path(out_dir) / f"{_safe(benchmark.name)}-{_safe(candidate.name)}" if out_dir else None)
    result.elapsed_s = time.monotonic() - started
    log.info("vqa %s on %s: accuracy %.1f%% (chance %.1f%%, %d questions, %.0f s)", candidate.name, benchmark.name,
             100 * acc, 100 * chance, len(questions), result.elapsed_s)
    if out_dir is not None:
        write_result(result, Path(out_dir))
    return result


def lmms_eval_scores(result: EvalResult, model: Any, questions: list[QAExample], benchmark: str,
                     settings: VqaSettings, folder: Path | None) -> dict[str, dict[str, float]]:
    """Score the trained MLLM with lmms-eval on `settings.lmms_tasks` (`local`: `questions` as a local task written
    under `folder`, a temporary one without) and add the scores to `result` as lmms_<task>_<metric>."""
    import tempfile

    from versavit.eval.vqa import lmms_adapter

    with tempfile.TemporaryDirectory(prefix="versavit-lmms-") as tmp:
        tasks: list[str | Path] = []
        for task in settings.lmms_tasks:
            if task == "local":
                tasks.append(lmms_adapter.write_lmms_task(
                    questions, Path(folder or tmp) / "lmms-task", task=f"versavit_{_safe(benchmark)}_vqa",
                    max_new_tokens=settings.max_new_tokens))
            else:
                tasks.append(task)
        was_training = model.training
        raw = lmms_adapter.run_lmms_eval(model, tasks, device=str(next(model.parameters()).device),
                                         batch_size=settings.batch_size)
        model.train(was_training)
    scores = lmms_adapter.task_scores(raw)
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            result.add(f"lmms_{_safe(task)}_{_safe(metric)}", value,
                       MetricSpec(f"lmms-eval {task}: {metric}", scale=1.0, fmt=".3f"))
    result.artifacts["lmms_eval"] = scores
    result.notes.append("lmms-eval: " + "; ".join(f"{t} " + ", ".join(f"{m} {v:.4g}" for m, v in ms.items())
                                                  for t, ms in scores.items()))
    log.info("vqa %s on %s, lmms-eval: %s", result.backbone, benchmark, scores)
    return scores


# ------------------------------------------------------------------------------------------------
# results on disk (the evaluator run as its own job hands its result back through these files)


def result_path(out_dir: Path, benchmark: str, backbone: str) -> Path:
    return Path(out_dir) / f"{EVALUATOR}-{_safe(benchmark)}-{_safe(backbone)}.json"


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """`<out_dir>/vqa-<benchmark>-<backbone>.json` (metrics, curves, notes, artifacts without the images) and
    `.npz` (the figure's example images); returns the JSON's path."""
    path = result_path(out_dir, result.benchmark, result.backbone)
    path.parent.mkdir(parents=True, exist_ok=True)
    examples = dict(result.artifacts.get("examples") or {})
    images = examples.pop("image", [])
    if images:
        np.savez_compressed(path.with_suffix(".npz"), **{f"image_{i}": np.asarray(im) for i, im in enumerate(images)})
    doc: dict[str, Any] = {
        "evaluator": result.evaluator, "benchmark": result.benchmark, "backbone": result.backbone,
        "metrics": {m.name: {"value": m.value, "label": m.spec.label, "higher_is_better": m.spec.higher_is_better,
                             "scale": m.spec.scale, "fmt": m.spec.fmt} for m in result.metrics},
        "curves": result.curves, "notes": result.notes, "elapsed_s": result.elapsed_s,
        "artifacts": {**{k: v for k, v in result.artifacts.items() if k != "examples"}, "examples": examples},
        "images": path.with_suffix(".npz").name if images else None,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)  # a reader never sees half a result
    return path


def load_result(path: Path) -> EvalResult:
    """An EvalResult from what `write_result` wrote (example images included when the .npz is there)."""
    path = Path(path)
    doc = json.loads(path.read_text())
    result = EvalResult(doc["evaluator"], doc["benchmark"], doc["backbone"], curves=doc.get("curves", {}),
                        notes=doc.get("notes", []), elapsed_s=doc.get("elapsed_s", 0.0))
    for name, m in doc["metrics"].items():
        result.add(name, m["value"], MetricSpec(m["label"], m["higher_is_better"], m["scale"], m["fmt"]))
    result.artifacts.update(doc.get("artifacts", {}))
    if doc.get("images") and (path.parent / doc["images"]).is_file():
        with np.load(path.parent / doc["images"]) as z:
            result.artifacts["examples"]["image"] = [z[f"image_{i}"] for i in range(len(z.files))]
    return result


__all__ = ["EVALUATOR", "METRIC_SPECS", "evaluation_questions", "is_vqa_benchmark", "lmms_eval_scores",
           "load_result", "result_path",
           "training_urls", "vqa_eval", "write_result"]
