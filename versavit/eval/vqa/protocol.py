"""VQA with the candidate's frozen backbone in an MLLM (paper Table 2): train the two stages, answer the evaluation
split's questions greedily, score exact match; write VLMEvalKit's predictions file and the trained model.

One library call per (backbone, benchmark), `vqa_eval`, returning an EvalResult:

    accuracy     over the evaluation questions (the headline, in %): an open question by exact match after the VQA
                 normalisation (any alternative answer counts), a multiple-choice one by the option letter the
                 answer names, as VLMEvalKit infers it (versavit.eval.vqa.metrics.score)
    chance       the blind guess's accuracy on the same questions: per question kind, the commonest answer of
                 stage 2's training data; 1 / its number of options on a multiple-choice question
                 (versavit.eval.vqa.metrics.AnswerPrior)
    acc_<kind>   accuracy per question kind (synthetic world: count, color, shape, spatial; a benchmark's
                 categories)
    curves       stage1_loss, stage2_loss (per optimiser step)
    lmms_<task>_<metric>  with `eval.vqa.lmms_tasks`: lmms-eval's scores of the trained MLLM (lmms_adapter)
    artifacts    predictions (the .tsv), model (the saved MLLM folder), backbone_unchanged (the backbone's weights
                 digest equal before and after training), examples (a few images, questions, answers, predictions),
                 prior, settings

Files under `out_dir` (the evaluator's `<report>/vqa`): `<benchmark>-<backbone>/VersaViT-<backbone>_<benchmark>-VQA
.tsv` (versavit.eval.vqa.predictions; a benchmark's own `index`, and its option columns for multiple-choice
questions), `<benchmark>-<backbone>/model/` (versavit.eval.vqa.model: what the lmms-eval
adapter loads) and `vqa-<benchmark>-<backbone>.json` (the result; `load_result` reads it back).

The data of the synthetic benchmark are its own shards: stages 1 and 2 read its train split (captions, QA) unless
`eval.vqa.stage1_data` / `stage2_data` name others, and the questions scored are its evaluation split's `qa`.
Another benchmark needs `"vqa"` among its reader's tasks and its targets' `qa` list ({question, answer, kind,
options?, answers?}: the VLMEvalKit benchmarks, versavit.eval.datasets.vlmevalkit); its training data default to
the run's caption-task data: `data.tasks.caption` when it names URLs, else the caption data of the training
recipe's stages, stage 1 the first stage's (the warm-up: captions and OCR) and stage 2 the last one's (the
multi-task stage: FineVision's conversations), as the paper trains its projector on captions, then on VQA.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from versavit.eval.finetune import common
from versavit.eval.finetune.common import deterministic
from versavit.eval.results import EvalResult, MetricSpec
from versavit.eval.vqa import parallel
from versavit.eval.vqa.data import QAExample, eval_examples
from versavit.eval.vqa.metrics import mean_by_category, scores
from versavit.eval.vqa.predictions import option_columns_of, prediction_file_name, write_predictions
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
    "chance": MetricSpec("Chance (blind guess)"),
}


def is_vqa_benchmark(benchmark: Benchmark) -> bool:
    """Whether the benchmark has question/answer pairs: the synthetic world's shards, or a reader with task vqa."""
    from versavit.eval.datasets import SyntheticWorld

    return isinstance(benchmark.eval, SyntheticWorld) or "vqa" in benchmark.tasks


