"""EvalResult's JSON form (versavit/eval/results.py): what fan-out steps and evaluation jobs hand on."""

from __future__ import annotations

import json

import pytest

from versavit.eval.results import EvalResult, MetricSpec


def _result() -> EvalResult:
    result = EvalResult("vqa", "mmstar", "trained", curves={"stage1_loss": [2.0, 1.5]}, notes=["n"], elapsed_s=3.5)
    result.add("accuracy", 0.625, MetricSpec("Accuracy"))
    result.add("rmse", 0.41, MetricSpec("RMSE", higher_is_better=False, scale=1.0, fmt=".3f"))
    return result


def test_json_round_trip_keeps_metric_order_specs_curves_and_notes() -> None:
    result = _result()
    back = EvalResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back.metrics == result.metrics  # same names, values and specs, in order
    assert (back.curves, back.notes, back.elapsed_s) == (result.curves, result.notes, 3.5)
    assert (back.evaluator, back.benchmark, back.backbone) == ("vqa", "mmstar", "trained")
    assert "artifacts" not in result.to_json()


def test_from_json_reads_the_earlier_mapping_form_and_artifacts() -> None:
    doc = {"evaluator": "finetune-depth", "benchmark": "nyu", "backbone": "base",
           "metrics": {"absrel": {"value": 0.2, "label": "AbsRel", "higher_is_better": False, "scale": 1.0,
                                  "fmt": ".3f"}},
           "artifacts": {"head": "fresh"}}
    back = EvalResult.from_json(doc)
    assert back.value("absrel") == pytest.approx(0.2) and back.metrics[0].spec.higher_is_better is False
    assert back.artifacts == {"head": "fresh"} and back.curves == {} and back.elapsed_s == 0.0
