"""Stage functions (what KFP components call): nesting under the parent run, reuse, a dead tracker."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from versavit.config import load_config
from versavit.stages import close_pipeline_run, open_pipeline_run, stage_data, stage_data_check

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.synthetic.num_train=24", "data.synthetic.num_val=8", "data.synthetic.samples_per_shard=8",
         "data.synthetic.image_size=56", "data.num_workers=0"]


def test_data_stages_nest_under_the_parent_run_and_reuse_finished_data(tmp_path: Path, capsys) -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"workdir={tmp_path}", *SMALL])
    parent_id = open_pipeline_run(cfg, kfp_run_id="kfp-123")
    url = stage_data(cfg, parent_id)
    checks = json.loads(stage_data_check(cfg, url, parent_id))
    close_pipeline_run(cfg, kfp_run_id="kfp-123", status="FINISHED")  # as the KFP exit handler does

    assert checks["train"]["num_samples"] == 24 and checks["val"]["skipped"] == 0
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("versavit-tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["versavit.kfp_run_id"] == "kfp-123"
    assert parent.data.params["train.multitask.lr_backbone"] == "0.0003"
    runs = {r.data.tags.get("versavit.stage"): r for r in client.search_runs([exp.experiment_id])}
    data_run, check_run = runs["data"], runs["data_check"]
    for r in (data_run, check_run):
        assert r.data.tags["mlflow.parentRunId"] == parent_id and r.info.status == "FINISHED"
        assert r.data.tags["versavit.kfp_run_id"] == "kfp-123"
    assert data_run.data.metrics["data/train_samples"] == 24
    inputs = {d.dataset.name: d.dataset for d in client.get_run(data_run.info.run_id).inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-train", "synthetic-val"}
    assert str(tmp_path) in json.loads(inputs["synthetic-train"].source)["uri"]
    arts = {a.path for a in client.list_artifacts(check_run.info.run_id, "previews")}
    assert "previews/preview-train.png" in arts

    # a rerun finds the finished data with the same settings and does not render it again
    capsys.readouterr()
    stage_data(cfg, parent_id)
    assert client.get_run(runs["data"].info.run_id).data.metrics["data/rendered"] == 32  # train + val
    newest = max(client.search_runs([exp.experiment_id], "tags.`versavit.stage` = 'data'"),
                 key=lambda r: r.info.start_time)
    assert newest.data.metrics["data/rendered"] == 0


def test_stages_survive_a_dead_tracking_server(tmp_path: Path, free_tcp_port: int, caplog) -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      [f"workdir={tmp_path}", *SMALL, f"tracking.uri=http://127.0.0.1:{free_tcp_port}"])
    parent_id = open_pipeline_run(cfg)
    assert parent_id == ""  # no server, no run: and no exception either
    url = stage_data(cfg, parent_id)
    assert (Path(url) / "train" / "manifest.json").is_file()  # the work itself is done
    warnings = [r for r in caplog.records if "the stage continues" in r.getMessage()]
    assert len(warnings) == 2  # one per stage process (each stage has its own tracker), not one per call
    pending = list((tmp_path / "mlflow-pending").glob("pending-*.jsonl"))
    assert pending and all(p.stat().st_size > 0 for p in pending)