def training_urls(benchmark: Benchmark, cfg: RunConfig, configured: tuple[str, ...] | list[str],
                  stage: int = 1) -> list[str]:
    """VQA training stage `stage`'s data (1: captions, 2: VQA): as configured, else the synthetic benchmark's
    train split, else the run's caption data (`data.tasks.caption`, else the caption data of the recipe's first
    stage that reads captions for stage 1, of its last one for stage 2)."""
    from versavit.data.inputs import task_urls
    from versavit.eval.datasets import SyntheticWorld

    if configured:
        return list(configured)
    if isinstance(benchmark.train, SyntheticWorld):
        return [benchmark.train.url]
    shared = cfg.data.tasks.get("caption")  # type: ignore[call-overload]
    if cfg.data.source == "synthetic" or (shared is not None and shared.urls):
        return task_urls(cfg, "caption")
    stages = [s.name for s in cfg.train.stages() if "caption" in s.tasks]
    if not stages:
        raise ValueError(f"vqa: no training data for stage {stage}: set eval.vqa.stage{stage}_data, or "
                         "data.tasks.caption, or a training stage with caption data")
    return task_urls(cfg, "caption", stage=stages[0] if stage == 1 else stages[-1])


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
            out.append(QAExample(str(target.get("key", "")), image, qa["question"], str(qa["answer"]), kind,
                                 len(out), options={str(k): str(v) for k, v in (qa.get("options") or {}).items()},
                                 answers=tuple(str(a) for a in qa.get("answers") or ()),
                                 source_index=str(target.get("index", ""))))
    if not out:
        raise ValueError(f"vqa: benchmark {benchmark.name!r} has no question/answer pairs"
                         + (f" of kinds {list(kinds)}" if kinds else ""))
    return out


def question_scores(predictions: list[str], questions: list[QAExample]) -> list[float]:
    """Each question's score (1 or 0) by its own rule: the option named for MCQ, else exact match with any answer
    that counts (versavit.eval.vqa.metrics.score)."""
    return scores(predictions, [q.answer for q in questions], [q.options for q in questions],
                  [q.answers for q in questions])


def prediction_rows(questions: list[QAExample], predictions: list[str]) -> list[dict[str, Any]]:
    """The predictions file's rows (versavit.eval.vqa.predictions): index (the benchmark's own when it has one),
    question, answer, category, an MCQ question's options (columns A, B, ...), prediction."""
    return [{"index": q.prediction_index, "question": q.question, "answer": q.answer, "category": q.category,
             **q.options, "prediction": p} for q, p in zip(questions, predictions, strict=True)]


_safe = common.safe_name


