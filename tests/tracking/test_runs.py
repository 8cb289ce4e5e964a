"""tracking.stage_run: the one prologue of every stage (nested under the parent, lineage tags, FAILED on error)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from versavit.config import RunConfig, config_hash
from versavit.tracking import KFP_RUN_ENV, PARENT_RUN_ENV, Tracker, stage_run, tracking_uri


def test_stage_run_nests_tags_and_marks_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig(name="exp", workdir=str(tmp_path))
    uri = tracking_uri(cfg)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    parent_tracker = Tracker(uri, cfg.tracking.experiment)
    parent = parent_tracker.start_pipeline_run("exp")
    parent_id = parent_tracker.run_id(parent)
    parent_tracker.close()
    monkeypatch.setenv(PARENT_RUN_ENV, parent_id)
    monkeypatch.setenv(KFP_RUN_ENV, "kfp-123")

    with stage_run(cfg, "data", tags={"extra": "1"}) as (tracker, run):
        tracker.log_metrics(run, {"data/rendered": 3}, step=0)
    with pytest.raises(RuntimeError, match="boom"), stage_run(cfg, "label"):
        raise RuntimeError("boom")

    client = MlflowClient(uri)
    runs = {r.data.tags.get("versavit.stage"): r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])}
    data, label = runs["data"], runs["label"]
    assert data.info.status == "FINISHED" and label.info.status == "FAILED"
    for r in (data, label):
        assert r.data.tags["mlflow.parentRunId"] == parent_id
        assert r.data.tags["versavit.config_hash"] == config_hash(cfg)
        assert r.data.tags["versavit.kfp_run_id"] == "kfp-123"
    assert data.data.tags["extra"] == "1"
    assert data.data.metrics["data/rendered"] == 3
