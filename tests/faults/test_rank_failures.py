"""One message per failure inside a rank: the S3 endpoint stopped mid-training ends `versavit train` with one
stderr line naming the rank, the URL and the cause (exit 1, no traceback, no torchrun summary); with two
ranks the first failure is named, not the rank torchrun stopped after it (SIGTERM)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults_data_helpers import write
from tiny_model import TINY_MODEL

from versavit import storage
from versavit.config import load_config
from versavit.config.schema import StorageConfig
from versavit.launch import LaunchError, RankFailed, local
from versavit.train import failures

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_s3(monkeypatch: pytest.MonkeyPatch):
    """A moto S3 server of this test alone (the test stops it); storage pointed at it meanwhile."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in CREDS.items():
        monkeypatch.setenv(key, value)
    storage.configure(StorageConfig(s3_endpoint_url=endpoint))
    state = {"running": True}

    def stop() -> None:
        if state["running"]:
            state["running"] = False
            server.stop()

    yield endpoint, stop
    stop()
    storage.configure(StorageConfig())


def test_s3_stopped_mid_training_is_one_stderr_line_naming_rank_url_and_cause(own_s3, tmp_path: Path) -> None:
    endpoint, stop = own_s3
    storage.ensure_bucket("s3://outage/ds")
    write("s3://outage/ds", n=32, per_shard=8)  # 4 shards of 8: batches of 4 open a new shard every 2 steps
    cmd = [sys.executable, "-m", "versavit.cli", "train", "multitask", "--config", "configs/tiny.yaml",
           f"workdir={tmp_path}", *TINY_MODEL, f"storage.s3_endpoint_url={endpoint}", "data.source=shards",
           "data.tasks={depth: {urls: ['s3://outage/ds']}}", "train.warmup.enabled=false",
           "train.multitask.tasks=[depth]", "train.multitask.loss_weights={depth: 1.0}",
           "train.multitask.batch_size={depth: 4}", "train.multitask.max_steps=1000",
           "train.multitask.checkpoint_interval=1000", "data.num_workers=0", "data.shuffle_buffer=0",
           "tracking.enabled=false", "launch.nproc_per_node=1", "train.precision=fp32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CREDS})
    metrics = tmp_path / "reports" / "multitask" / "metrics.jsonl"
    try:
        end = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # it trains from S3
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < end, "no training step within 240 s"
            time.sleep(0.1)
        stop()  # the S3 endpoint goes away mid-training
        stopped = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    # rank 0's log and progress lines stream to the console (a read cut off mid-shard may add a warning
    # that samples were skipped); the failure adds one line and nothing else
    progress = [ln for ln in lines if ln.startswith(("[rank 0] ", "multitask depth=", "multitask step "))]
    assert len([ln for ln in lines if ln not in progress]) == 1, lines
    (error,) = [ln for ln in lines if ln not in progress]
    print(f"\nexit {proc.returncode} {took:.1f} s after the endpoint stopped; stderr: {len(lines)} line(s), "
          f"{len(lines) - len(progress)} of them not rank 0's progress or log: {error}")
    assert "Traceback" not in err and "ChildFailedError" not in err and "[default0]" not in err
    assert error.startswith("error: stage 'multitask' failed on rank 0: StorageError: cannot reach the S3 endpoint "
                            f"{endpoint} for s3://outage/ds/shard-0000")
    assert "and that the server is up" in error and f"logs: {tmp_path}/reports/multitask/logs/" in error
    # the logs keep what the console does not: the rank's traceback, torchrun's summary, the record
    (log_dir,) = (tmp_path / "reports" / "multitask" / "logs").iterdir()
    (rank_log,) = log_dir.rglob("attempt_0/0/stderr.log")
    assert "Traceback (most recent call last)" in rank_log.read_text()
    summary = (log_dir / local.TORCHRUN_LOG).read_text()
    assert "versavit.train.entry FAILED" in summary and "StorageError: cannot reach the S3 endpoint" in summary
    record = json.loads((log_dir / "failures" / "rank-0.json").read_text())
    assert record["type"] == "StorageError" and record["expected"] is True
    assert not (tmp_path / "stages" / "multitask" / "lease.json").exists()  # released on the way out


def _fake_ranks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: str) -> tuple[Exception, str]:
    """Two ranks of `faults_rank` under the real launcher and torchrun: what it raised, and the dead endpoint."""
    monkeypatch.setattr(local, "ENTRY_MODULE", "faults_rank")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"workdir={tmp_path}", "launch.nproc_per_node=2",
                                                   "tracking.enabled=false"])
    dead = f"http://127.0.0.1:{free_port()}"  # nobody listens here
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "FAULTS_RANK_MODE": mode, "FAULTS_RANK_URL": "s3://bucket/ds/shard-000001.tar",
           "AWS_ENDPOINT_URL_S3": dead, **CREDS}
    with pytest.raises(LaunchError) as err:
        local.launch_local(cfg, "multitask", env=env)
    return err.value, dead


