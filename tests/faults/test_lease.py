"""The stage lease (versavit.train.lease): a second run on a stage a live run holds fails at once, naming the
holder; an expired lease, or one whose holder died on this host, is taken over; a released one is free."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from versavit.train import lease
from versavit.train.lease import Lease, LeaseHeldError

ROOT = Path(__file__).resolve().parents[2]
HOLDER = """
import sys, time
from versavit.train import lease
with lease.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path):
    """Another process holding the lease of tmp_path/stages/multitask (killed at the end)."""
    url = str(tmp_path / "stages" / "multitask" / "lease.json")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield url, proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_a_held_lease_fails_a_second_run_at_once_naming_the_holder(holder) -> None:
    url, pid = holder
    t0 = time.monotonic()
    with pytest.raises(LeaseHeldError) as err:
        Lease(url).acquire()
    assert time.monotonic() - t0 < 2.0  # at once, not after a wait
    message = str(err.value)
    assert "\n" not in message
    assert f"host {socket.gethostname()}, pid {pid}, since 20" in message and "in use by another run" in message


def test_two_cli_runs_on_one_stage_conflict_before_torchrun(holder, tmp_path: Path) -> None:
    from faults_data_helpers import synthetic_stand_in

    url, pid = holder
    synthetic_stand_in(tmp_path)  # past the CLI's check that the stage's data exists
    res = subprocess.run([sys.executable, "-m", "versavit.cli", "train", "multitask", "--config", "configs/tiny.yaml",
                          f"workdir={tmp_path}", "tracking.enabled=false"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and f"pid {pid}" in lines[0], res.stderr
    assert not (tmp_path / "reports" / "multitask" / "logs").exists()  # torchrun never started


def _record(url: Path, **fields) -> None:
    url.parent.mkdir(parents=True, exist_ok=True)
    rec = {"host": "elsewhere", "pid": 1234, "since": time.time() - 7200, "renewed": time.time(),
           "expires_s": 600.0, "token": "theirs", **fields}
    url.write_text(json.dumps(rec))


def test_an_expired_lease_or_one_of_a_dead_local_holder_is_taken_over(tmp_path: Path) -> None:
    url = tmp_path / "lease.json"
    _record(url, renewed=time.time() - 601)  # not renewed for longer than its expiry
    mine = Lease(str(url))
    mine.acquire()
    assert json.loads(url.read_text())["token"] == mine.token
    mine.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _record(url, host=socket.gethostname(), pid=int(dead.stdout))  # fresh, but its process is gone
    mine = Lease(str(url))
    mine.acquire()
    assert json.loads(url.read_text())["token"] == mine.token
    mine.release()

    _record(url, renewed=time.time() - 30)  # live holder on another host: not taken
    with pytest.raises(LeaseHeldError, match="host elsewhere, pid 1234"):
        Lease(str(url)).acquire()


def test_a_released_lease_is_free_and_renewal_keeps_it_alive(tmp_path: Path) -> None:
    url = tmp_path / "stage" / "lease.json"
    with lease.hold(str(url), renew_s=0.05) as held:
        first = json.loads(url.read_text())["renewed"]
        time.sleep(0.3)
        assert json.loads(url.read_text())["renewed"] > first  # the daemon thread renewed it
        assert json.loads(url.read_text())["token"] == held.token
    assert not url.exists()  # released
    with lease.hold(str(url)):  # free again
        assert url.exists()
    assert not url.exists()


def test_a_lease_taken_away_is_noticed_and_not_released(tmp_path: Path) -> None:
    url = tmp_path / "lease.json"
    mine = Lease(str(url))
    mine.acquire()
    _record(url, renewed=time.time())  # someone took it over (we stalled past expiry)
    assert mine.renew() is False and mine.lost
    mine.release()
    assert json.loads(url.read_text())["token"] == "theirs"  # theirs stays


def test_s3_lease_is_created_by_a_conditional_put(s3: str) -> None:
    from versavit import storage

    storage.ensure_bucket("s3://lease-bucket/run")
    url = "s3://lease-bucket/run/stages/multitask/lease.json"
    first = Lease(url)
    first.acquire()
    assert storage.create_exclusive(url, b"{}") is False  # If-None-Match: * refuses an existing object
    with pytest.raises(LeaseHeldError, match="in use by another run"):
        Lease(url).acquire()
    first.release()
    assert not storage.exists(url)
    with lease.hold(url):
        assert storage.exists(url)
