"""End to end: the whole KFP pipeline with the local runner on a shrunk tiny config, checked in MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
SHRINK = [  # the tiny config's structure, smaller numbers: the suite must stay fast on 2 cores
    "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.image_size=56",
    "data.synthetic.samples_per_shard=16", "data.num_workers=0",
    "model.backbone.embed_dim=32", "model.backbone.depth=3", "model.backbone.num_heads=2",
    "model.heads.caption.projector_hidden=32", "model.heads.caption.tiny_llm_hidden=32",
    "model.heads.caption.tiny_llm_layers=1", "model.heads.depth.features=16",
    "model.heads.refseg.decoder_dim=32", "model.heads.refseg.decoder_depth=1", "model.heads.refseg.decoder_heads=2",
    "train.resolution={caption_max: 56, caption_min: 28, depth: 56, refseg: 56}",
    "train.multitask.batch_size={caption: 2, depth: 4, refseg: 4}",
    "train.warmup.batch_size={caption: 2}", "train.warmup.global_batch=4", "train.warmup.max_steps=3",
    "train.multitask.max_steps=6", "train.multitask.checkpoint_interval=3",
    "eval.probe.seg_resolution=56", "eval.probe.depth_resolution=56", "eval.probe.epochs=2",
]


@pytest.mark.slow
def test_whole_local_pipeline_tracks_every_stage(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "versavit.cli", "pipeline", "run", "--local", "--config", "configs/tiny.yaml",
         f"workdir={tmp_path}", *SHRINK],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Linear probes" in res.stderr and "mlflow ui --backend-store-uri" in res.stderr

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
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
    assert any(k.endswith("probe/seg_miou") for k in evaluation)
    assert any(k.endswith("probe/depth_rmse") for k in evaluation)
    assert any(k.endswith("zeroshot/depth_absrel") for k in evaluation)
    assert any(k.endswith("refseg/ciou") for k in evaluation)
    report = json.loads((tmp_path / "reports" / "eval" / "comparison.json").read_text())
    assert report  # the comparison table exists as JSON (and markdown beside it)
    assert (tmp_path / "reports" / "eval" / "comparison.md").is_file()