def test_the_first_failure_is_named_not_the_rank_torchrun_stopped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture) -> None:
    exc, dead = _fake_ranks(monkeypatch, tmp_path, "storage")
    console = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    message = str(exc)
    assert isinstance(exc, RankFailed) and exc.rank == 1 and exc.error_type == "StorageError"
    assert "\n" not in message
    assert message.startswith(f"stage 'multitask' failed on rank 1: StorageError: cannot reach the S3 endpoint {dead} "
                              "for s3://bucket/ds/shard-000001.tar")
    assert "SIGTERM" not in message and "rank 0" not in message  # rank 0 was only stopped after it
    assert console == ["[rank 0] INFO faults_rank: rank 0 started"]  # rank 0's log; no traceback, no summary
    log_dir = Path(exc.log_dir)
    assert [r.rank for r in failures.read_records(log_dir / "failures")] == [1]  # rank 0 left none: stopped
    assert "faults_rank FAILED" in (log_dir / local.TORCHRUN_LOG).read_text()  # torchrun's summary: its log only


def test_records_first_by_time_and_worker_messages_on_one_line(tmp_path: Path) -> None:
    from versavit.data.errors import CorruptDataError

    stopped = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    worker = storage.StorageError("Caught StorageError in DataLoader worker process 0.\nOriginal Traceback (most "
                                  "recent call last):\n  File \"x.py\", line 1, in f\nversavit.storage.StorageError: "
                                  "cannot reach the S3 endpoint http://e for s3://b/k: check it")
    failures.write_record(worker, rank=1, folder=tmp_path)
    time.sleep(0.01)
    failures.write_record(stopped, rank=0, folder=tmp_path)
    failures.write_record(CorruptDataError("depth: 9 of 48 samples lost"), rank=2, folder=tmp_path)
    first, *rest = failures.read_records(tmp_path)
    assert (first.rank, first.type, first.expected) == (1, "StorageError", True)
    assert first.message == "cannot reach the S3 endpoint http://e for s3://b/k: check it"
    assert [(r.rank, r.expected) for r in rest] == [(0, False), (2, True)]
    failures.clear(tmp_path)
    assert failures.first_failure(tmp_path) is None


def _summary(*failed: tuple[int, int]) -> str:
    """torchrun's error summary for these (rank, exit code) failures, as it prints it."""
    return "".join(f"[{i}]:\n  time      : 2026-11-29_07:00:31\n  host      : vm\n  rank      : {rank} (local_rank: "
                   f"{rank})\n  exitcode  : {code} (pid: {1000 + rank})\n" for i, (rank, code) in enumerate(failed))


