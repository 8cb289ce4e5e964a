"""End to end: `versavit pipeline run --local` on the tiny config, checked through MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.num_train=24", "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=8",
         "data.synthetic.image_size=112"]


def run_pipeline(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "versavit.cli", "pipeline", "run", "--local", "--config", "configs/tiny.yaml",
         f"workdir={workdir}", *SMALL, *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_local_pipeline_records_parent_and_stage_runs(tmp_path: Path) -> None:
    res = run_pipeline(tmp_path)
    assert res.returncode == 0, res.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("versavit-tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.multitask.optim.lr_backbone"] == "0.0003"
    assert "versavit.config_hash" in parent.data.tags
    stages = {r.data.tags["versavit.stage"]: r for r in runs if r is not parent}
    assert set(stages) == {"data", "data_check"}
    for r in stages.values():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id and r.info.status == "FINISHED"
    data_run, check_run = stages["data"], stages["data_check"]
    assert data_run.data.metrics["data/train_samples"] == 24
    assert check_run.data.tags["versavit.upstream.data"] == data_run.info.run_id
    assert check_run.data.metrics["data_check/train_samples"] == 24
    assert check_run.data.metrics["data_check/val_skipped"] == 0
    inputs = {d.dataset.name: d.dataset for d in client.get_run(data_run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-train", "synthetic-val"}
    assert str(tmp_path) in json.loads(inputs["synthetic-train"].source)["uri"]
    arts = {a.path for a in client.list_artifacts(check_run.info.run_id, "previews")}
    assert "previews/preview-train.png" in arts

    # a rerun reuses the finished data (same settings) instead of rendering it again
    res = run_pipeline(tmp_path)
    assert res.returncode == 0, res.stderr
    assert "reusing the synthetic world" in res.stderr


@pytest.mark.slow
def test_pipeline_survives_a_dead_tracking_server(tmp_path: Path) -> None:
    from conftest import free_port

    res = run_pipeline(tmp_path, f"tracking.uri=http://127.0.0.1:{free_port()}")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("the stage continues") == 1  # warned once, not per call
    assert "could not log" in res.stderr and "not created: tracking server unreachable" in res.stderr
    pending = list((tmp_path / "mlflow-pending").glob("pending-*.jsonl"))
    assert len(pending) == 1 and pending[0].stat().st_size > 0
    assert (tmp_path / "data" / "synthetic" / "train" / "manifest.json").is_file()  # the work is done
