"""One real multi-task run (the session's `trained_run`: 2 processes, ZeRO-2, bf16, 40 steps), checked from
every side that needs a trained model: the losses, the export, the registry, the evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from train_helpers import TRAINED_STEPS, read_metrics, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trained_run")]  # one worker trains the run


def test_every_loss_falls(trained_run: Path) -> None:
    metrics = read_metrics(trained_run, "multitask")
    assert sorted(metrics) == list(range(1, TRAINED_STEPS + 1))
    for task in ("caption", "depth", "refseg"):
        first = sum(metrics[s][f"loss/{task}"] for s in range(1, 6)) / 5
        last = sum(metrics[s][f"loss/{task}"] for s in range(TRAINED_STEPS - 4, TRAINED_STEPS + 1)) / 5
        assert last < first, (task, first, last)
    stage = json.loads((trained_run / "stages" / "multitask" / "stage.json").read_text())
    assert stage["steps"] == TRAINED_STEPS and stage["tasks"] == ["caption", "depth", "refseg"]


def test_the_export_loads_with_its_heads(trained_run: Path) -> None:
    from versavit.models.backbone import VisionBackbone
    from versavit.models.multitask import VersaViT

    export = trained_run / "stages" / "multitask" / "export"
    backbone = VisionBackbone.from_pretrained(str(export / "backbone"))
    assert backbone.embed_dim == 32
    model = VersaViT.from_export(str(export), tiny_config(trained_run).model)
    assert set(model.heads) == {"caption", "depth", "refseg"}


def test_the_run_is_tracked_and_its_backbone_registered(trained_run: Path) -> None:
    stage = json.loads((trained_run / "stages" / "multitask" / "stage.json").read_text())
    client = MlflowClient(f"sqlite:///{trained_run}/mlflow.db")
    run = client.get_run(stage["mlflow_run_id"])
    assert {"loss/caption", "loss/depth", "loss/refseg", "lr/backbone", "lr/heads",
            "throughput/depth_samples_per_s"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss/depth")) == TRAINED_STEPS
    assert run.data.tags["versavit.config_hash"] and run.data.tags["versavit.stage"] == "multitask"
    versions = client.search_model_versions("name='tiny-multitask-backbone'")
    assert versions and versions[0].run_id == run.info.run_id


def test_the_trained_export_is_evaluated_with_its_heads(trained_run: Path) -> None:
    """Baseline vs the really trained export: probes for both, zero-shot depth and referring segmentation
    through the export's own heads."""
    from versavit.eval.run import run_eval

    cfg = tiny_config(trained_run, "eval.probe.seg_resolution=56", "eval.probe.depth_resolution=56",
                      "eval.probe.epochs=2", "eval.probe.batch_size=8",
                      "eval.evaluators=[linear-probe, zero-shot-depth, refseg]")
    result = run_eval(cfg)
    trained = result["metrics"]["trained"]["synthetic"]
    for key in ("linear-probe/seg_miou", "linear-probe/depth_rmse", "zero-shot-depth/absrel", "refseg/ciou"):
        assert math.isfinite(trained[key]), key
    assert "zero-shot-depth/absrel" not in result["metrics"]["baseline"]["synthetic"]  # no heads: probes only
    assert (Path(result["out_dir"]) / "comparison.md").is_file()