def vqa_eval(candidate: Candidate, benchmark: Benchmark, cfg: RunConfig, device: torch.device | str | None = None,
             out_dir: Path | None = None) -> EvalResult:
    """Train the MLLM on `candidate`'s frozen backbone (stages 1 and 2), score `benchmark`'s questions; with
    `out_dir`, save the model, the predictions (.tsv) and the result (.json). See the module docstring."""
    from versavit import weights
    from versavit.eval.features import backbone_digest

    cfg = weights.resolve(cfg)  # eval.vqa.llm / the caption LLM from weights.url once staged
    if not is_vqa_benchmark(benchmark):
        raise ValueError(f"vqa: benchmark {benchmark.name!r} has no question/answer pairs (tasks: "
                         f"{', '.join(benchmark.tasks) or 'none'}); use the synthetic world or a VQA benchmark "
                         "(mmbench, mmstar, mmmu, mathvista, hallusionbench, ai2d, ocrbench, mmvet)")
    settings = VqaSettings.from_config(cfg)
    if settings.lmms_tasks:  # before hours of training, not after
        import importlib.util

        if importlib.util.find_spec("lmms_eval") is None:
            raise RuntimeError(f"eval.vqa.lmms_tasks {list(settings.lmms_tasks)} needs lmms-eval, which is not "
                               "installed here: install the lock (make setup) or pip install 'versavit[lmms-eval]', "
                               "or set eval.vqa.lmms_tasks=[]")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stage1_urls = training_urls(benchmark, cfg, settings.stage1_data, stage=1)
    stage2_urls = training_urls(benchmark, cfg, settings.stage2_data, stage=2)
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
    par = parallel.current()
    # several processes (ZeRO-2): their replicas must have trained in step (a content digest of each process's
    # trained head, compared; one process is one replica); only the first one writes
    replicas = set(parallel.gather(backbone_digest(model.head), par)) if par.world > 1 else {"one"}
    primary_out = out_dir if par.primary else None
    answers = [q.answer for q in questions]
    categories = [q.category for q in questions]
    hits = question_scores(predictions, questions)
    acc = sum(hits) / len(hits)
    chance = prior.accuracy(answers, categories, [q.options for q in questions], [q.answers for q in questions])
    result.add("accuracy", acc, METRIC_SPECS["accuracy"])
    result.add("chance", chance, METRIC_SPECS["chance"])
    for cat, value in mean_by_category(hits, categories).items():
        result.add(f"acc_{_safe(cat)}", value, MetricSpec(f"Accuracy ({cat})"))
    result.curves.update({"stage1_loss": stage1, "stage2_loss": stage2})
    shown = questions[:EXAMPLES]
    result.artifacts.update({
        "examples": {"image": [q.image for q in shown], "question": [q.question for q in shown],
                     "answer": [q.answer for q in shown], "prediction": predictions[:EXAMPLES]},
        "backbone_unchanged": unchanged, "prior": prior.as_dict(), "settings": settings.as_dict(),
        "questions": len(questions), "stage1_data": stage1_urls, "stage2_data": stage2_urls,
        "processes": par.world, "replicas_identical": len(replicas) == 1,
    })
    result.notes.append(f"{candidate.name}: stage 1 {len(stage1)} steps (final loss {stage1[-1]:.3f}), stage 2 "
                        f"{len(stage2)} steps (final loss {stage2[-1]:.3f}); {len(questions)} questions, accuracy "
                        f"{100 * acc:.1f}% vs chance {100 * chance:.1f}%; backbone weights "
                        f"{'unchanged' if unchanged else 'CHANGED'}")
    if not unchanged:
        log.error("vqa %s: the frozen backbone's weights changed during training", candidate.name)
    if len(replicas) != 1:
        log.error("vqa %s: the %d processes' trained weights differ", candidate.name, par.world)
    if primary_out is not None:
        folder = Path(primary_out) / f"{_safe(benchmark.name)}-{_safe(candidate.name)}"
        name = prediction_file_name(f"VersaViT-{candidate.name}", f"{benchmark.name}-VQA")
        tsv = write_predictions(folder / name, prediction_rows(questions, predictions),
                                option_columns_of(q.options for q in questions))
        saved = model.cpu().save(folder / "model", backbone=candidate.source, benchmark=benchmark.name,
                                 llm=settings.llm)
        result.artifacts.update({"predictions": str(tsv), "model": str(saved)})
    if settings.lmms_tasks:  # every process scores (the same weights), so none waits alone for the others
        lmms_eval_scores(result, model.to(device), questions, benchmark.name, settings,
                         Path(primary_out) / f"{_safe(benchmark.name)}-{_safe(candidate.name)}" if primary_out
                         else None)
    result.elapsed_s = time.monotonic() - started
    log.info("vqa %s on %s: accuracy %.1f%% (chance %.1f%%, %d questions, %.0f s)", candidate.name, benchmark.name,
             100 * acc, 100 * chance, len(questions), result.elapsed_s)
    if primary_out is not None:
        write_result(result, Path(primary_out))
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


# the figure's example images go to the .npz, their texts stay in the JSON
_EXAMPLE_ARRAYS = ("image",)
_EXAMPLE_VALUES = {"question": str, "answer": str, "prediction": str}


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """`<out_dir>/vqa-<benchmark>-<backbone>.json` (metrics, curves, notes, artifacts, the examples' texts) and
    `.npz` (the examples' images); returns the JSON's path (versavit.eval.finetune.common.write_result)."""
    return common.write_result(result, Path(out_dir), arrays=_EXAMPLE_ARRAYS, values=_EXAMPLE_VALUES)


def load_result(path: Path) -> EvalResult:
    """An EvalResult from what `write_result` wrote (example images included when the .npz is there)."""
    return common.load_result(Path(path), arrays=_EXAMPLE_ARRAYS, values=_EXAMPLE_VALUES)


__all__ = ["EVALUATOR", "METRIC_SPECS", "evaluation_questions", "is_vqa_benchmark", "lmms_eval_scores",
           "load_result", "prediction_rows", "question_scores", "result_path",
           "training_urls", "vqa_eval", "write_result"]
