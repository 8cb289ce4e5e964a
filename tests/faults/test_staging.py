"""Every exit cleans its staging: a normal save, a SIGTERM mid-save, and (by the next save / run) a SIGKILL
mid-save leave no staging folder behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from versavit import storage
from versavit.train import checkpoint

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class FastEngine:
    """What DeepSpeed's save_checkpoint leaves in the staging folder, in miniature."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"weights")


def staging_folders(root: Path) -> list[Path]:
    return sorted(root.rglob(f"{storage.STAGING_PREFIX}*"))


def start_slow_save(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A process stuck in the middle of a checkpoint save; returns it and its staging folder."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, str(HERE / "faults_slow_save.py"), str(tmp_path / "ckpt"),
                             str(tmp_path / "staging"), str(ready), *extra], cwd=ROOT)
    end = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"the slow save did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    return proc, Path(ready.read_text())


def test_a_normal_save_leaves_no_staging(tmp_path: Path) -> None:
    root = tmp_path / "staging"
    tag = checkpoint.save(FastEngine(), str(tmp_path / "ckpt"), 4, {"step": 4}, rank=0, staging_root=root)
    assert (tmp_path / "ckpt" / tag / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
    assert (tmp_path / "ckpt" / tag / "rng_rank0.pt").is_file()
    assert json.loads((tmp_path / "ckpt" / "latest.json").read_text()) == {"tag": tag, "step": 4}
    assert staging_folders(root) == []
    # a save that fails (here: DeepSpeed raises) leaves none either
    with pytest.raises(ZeroDivisionError):
        checkpoint.save(type("Broken", (), {"save_checkpoint": lambda *a, **k: 1 / 0})(), str(tmp_path / "ckpt"), 8,
                        {}, rank=0, staging_root=root)
    assert staging_folders(root) == []


def test_sigkill_mid_save_leaves_staging_that_the_next_save_removes(tmp_path: Path) -> None:
    proc, staging = start_slow_save(tmp_path)
    assert staging.parent.parent == tmp_path / "staging"  # <staging root>/<host>/.staging-<pid>-...
    assert staging.name.startswith(f"{storage.STAGING_PREFIX}{proc.pid}-")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = staging_folders(tmp_path / "staging")
    assert left == [staging]  # what a SIGKILL leaves: no finally block ran
    assert sum(f.stat().st_size for f in staging.rglob("*") if f.is_file()) >= 5 << 20
    assert not (tmp_path / "ckpt" / "latest.json").exists()  # the killed save was never committed

    checkpoint.save(FastEngine(), str(tmp_path / "ckpt"), 8, {"step": 8}, rank=0, staging_root=tmp_path / "staging")
    assert staging_folders(tmp_path / "staging") == []
    assert checkpoint.latest(str(tmp_path / "ckpt"))["step"] == 8


def test_sigterm_mid_save_removes_its_staging(tmp_path: Path) -> None:
    """A rank's SIGTERM handling (`lifeline.exit_on_signals`, installed by the training entry point) raises
    SystemExit, so the save's finally block removes the staging folder before the process ends."""
    proc, staging = start_slow_save(tmp_path, "--exit-on-signals")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert time.monotonic() - t0 < 5
    assert not staging.exists()
    assert staging_folders(tmp_path / "staging") == []


def test_the_next_run_removes_staging_of_dead_processes_only(tmp_path: Path) -> None:
    """What `Trainer.setup` calls (`remove_stale_staging(staging_root(cfg))`) removes the folders whose process
    is gone, including a pid reused by a later process, and keeps those of live processes and other hosts."""
    root = tmp_path / "staging"
    host = root / socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me, start = os.getpid(), storage._process_start(os.getpid())
    assert start  # Linux: /proc/<pid>/stat
    folders = {
        "dead": host / f"{storage.STAGING_PREFIX}{dead.pid}-{start}-ckpt-r0-abc",
        "reused pid": host / f"{storage.STAGING_PREFIX}{me}-{int(start) - 1}-ckpt-r1-abc",
        "live": host / f"{storage.STAGING_PREFIX}{me}-{start}-ckpt-r0-abc",
        "other host": root / "another-host" / f"{storage.STAGING_PREFIX}{dead.pid}-{start}-ckpt-r0-abc",
    }
    for path in folders.values():
        (path / "step-00000004").mkdir(parents=True)
        (path / "step-00000004" / "shard.pt").write_bytes(b"x" * 1024)
    removed = storage.remove_stale_staging(root)
    assert sorted(removed) == sorted([folders["dead"], folders["reused pid"]])
    assert folders["live"].exists() and folders["other host"].exists()


def test_an_s3_upload_stages_in_a_folder_that_goes(s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_default_staging_root", lambda: tmp_path / "staging")
    storage.ensure_bucket("s3://faults")
    storage.write_text("s3://faults/ckpt/latest.json", '{"step": 1}')
    assert storage.read_text("s3://faults/ckpt/latest.json") == '{"step": 1}'
    with pytest.raises(RuntimeError), storage.atomic_local_file("s3://faults/ckpt/shard.pt") as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not storage.exists("s3://faults/ckpt/shard.pt")
    assert staging_folders(tmp_path / "staging") == []
