"""Reruns with a changed config: a checkpoint of another config is never resumed (one line, both hashes, the
fix), `train.restart=true` starts over, and registered model versions never share a mutable path."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import TINY_MODEL

from versavit.config import load_config
from versavit.train import checkpoint
from versavit.train.checkpoint import CheckpointMismatch, resume_hash

ROOT = Path(__file__).resolve().parents[2]


def _cfg(workdir: Path, *extra: str):
    return load_config(ROOT / "configs/tiny.yaml", [
        f"workdir={workdir}", *TINY_MODEL, "train.warmup.enabled=false", "train.multitask.max_steps=4",
        "tracking.enabled=false", "train.precision=fp32", "data.num_workers=0", *extra])


@pytest.fixture
def one_process_world(monkeypatch: pytest.MonkeyPatch):
    """An in-process process group of one (gloo, a free port); no data streams (setup only)."""
    from versavit.train.loop import Trainer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)  # (a group already initialised in this session is reused as it is)
    monkeypatch.setattr(Trainer, "open_streams", lambda self: None)
    return Trainer


def test_a_changed_config_stops_and_restart_starts_over(tmp_path: Path, one_process_world) -> None:
    Trainer = one_process_world
    three = _cfg(tmp_path)
    tr = Trainer.setup(three, "multitask")
    assert tr.start == 0
    tr.save(2)
    ckpt = tmp_path / "stages" / "multitask" / "checkpoints"
    assert json.loads((ckpt / "latest.json").read_text())["config_hash"] == resume_hash(three)

    # the same config (up to settings that cannot matter, e.g. log_interval) resumes
    assert Trainer.setup(_cfg(tmp_path, "train.log_interval=5"), "multitask").start == 2

    caption = _cfg(tmp_path, "train.multitask.tasks=[caption]")
    with pytest.raises(CheckpointMismatch) as err:
        Trainer.setup(caption, "multitask")
    message = str(err.value)
    assert "\n" not in message and resume_hash(three) in message and resume_hash(caption) in message
    assert "train.restart=true" in message and resume_hash(three) != resume_hash(caption)
    assert (ckpt / "step-00000002").is_dir()  # nothing deleted without restart

    restarted = Trainer.setup(_cfg(tmp_path, "train.multitask.tasks=[caption]", "train.restart=true"), "multitask")
    assert restarted.start == 0 and not ckpt.exists()  # the old checkpoints went first
    assert resume_hash(_cfg(tmp_path, "train.restart=true")) == resume_hash(three)  # restart=true is not "a change"


def test_registered_versions_have_distinct_immutable_sources(tmp_path: Path, one_process_world) -> None:
    from versavit.train.loop import _finish

    class Tracker:
        enabled = True

        def __init__(self):
            self.registered: list[tuple[str, str]] = []

        def run_id(self, run):
            return "run"

        def set_tags(self, run, tags):
            pass

        def register_model(self, run, name, source, **meta):  # meta: tags, description
            self.registered.append((name, source))

    first_cfg = _cfg(tmp_path)
    tr = one_process_world.setup(first_cfg, "multitask")
    tracker = Tracker()
    _finish(first_cfg, tr.plan, tr.engine, 0, tracker, None, None)
    _finish(first_cfg, tr.plan, tr.engine, 0, tracker, None, None)  # a rerun of the finished stage: no new version
    assert len(tracker.registered) == 1
    first = Path(tracker.registered[0][1])
    assert first == tmp_path / "stages/multitask/exports" / f"{resume_hash(first_cfg)}-4" / "backbone"
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    assert before

    second_cfg = _cfg(tmp_path, "train.multitask.lr_heads=0.0002")  # another config, same folder
    for p in tr.engine.module.parameters():
        p.data.add_(1.0)  # other weights
    _finish(second_cfg, tr.plan, tr.engine, 0, tracker, None, None)
    sources = [s for _, s in tracker.registered]
    assert len(sources) == 2 and len(set(sources)) == 2
    assert all("/exports/" in s and "/export/" not in s for s in sources)
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before  # version 1 unchanged
    stage = json.loads((tmp_path / "stages/multitask/stage.json").read_text())
    assert stage["registered_backbone_url"] == sources[1]


def test_cli_rerun_with_another_configs_checkpoint_is_one_line_exit_2(tmp_path: Path) -> None:
    from faults_data_helpers import synthetic_stand_in

    synthetic_stand_in(tmp_path)  # past the CLI's check that the stage's data exists
    ckpt = tmp_path / "stages" / "multitask" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest.json").write_text(json.dumps({"tag": "step-00000040", "step": 40, "config_hash": "0123abcd"}))
    res = subprocess.run([sys.executable, "-m", "versavit.cli", "train", "multitask", "--config", "configs/tiny.yaml",
                          f"workdir={tmp_path}", "train.multitask.tasks=[caption]"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "0123abcd" in lines[0] and "train.restart=true" in lines[0], res.stderr
    assert not (tmp_path / "stages" / "multitask" / "lease.json").exists()  # released on the way out
    assert checkpoint.latest(str(ckpt))["step"] == 40  # untouched
