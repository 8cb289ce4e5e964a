"""Elastic fault tolerance, executed: the generated PyTorchJob (Master + 1 Worker, one process each, c10d
rendezvous, torchrun's restart budget) run by the mini operator (mini_operator.py: the Training Operator's
env, restartPolicy OnFailure, backoffLimit) on the tiny config. Killing the Worker's container mid-run makes it
restart, rejoin the rendezvous and, with every rank resumed from the latest checkpoint, end with exactly the
weights of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest
from launch_helpers import ROOT, validate_crd
from mini_operator import MiniOperator, operator_env

from versavit.config import dump_yaml, load_config
from versavit.launch.pytorchjob import build_pytorchjob

STEPS, EVERY = 8, 2
SHRINK = [  # the tiny config's structure, smaller numbers (as tests/test_pipeline_full.py's SHRINK)
    "data.synthetic.num_train=32", "data.synthetic.num_val=8", "data.synthetic.image_size=56",
    "data.synthetic.samples_per_shard=16", "data.num_workers=0", "data.shuffle_buffer=16",
    "model.backbone.embed_dim=32", "model.backbone.depth=3", "model.backbone.num_heads=2",
    "model.heads.depth.features=16", "train.resolution={caption_max: 56, caption_min: 28, depth: 56, refseg: 56}",
    "train.warmup.enabled=false", "train.multitask.tasks=[depth]", "train.multitask.batch_size={depth: 4}",
    f"train.multitask.max_steps={STEPS}", f"train.multitask.checkpoint_interval={EVERY}",
    "train.precision=fp32", "tracking.enabled=false",
    "launch.backend=pytorchjob", "launch.nnodes=2", "launch.nproc_per_node=1", "launch.max_restarts=3",
]


def _job(workdir: Path, name: str) -> dict:
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"workdir={workdir}", *SHRINK])
    config = workdir / "launch" / f"{name}.yaml"  # what the launcher publishes (here on the shared disk)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(dump_yaml(cfg))
    job = build_pytorchjob(cfg, "multitask", str(config), name=name)
    validate_crd(job, "PyTorchJob")
    return job


def _latest(workdir: Path) -> int:
    path = workdir / "stages/multitask/checkpoints/latest.json"
    try:
        return int(json.loads(path.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _state(workdir: Path) -> dict:
    import torch

    return torch.load(workdir / "stages/multitask/export/trained_state.pt", map_location="cpu")


@pytest.fixture
def two_workdirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two workdirs holding the same rendered synthetic world (rendered once)."""
    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic
    from versavit.layout import synthetic_root

    ref, run = tmp_path / "reference", tmp_path / "killed"
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"workdir={ref}", *SHRINK])
    build_synthetic(synthetic_root(cfg.workdir), SyntheticConfig(**cfg.data.synthetic.model_dump()), workers=0)
    shutil.copytree(ref / "data", run / "data")
    return ref, run


def test_the_operators_env_for_an_elastic_job() -> None:
    """What each replica gets on top of the container's env (the operator's order and values)."""
    job = build_pytorchjob(load_config(ROOT / "configs/tiny.yaml", SHRINK), "multitask", "s3://b/c.yaml", name="j")
    assert dict(operator_env(job, "Master", 0)) == {
        "PYTHONUNBUFFERED": "1", "MASTER_PORT": "23456", "PET_MASTER_PORT": "23456", "MASTER_ADDR": "j-master-0",
        "PET_MASTER_ADDR": "j-master-0", "WORLD_SIZE": "2", "RANK": "0", "PET_NODE_RANK": "0",
        "PET_NPROC_PER_NODE": "1", "PET_RDZV_ENDPOINT": "j-master-0:23456", "PET_RDZV_BACKEND": "c10d",
        "PET_NNODES": "2:2", "PET_MAX_RESTARTS": "3", "PET_RDZV_ID": "j", "PET_RDZV_CONF": "join_timeout=1800"}
    assert dict(operator_env(job, "Worker", 0))["RANK"] == "1"


@pytest.mark.slow
def test_a_killed_replica_restarts_rejoins_and_ends_with_the_same_weights(two_workdirs: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    ref, run = two_workdirs
    t0 = time.monotonic()
    reference = MiniOperator(_job(ref, "tiny-multitask-ref001"), ROOT, tmp_path / "logs-ref").start()
    killed = MiniOperator(_job(run, "tiny-multitask-run001"), ROOT, tmp_path / "logs-run").start()
    try:
        end = time.monotonic() + 240
        while _latest(run) < EVERY and killed.reconcile() == "Running" and time.monotonic() < end:
            time.sleep(0.05)
        at = _latest(run)
        assert EVERY <= at < STEPS, killed.logs()[-3000:]
        assert not (run / "stages/multitask/stage.json").exists()
        worker = killed.kill("Worker", 0)  # the Worker pod's container dies mid-run (a node lost, an OOM kill)
        at = _latest(run)  # what every rank resumes from (no checkpoint commits without the Worker's ranks)
        assert killed.wait(240) == "Succeeded", f"{killed.message}\n{killed.events}\n{killed.logs()[-4000:]}"
        assert reference.wait(240) == "Succeeded", f"{reference.message}\n{reference.logs()[-4000:]}"
    finally:
        killed.stop()
        reference.stop()
    elapsed = time.monotonic() - t0
    master = next(r for r in killed.replicas if r.rtype == "Master")
    assert worker.restarts == 1 and master.restarts == 0  # restarted in place; the master's container lived on
    assert worker.exits[0] == -signal.SIGKILL
    # the Master's torchrun saw its rank fail (its peer gone), restarted it in the same container, and the
    # restarted rank trained on from the checkpoint to the end
    master_log = master.log.read_text()
    failed_at = master_log.index("failed (exitcode: 1) local_rank: 0")
    assert f"step {STEPS}/{STEPS}" in master_log[failed_at:]
    assert f"step {at + 1}/{STEPS}" in master_log[failed_at:]
    print(f"\nkilled the worker after checkpoint {at}; both jobs done in {elapsed:.1f} s; events: {killed.events}")
    expected, got = _state(ref), _state(run)
    assert expected.keys() == got.keys() and expected
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and bool((got[key] == tensor).all()), key
