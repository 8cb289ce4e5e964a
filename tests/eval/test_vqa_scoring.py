"""Scoring of the `vqa` evaluator on the VLMEvalKit benchmarks (versavit.eval.vqa.metrics, protocol, predictions,
lmms_adapter), without training a model: a multiple-choice question is scored by the option its prediction names
(VLMEvalKit's can_infer), an open one by exact match with any alternative; an oracle scores 1 on every stand-in,
answers shuffled across questions about chance; the predictions file carries the option columns; the lmms-eval
task's `process_results` gives the same scores."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from versavit.data.prepare import SOURCES
from versavit.data.prepare.vlmevalkit import NAMES
from versavit.eval.datasets import open_benchmark
from versavit.eval.vqa import lmms_adapter
from versavit.eval.vqa.data import QAExample
from versavit.eval.vqa.metrics import AnswerPrior, accuracy, exact_match, infer_option, normalize_answer, score
from versavit.eval.vqa.predictions import (
    PREDICTION_COLUMNS,
    option_columns_of,
    prediction_file_name,
    read_predictions,
    write_predictions,
)
from versavit.eval.vqa.protocol import evaluation_questions, prediction_rows, question_scores

OPTIONS = {"A": "red", "B": "blue", "C": "green", "D": "yellow"}


@pytest.mark.parametrize(("prediction", "letter"), [
    ("B", "B"), ("B.", "B"), ("(B) blue", "B"), ("The answer is B", "B"), ("B: blue", "B"), ("[B]", "B"),
    ("blue", "B"), ("Blue.", "B"),  # the option's text alone
    ("A blue one", "A"),  # VLMEvalKit's own quirk: a standalone "A" reads as the letter A
    ("A or B", None), ("B, or maybe C", None),  # two letters
    ("red or blue", None),  # two options' texts
    ("purple", None), ("b", None), ("", None),  # no letter (they are upper case), no option text
    ("the sky is " + "very " * 20 + "blue", None),  # over twice as long as the options: no text match
])
def test_the_option_a_prediction_names(prediction: str, letter: str | None) -> None:
    assert infer_option(prediction, OPTIONS) == letter
    assert score(prediction, "B", OPTIONS) == float(letter == "B")


def test_mcq_and_open_rules() -> None:
    assert normalize_answer("A") == ""  # why letters are not exact-matched: "A" is an article to the VQA rule
    assert score("A", "A", {"A": "cat", "B": "dog"}) == 1.0 and score("B", "A", {"A": "cat", "B": "dog"}) == 0.0
    assert score("A", "A", {"A": "x", "B": None, "C": None}) == 1.0  # absent options (a JSON round trip) ignored
    # open: the answer, or any alternative when the benchmark lists them (OCRBench, MM-Vet)
    assert score("Cylinder.", "cylinder") == 1.0 and score("cube", "cylinder") == 0.0
    assert score("two", "['2', 'two']", None, ["2", "two"]) == 1.0
    assert score("Bar", "['foo', 'Bar']", None, ["foo", "Bar"]) == 1.0
    assert score("baz", "['foo', 'Bar']", None, ["foo", "Bar"]) == 0.0
    assert score("Yes", "Yes") == 1.0 and score("No", "Yes") == 0.0  # HallusionBench
    assert accuracy(["B", "x"], ["B", "x"], [OPTIONS, None], [(), ()]) == 1.0
    assert accuracy(["x"], ["x"]) == exact_match("x", "x") == 1.0  # the synthetic world's rule unchanged
    # the blind guess on an MCQ question picks an option at random: 1 / its number of options
    prior = AnswerPrior()
    prior.update(["red", "red", "blue"], ["color"] * 3)
    assert prior.chance("B", "color", OPTIONS) == 0.25
    assert prior.chance("red", "color") == 1.0 and prior.chance("x", "count", None, ["y", "red"]) == 0.0
    assert prior.accuracy(["B", "red"], ["color", "color"], [OPTIONS, None]) == pytest.approx((0.25 + 1.0) / 2)


def _oracle(q: QAExample, as_text: bool) -> str:
    if q.options:
        return q.options[q.answer] if as_text else f"({q.answer})"
    return (q.answers or (q.answer,))[-1]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[QAExample]]:
    root = tmp_path_factory.mktemp("lmudata")
    settings: Any = SimpleNamespace(qa_kinds=(), max_questions=None)
    out = {}
    for name in NAMES:
        SOURCES[name].write_fixture(root, 0)  # one LMUData folder holding every TSV, as VLMEvalKit keeps them
        out[name] = evaluation_questions(open_benchmark(f"{name}={root}", str(root), with_train=False), settings)
    return out


def test_an_oracle_scores_one_and_shuffled_answers_about_chance(stand_ins: dict[str, list[QAExample]]) -> None:
    everything = [q for qs in stand_ins.values() for q in qs]
    assert len(everything) == 8 * len(NAMES) and any(q.options for q in everything) and any(q.answers for q in
                                                                                           everything)
    for name, questions in stand_ins.items():
        assert [q.index for q in questions] == list(range(len(questions)))
        assert all(q.source_index for q in questions)  # the TSV's own index, for the predictions file
        for as_text in (False, True):
            assert question_scores([_oracle(q, as_text) for q in questions], questions) == [1.0] * len(questions), \
                name
    predictions = [_oracle(q, False) for q in everything]
    shuffled = predictions[1:] + predictions[:1]  # each question gets the next one's right answer
    mcq = [i for i, q in enumerate(everything) if q.options]
    hits = question_scores(shuffled, everything)
    chance = AnswerPrior().accuracy([everything[i].answer for i in mcq], [""] * len(mcq),
                                    [everything[i].options for i in mcq])
    assert 0.2 < chance < 0.4  # 2 to 4 options
    assert np.mean([hits[i] for i in mcq]) < chance + 0.25
    assert np.mean(hits) < 0.5


def test_predictions_file_keeps_vlmevalkits_columns_and_the_options(stand_ins: dict[str, list[QAExample]],
                                                                    tmp_path: Path) -> None:
    questions = stand_ins["mmstar"]
    predictions = [_oracle(q, True) for q in questions]
    path = write_predictions(tmp_path / prediction_file_name("VersaViT-x", "mmstar-VQA"),
                             prediction_rows(questions, predictions), option_columns_of(q.options for q in questions))
    with open(path, encoding="utf-8", newline="") as f:
        header = next(csv.reader(f, delimiter="\t"))
    assert header == ["index", "question", "answer", "category", "A", "B", "C", "D", "prediction"]
    rows = read_predictions(path)
    assert [r["index"] for r in rows] == [q.source_index for q in questions]
    assert all({k: r[k] for k in "ABCD" if r[k]} == q.options for r, q in zip(rows, questions, strict=True))
    # open questions: VLMEvalKit's columns only, the answer as the TSV has it (OCRBench's list literal)
    ocr = stand_ins["ocrbench"]
    path = write_predictions(tmp_path / "ocr.tsv", prediction_rows(ocr, ["x"] * len(ocr)),
                             option_columns_of(q.options for q in ocr))
    rows = read_predictions(path)
    assert tuple(rows[0]) == PREDICTION_COLUMNS and all(r["answer"].startswith("['") for r in rows)


def test_lmms_task_scores_as_the_evaluator(stand_ins: dict[str, list[QAExample]], tmp_path: Path) -> None:
    questions = [q for name in ("mmbench", "mathvista", "ocrbench", "mmvet") for q in stand_ins[name]]
    questions = [dataclasses.replace(q, index=i) for i, q in enumerate(questions)]  # one task: distinct indices
    task = lmms_adapter.write_lmms_task(questions, tmp_path / "task")
    docs = lmms_adapter.read_task_docs(task)
    oracle = [_oracle(q, i % 2 == 0) for i, q in enumerate(questions)]
    shuffled = oracle[2:] + oracle[:2]
    for predictions in (oracle, shuffled):
        lmms = [lmms_adapter.process_results(d, [p])[lmms_adapter.TASK_METRIC]
                for d, p in zip(docs, predictions, strict=True)]
        assert lmms == question_scores(predictions, questions)
    assert np.mean([lmms_adapter.process_results(d, [p])[lmms_adapter.TASK_METRIC]
                    for d, p in zip(docs, oracle, strict=True)]) == 1.0


def test_lmms_tasks_without_lmms_eval_fail_before_any_training(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.vqa.lmms_tasks where lmms-eval is not installed (e.g. an image without the extra): one clear error at
    the start, not after both training stages."""
    import importlib.util

    from eval_helpers import eval_config

    from versavit.eval.vqa.protocol import vqa_eval

    root = tmp_path / "lmudata"
    root.mkdir()
    SOURCES["mmstar"].write_fixture(root, 0)
    bench = open_benchmark(f"mmstar={root}", str(root), with_train=False)
    cfg = eval_config(tmp_path, "eval.vqa={lmms_tasks: [local]}", "tracking.enabled=false")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))

    class NeverLoaded:
        name = "never"

        def load_backbone(self) -> None:
            raise AssertionError("trained although lmms-eval is missing")

    with pytest.raises(RuntimeError, match=r"lmms_tasks.*needs lmms-eval.*make setup"):
        vqa_eval(NeverLoaded(), bench, cfg, device="cpu")  # type: ignore[arg-type]
