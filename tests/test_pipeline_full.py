"""End to end: the whole KFP pipeline with the local runner on a shrunk tiny config, checked in MLflow.

The run is the session's `local_pipeline` (tests/pipeline_run.py: `versavit pipeline run --local` in a subprocess,
as a user runs it, once per session), which other end-to-end tests read too.
"""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from pipeline_run import PipelineRun


@pytest.mark.slow
@pytest.mark.xdist_group("local_pipeline")  # one worker builds the session's pipeline run (make test: xdist)
def test_whole_local_pipeline_tracks_every_stage(local_pipeline: PipelineRun) -> None:
    res, workdir = local_pipeline, local_pipeline.workdir
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Linear probes" in res.stderr and "mlflow ui --backend-store-uri" in res.stderr

    client = MlflowClient(res.tracking_uri)
    exp = client.get_experiment_by_name("versavit-tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"  # closed by the KFP exit handler
    assert parent.data.tags.get("versavit.kfp_run_id")
    children = {r.data.tags["versavit.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert {"data", "data_check", "label", "warmup", "multitask", "eval"} <= set(children)
    for r in children.values():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.info.status == "FINISHED"
    multitask = children["multitask"]
    for task in ("caption", "depth", "refseg"):
        history = client.get_metric_history(multitask.info.run_id, f"loss/{task}")
        assert len(history) == 6
    evaluation = children["eval"].data.metrics
    for key in ("linear-probe/synthetic/seg_miou", "linear-probe/synthetic/depth_rmse",
                "refseg/synthetic/ciou", "da2k/synthetic/accuracy"):
        assert f"trained/{key}" in evaluation, sorted(evaluation)
    report = json.loads((workdir / "reports" / "eval" / "comparison.json").read_text())
    assert report  # the comparison table exists as JSON (and markdown beside it)
    assert (workdir / "reports" / "eval" / "comparison.md").is_file()