def test_which_failure_is_named_first(tmp_path: Path) -> None:
    """An expected error beats a later (or earlier) unexpected one; a rank killed by a signal beats its peer's
    resulting gloo error; a record of a rank torchrun did not see fail (it stopped that one) is ignored."""
    from versavit.data.errors import CorruptDataError

    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    folder = tmp_path / "failures"

    def launch_error(*failed: tuple[int, int], records: list[tuple[int, BaseException]]) -> LaunchError:
        failures.clear(folder)
        for rank, exc in records:
            failures.write_record(exc, rank, folder)
            time.sleep(0.01)
        return local.rank_failure("multitask", tmp_path, _summary(*failed))

    exc = launch_error((0, 1), (1, 1), records=[(0, gloo), (1, CorruptDataError("depth: 9 of 48 samples lost"))])
    assert isinstance(exc, RankFailed) and exc.rank == 1 and exc.error_type == "CorruptDataError"
    assert str(exc) == (f"stage 'multitask' failed on rank 1: CorruptDataError: depth: 9 of 48 samples lost (logs: "
                        f"{tmp_path}; 1 other rank(s) failed too)")
    exc = launch_error((1, -9), (0, 1), records=[(0, gloo)])  # rank 1 SIGKILLed (no record), rank 0 then broke
    assert not isinstance(exc, RankFailed) and "rank 1: killed by SIGKILL" in str(exc)
    exc = launch_error((0, 1), records=[(0, gloo), (1, storage.StorageError("late"))])  # rank 1: stopped, not seen
    assert isinstance(exc, RankFailed) and exc.rank == 0 and exc.error_type == "RuntimeError"
    assert "later" not in str(exc) and "other rank" not in str(exc)
    exc = launch_error((0, 1), (1, 143), records=[(0, storage.StorageError("cannot reach"))])  # 1: stopped
    assert isinstance(exc, RankFailed) and exc.rank == 0 and "other rank" not in str(exc)
    exc = launch_error((0, -15), records=[])  # stopped, no record, nothing else: torchrun's own account
    assert not isinstance(exc, RankFailed) and "rank 0: killed by SIGTERM" in str(exc)
    exc = launch_error((1, -9), (0, 143), records=[])
    assert "rank 1: killed by SIGKILL" in str(exc) and "rank 0: stopped by SIGTERM (exit code 143)" in str(exc)


@pytest.mark.parametrize("error", ["storage", "bug"])
def test_a_rank_ends_quietly_on_an_expected_error_and_reraises_a_bug(error: str, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from versavit import storage\n"
        "from versavit.train import failures\n"
        "with failures.reported(3):\n"
        "    if sys.argv[1] == 'storage':\n"
        "        raise storage.StorageError('s3://b/x does not exist: check the URL', kind='missing')\n"
        "    {}['key']\n"
    )
    res = subprocess.run([sys.executable, "-c", script, error], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, failures.FAILURE_DIR_ENV: str(tmp_path)})
    record = json.loads((tmp_path / "rank-3.json").read_text())
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr  # (the rank's log)
    if error == "storage":
        assert record["type"] == "StorageError" and record["expected"] is True
        assert record["message"] == "s3://b/x does not exist: check the URL"
    else:
        assert record["type"] == "KeyError" and record["expected"] is False
        assert res.stderr.rstrip().endswith("KeyError: 'key'")  # re-raised as it was


def test_the_console_shows_rank_0s_lines_without_tracebacks_or_torchruns_own() -> None:
    lines = [
        "W1129 07:00:01 torch/distributed/run.py:792] Setting OMP_NUM_THREADS environment variable\n",
        "[default0]:[rank 0] INFO versavit.train.loop: initialised 12 tensors\n",
        "[default0]:multitask depth=6.810        3/1000 0:07:06\n",
        "[default0]:[rank0]: Traceback (most recent call last):\n",
        "[default0]:[rank0]:   File \"x.py\", line 1, in f\n",
        "[default0]:[rank0]: ConnectionRefusedError: [Errno 111] Connect call failed\n",
        "[default0]:\n",
        "[default0]:[rank0]: The above exception was the direct cause of the following exception:\n",
        "[default0]:\n",
        "[default0]:[rank0]: Traceback (most recent call last):\n",
        "[default0]:[rank0]:   File \"y.py\", line 2, in g\n",
        "[default0]:[rank0]: versavit.storage.StorageError: cannot reach the S3 endpoint\n",
        "E1129 07:00:31 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 15068)\n",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n",
        "[default1]:[rank 1] WARNING something\n",
        "[default0]:[rank 0] INFO versavit.train.loop: after a traceback, lines show again\n",
    ]
    console = local._ConsoleFilter()
    shown = [s for s in map(console.show, lines) if s is not None]
    assert shown == ["[rank 0] INFO versavit.train.loop: initialised 12 tensors\n",
                     "multitask depth=6.810        3/1000 0:07:06\n",
                     "[rank 0] INFO versavit.train.loop: after a traceback, lines show again\n"]
