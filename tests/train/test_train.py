"""Training stages: which parameters learn, multi-task DeepSpeed ZeRO-2 on 2 processes, exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import read_metrics, tiny_config, train_cmd

from versavit.data.tasks import task_batches
from versavit.models.multitask import VersaViT
from versavit.train.loop import plan_stage

ROOT = Path(__file__).resolve().parents[2]


def workdir_with_data(tiny_world: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_world / "data", tmp_path / "data")
    return tmp_path


def test_plan_stage(tiny_world: Path) -> None:
    cfg = tiny_config(tiny_world, "train.multitask.max_steps=null", "train.multitask.epochs=2")
    plan = plan_stage(cfg, "multitask", world=2)
    assert plan.micro_steps == ["caption", "depth", "refseg"]
    # 48 samples, 2 epochs; the task with the smallest batch (caption, 2 x 2 ranks) needs the most steps
    assert plan.total_steps == 24
    warm = plan_stage(tiny_config(tiny_world), "warmup", world=2)
    assert warm.micro_steps == ["caption"] and warm.weights == {"caption": 1.0}  # global 4 = 2 x 2 ranks


def _grads_after_one_step(model: VersaViT, cfg, tasks: list[str]) -> set[str]:
    model.zero_grad()
    for task in tasks:
        batch = next(task_batches(cfg, task, cfg.train.multitask.batch_size[task], num_workers=0))
        loss, _ = model(task, batch)
        loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_warmup_trains_the_projector_only(tiny_world: Path) -> None:
    cfg = tiny_config(tiny_world, "train.precision=fp32")
    model = VersaViT.build(cfg.model, tasks=["caption"])
    trainable = model.freeze_for_warmup()
    projector = {id(p) for p in model.heads["caption"].projector_parameters()}
    assert {id(p) for p in trainable} == projector
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".projector" in n or "projector." in n for n in names), names
    with_grad = _grads_after_one_step(model, cfg, ["caption"])
    assert with_grad == names  # every projector tensor learns, nothing else does


def test_multitask_every_parameter_learns_in_its_group(tiny_world: Path) -> None:
    cfg = tiny_config(tiny_world, "train.precision=fp32")
    model = VersaViT.build(cfg.model)
    backbone = {id(p) for p in model.backbone_group()}
    heads = {id(p) for p in model.heads_group()}
    assert not backbone & heads
    assert backbone | heads == {id(p) for p in model.parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".merger." in n for n in frozen)  # the tower's unused merger, nothing else
    with_grad = _grads_after_one_step(model, cfg, ["caption", "depth", "refseg"])
    dead = {n for n, p in model.named_parameters() if n not in with_grad}
    # the backbone's own merger is not on VersaViT's path (the caption head has its own projector)
    assert all("merger" in n for n in dead), sorted(dead)[:10]
    # each task's micro-step reaches the backbone and only its own head
    for task in ("depth", "refseg"):
        touched = _grads_after_one_step(model, cfg, [task])
        assert any(n.startswith("backbone.") for n in touched)
        assert {n.split(".")[1] for n in touched if n.startswith("heads.")} == {task}


def _wait_for(path: Path, predicate, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists():
            try:
                if predicate(json.loads(path.read_text())):
                    return
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"{path} not ready in {timeout} s")


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_reproduces_losses(tiny_world: Path, tmp_path: Path) -> None:
    # Tracking off: what MLflow shows of a killed and reopened stage is tests/tracking/test_replay.py's; here each
    # of the three launches would spend ~10 s on MLflow (its import, the SQLite schema) that no assertion reads.
    common = ["train.multitask.max_steps=12", "train.multitask.checkpoint_interval=4", "train.precision=fp32",
              "data.num_workers=1", "tracking.enabled=false"]
    ref = workdir_with_data(tiny_world, tmp_path / "ref")
    run = workdir_with_data(tiny_world, tmp_path / "killed")
    # The uninterrupted reference and the run to be killed are independent: they start together.
    ref_log = tmp_path / "ref.log"
    with ref_log.open("w") as log:
        reference = subprocess.Popen(train_cmd(ref, "multitask", *common), cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=log, start_new_session=True)
    try:
        proc = subprocess.Popen(train_cmd(run, "multitask", *common), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for(run / "stages" / "multitask" / "checkpoints" / "latest.json", lambda r: r["step"] >= 4, 600)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: launcher, torchrun, both ranks
            proc.wait()
        killed_at = json.loads((run / "stages/multitask/checkpoints/latest.json").read_text())["step"]
        assert 4 <= killed_at < 12
        assert not (run / "stages" / "multitask" / "stage.json").exists()
        assert reference.wait(timeout=900) == 0, ref_log.read_text()[-3000:]
    finally:
        if reference.poll() is None:
            os.killpg(reference.pid, signal.SIGKILL)
            reference.wait()
    expected = read_metrics(ref, "multitask")

    res = subprocess.run(train_cmd(run, "multitask", *common), cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = read_metrics(run, "multitask")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        for task in ("caption", "depth", "refseg"):
            assert resumed[step][f"loss/{task}"] == expected[step][f"loss/{task}"], (step, task)


@pytest.mark.slow
def test_a_dying_rank_is_reported_by_rank_with_its_log(tiny_world: Path, tmp_path: Path) -> None:
    workdir = workdir_with_data(tiny_world, tmp_path)
    res = subprocess.run(train_cmd(workdir, "multitask", "train.multitask.max_steps=6", "train.precision=fp32",
                                   "tracking.enabled=false"),
                         cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "VERSAVIT_FAULT_INJECT": "rank=1,step=2"})
    assert res.returncode == 1
    assert "rank 1: killed by SIGKILL" in res.stderr, res.stderr[-2000:]
    assert "fault injection" in res.stderr  # the dying rank's own last log line is shown
    assert "Traceback" not in res.stderr.split("error:")[-1]


def test_a_non_finite_gradient_norm_stops_the_run(tiny_world: Path, tmp_path: Path, world_of_one: None) -> None:
    """bf16 runs without DeepSpeed's per-tensor overflow scan: the loop checks the global norm instead."""
    import torch

    from versavit.train.loop import Trainer

    cfg = tiny_config(workdir_with_data(tiny_world, tmp_path), "train.multitask.max_steps=4",
                      "train.multitask.tasks=[depth]", "tracking.enabled=false")
    tr = Trainer.setup(cfg, "multitask", resume=False)
    try:
        point = tr.step(0)
        assert point["grad_norm"] > 0 and math.isfinite(point["grad_norm"])
        weight = next(p for n, p in tr.engine.module.named_parameters() if n.startswith("heads.depth."))
        weight.register_hook(lambda g: torch.full_like(g, float("inf")))  # finite loss, infinite gradient
        with pytest.raises(FloatingPointError, match="step 1: gradient norm is inf"):
            tr.step(1)
    finally:
        tr.close_streams()


def test_deepspeed_config_follows_the_run_config(tiny_world: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.train.engine import deepspeed_config

    cfg = tiny_config(tiny_world, "train.zero_stage=2", "train.precision=bf16")
    ds = deepspeed_config(cfg.train, grad_accum=3, grad_clip=1.0)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert deepspeed_config(cfg.train, 3, 1.0)["zero_optimization"]["contiguous_gradients"] is False
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # GPUs: against fragmentation
    assert deepspeed_config(cfg.train, 3, 1.0)["zero_optimization"]["contiguous_gradients"] is True
