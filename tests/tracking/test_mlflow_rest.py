"""Acceptance of the tracking layout, through MLflow's REST API: the shrunk tiny pipeline (run once per session,
`local_pipeline`) served by MLflow's tracking server on 127.0.0.1 (a free port; stopped at the end of the module).

What a user comparing runs in MLflow relies on: a unique parent name, headline metrics on the parent in the
report's units, git commit + KFP run id + upstream tags on every stage run, dataset inputs on training runs, the
model versions' config hash, figures and description, the saved view of the runs table, and `versavit ui` /
`versavit compare` pointing at the right pages.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from mlflow.server import BACKEND_STORE_URI_ENV_VAR, SERVE_ARTIFACTS_ENV_VAR
from pipeline_run import RUN_NAME_PATTERN, PipelineRun

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("local_pipeline")]  # one worker builds the run

STAGES = {"data", "data_check", "label", "warmup", "multitask", "eval"}
UPSTREAM = {"data_check": "data", "label": "data", "warmup": "label", "multitask": "warmup", "eval": "multitask"}


@pytest.fixture(scope="module")
def server(local_pipeline: PipelineRun) -> Iterator[str]:
    """`mlflow server` over the pipeline's SQLite store, bound to 127.0.0.1 on a free port."""
    assert local_pipeline.returncode == 0, local_pipeline.stderr[-4000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the app `mlflow server --backend-store-uri URI` serves, under uvicorn as it does, without the launcher process
    # in front (half the start-up: 18-28 s against 39-57 s measured on the loaded 2-core machine) and without the
    # GenAI job runner (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: 17 s against 46 s)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "mlflow.server.fastapi_app:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, BACKEND_STORE_URI_ENV_VAR: local_pipeline.tracking_uri, SERVE_ARTIFACTS_ENV_VAR: "true",
             "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "mlflow server exited"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer in 180 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _api(url: str, path: str, body: dict | None = None, **params: Any) -> dict:
    call = requests.post(f"{url}/api/2.0/mlflow/{path}", json=body, timeout=30) if body is not None else \
        requests.get(f"{url}/api/2.0/mlflow/{path}", params=params, timeout=30)
    assert call.ok, (path, call.status_code, call.text[:500])
    return call.json()


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@pytest.fixture(scope="module")
def runs(server: str) -> dict[str, Any]:
    exp = _api(server, "experiments/get-by-name", experiment_name="versavit-tiny")["experiment"]
    found = _api(server, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
    return {"experiment": exp, "runs": found}


def test_parent_run_identity_and_headline_metrics(runs: dict[str, Any], local_pipeline: PipelineRun) -> None:
    parents = [r for r in runs["runs"] if "mlflow.parentRunId" not in _tags(r)]
    assert len(parents) == 1
    parent = parents[0]
    name = parent["info"]["run_name"]
    assert re.fullmatch(RUN_NAME_PATTERN, name), name
    assert sum(r["info"]["run_name"] == name for r in runs["runs"]) == 1  # unique in the experiment
    tags = _tags(parent)
    assert tags["versavit.pipeline_kind"] == "versavit" and tags["versavit.recipe"] == "warmup>multitask"
    assert tags["versavit.tasks"] == "caption,depth,refseg"
    assert tags["versavit.backbone"] == "qwen2_vl random init 32d x3"
    assert tags["versavit.config_hash"][:8] in name
    note = tags["mlflow.note.content"]  # the description: pipeline, stages, overrides of the config file
    assert "data → data_check → label → warmup → multitask → eval" in note
    assert "`train.multitask.max_steps`: 200 → **6**" in note and "configs/tiny.yaml" in note
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["train.multitask.tasks"] == "caption,depth,refseg"  # lists read as one value
    assert "tracking.uri" not in params

    metrics = _metrics(parent)  # headline: each benchmark metric's trained, /baseline and /delta, in % and metres
    for metric in ("seg_miou", "depth_rmse", "depth_absrel", "depth_delta1"):
        key = f"linear-probe/synthetic/{metric}"
        trained, baseline = metrics[key], metrics[f"{key}/baseline"]
        assert metrics[f"{key}/delta"] == pytest.approx(trained - baseline, abs=0.011)  # each rounded
    assert 1 < metrics["linear-probe/synthetic/depth_delta1"] <= 100  # percent, not a fraction
    assert {"da2k/synthetic/accuracy", "refseg/synthetic/ciou"} <= set(metrics)
    evaluation = next(r for r in runs["runs"] if _tags(r).get("versavit.stage") == "eval")
    assert _metrics(evaluation)["trained/linear-probe/synthetic/seg_miou"] == pytest.approx(  # the eval run: unrounded
        metrics["linear-probe/synthetic/seg_miou"], abs=0.005)

    units = json.loads((local_pipeline.workdir / "reports" / "eval" / "comparison.json").read_text())["units"]
    assert units["values"].startswith("raw fractions") and units["scale"]["linear-probe/synthetic/seg_miou"] == 100

    view = json.loads({t["key"]: t["value"] for t in runs["experiment"]["tags"]}[
        "mlflow.sharedViewState.versavit-headline"])  # the runs table's saved headline columns
    assert {"metrics.`linear-probe/synthetic/seg_miou`", "metrics.`linear-probe/synthetic/seg_miou/delta`"} <= set(
        view["selectedColumns"])
    assert "tags.`versavit.tasks`" in view["selectedColumns"]


def test_every_stage_run_has_lineage(runs: dict[str, Any], server: str) -> None:
    parent = next(r for r in runs["runs"] if "mlflow.parentRunId" not in _tags(r))
    kfp_run = _tags(parent)["versavit.kfp_run_id"]
    stages = {_tags(r)["versavit.stage"]: r for r in runs["runs"] if "versavit.stage" in _tags(r)}
    assert set(stages) >= STAGES
    for stage, run in stages.items():
        tags = _tags(run)
        assert tags["mlflow.parentRunId"] == parent["info"]["run_id"], stage
        assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"]), stage
        assert tags["versavit.kfp_run_id"] == kfp_run, stage
        if stage in UPSTREAM:  # the run whose output this stage read, by id
            up = UPSTREAM[stage]
            assert tags[f"versavit.upstream.{up}"] == stages[up]["info"]["run_id"], stage

    for stage in ("warmup", "multitask"):  # training runs: their datasets as inputs, URL + digest
        run = _api(server, "runs/get", run_id=stages[stage]["info"]["run_id"])["run"]
        inputs = run["inputs"]["dataset_inputs"]
        assert inputs, stage
        for item in inputs:
            ds = item["dataset"]
            assert ds["digest"] and json.loads(ds["source"])["uri"].endswith("data/labelled/train")
            assert {t["key"]: t["value"] for t in item["tags"]}["mlflow.data.context"].startswith("train/")


def test_model_versions_carry_config_hash_figures_and_description(runs: dict[str, Any], server: str) -> None:
    stages = {_tags(r)["versavit.stage"]: r for r in runs["runs"] if "versavit.stage" in _tags(r)}
    train = stages["multitask"]
    found = _api(server, "model-versions/search", filter=f"run_id='{train['info']['run_id']}'")["model_versions"]
    assert len(found) == 1
    version = found[0]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    assert tags["versavit.config_hash"] == _tags(train)["versavit.config_hash"]
    assert tags["versavit.stage"] == "multitask" and tags["versavit.tasks"] == "caption,depth,refseg"
    assert re.search(r"/stages/multitask/exports/[0-9a-f]+-6/backbone$", version["source"])  # immutable copy
    assert tags["versavit.source"] == version["source"]
    parent = next(r for r in runs["runs"] if "mlflow.parentRunId" not in _tags(r))
    key = "linear-probe/synthetic/seg_miou"
    assert float(tags[f"versavit.eval.{key}"]) == _metrics(parent)[key]
    assert "versavit.eval.delta/linear-probe/synthetic/seg_miou" in tags and "versavit.final.loss/depth" in tags
    assert tags["mlflow.source.git.commit"] == _tags(train)["mlflow.source.git.commit"]
    assert tags["versavit.kfp_run_id"] == _tags(train)["versavit.kfp_run_id"]
    assert "6 steps on caption, depth, refseg" in version["description"]
    assert "Evaluation (run" in version["description"]


def test_ui_prints_the_model_training_view_of_a_tracking_server(runs: dict[str, Any], server: str) -> None:
    from typer.testing import CliRunner

    from versavit.cli import app

    res = CliRunner().invoke(app, ["ui", "--config", "configs/tiny.yaml", f"tracking.uri={server}"],
                             env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    exp_id = runs["experiment"]["experiment_id"]
    assert (f"{server}/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=versavit-headline"
            in res.output.replace("\n", ""))


def test_ui_serves_a_local_store_and_prints_its_model_training_view(runs: dict[str, Any], local_pipeline: PipelineRun,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess as sp

    from typer.testing import CliRunner

    from versavit.cli import app

    started: list[list[str]] = []
    monkeypatch.setattr(sp, "call", lambda cmd, env=None: started.append(cmd) or 0)  # the server itself: above
    res = CliRunner().invoke(app, ["ui", "--config", "configs/tiny.yaml", f"workdir={local_pipeline.workdir}",
                                   "--port", "5077"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    exp_id = runs["experiment"]["experiment_id"]
    assert (f"http://127.0.0.1:5077/#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey="
            "versavit-headline" in res.output.replace("\n", ""))
    (cmd,) = started
    assert cmd[cmd.index("--backend-store-uri") + 1] == local_pipeline.tracking_uri and "127.0.0.1" in cmd
