"""Tracking loses nothing: pending records replayed once, killed attempts marked KILLED, failures tagged."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from versavit.config import RunConfig, config_hash
from versavit.tracking import (
    FAILURE_TAG,
    HOST_TAG,
    PARENT_RUN_ENV,
    PARENT_TAG,
    PID_TAG,
    STAGE_TAG,
    Tracker,
    replay_dir,
    stage_run,
    tracking_uri,
)
from versavit.tracking.tracker import pid_alive

EXP = "versavit-test"
_ENV = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT", PARENT_RUN_ENV)


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tracker sets the MLflow HTTP variables process-wide with setdefault: undo that after each test.
    for var in _ENV:
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"  # schema once (~1 s), copied per test
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _store(path: Path, template: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, path)
    return f"sqlite:///{path}"


class _Outage:
    """While `down`, the MLflow calls the tracker and the replay make fail as with a dead server."""

    METHODS = ("get_experiment_by_name", "create_run", "log_batch", "set_terminated", "search_runs",
               "search_experiments", "set_tag")

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.down = False
        for name in self.METHODS:
            original = getattr(MlflowClient, name)

            def wrapper(client, *args, _original=original, **kwargs):
                if self.down:
                    raise ConnectionError("simulated outage")
                return _original(client, *args, **kwargs)

            monkeypatch.setattr(MlflowClient, name, wrapper)


class _Count:
    """Counts calls of an MlflowClient method (and the metric points of log_batch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str):
        self.calls = self.points = 0
        original = getattr(MlflowClient, name)

        def wrapper(client, *args, **kwargs):
            self.calls += 1
            self.points += len(kwargs.get("metrics") or [])
            return original(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, wrapper)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _log_offline(pending: Path, steps: int = 40) -> str:
    """A parent and a stage run logged against a port nobody listens on: everything goes to `pending`."""
    tracker = Tracker(f"http://127.0.0.1:{_free_port()}", EXP, pending_dir=str(pending))
    parent = tracker.start_pipeline_run("pipeline")
    with tracker.stage("train", parent=parent) as run:
        for step in range(steps):
            tracker.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
    tracker.end_run(parent)
    assert tracker.close()["metrics"] == steps
    (path,) = pending.glob("pending-*.jsonl")
    return path.name


def test_server_killed_at_step_8_then_back(tmp_path: Path, _migrated_db: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The measured case: 8 of 40 steps sent, then the server dies; a replay sends the other 32, once."""
    uri, pending = _store(tmp_path / "mlflow.db", _migrated_db), tmp_path / "pending"
    outage = _Outage(monkeypatch)
    tracker = Tracker(uri, EXP, flush_every=1, pending_dir=str(pending))
    parent = tracker.start_pipeline_run("pipeline")
    with tracker.stage("train", parent=parent) as run:
        for step in range(40):
            outage.down = step >= 8
            tracker.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
    tracker.end_run(parent)
    assert tracker.close()["metrics"] == 32
    outage.down = False
    client = MlflowClient(uri)
    assert _steps(client, run.run_id) == list(range(8))
    assert client.get_run(run.run_id).info.status == "RUNNING"
    (name,) = (p.name for p in pending.glob("pending-*.jsonl"))

    (report,) = replay_dir(pending)  # to the URI the file recorded
    assert report.error is None and report.sent["metrics"] == 32 and report.sent["run_ends"] == 2
    assert report.sent["runs"] == 0  # both runs existed: their records carry the run ids
    assert _steps(client, run.run_id) == list(range(40))
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"
    assert not list(pending.glob("pending-*")) and (pending / "replayed" / name).is_file()

    batch = _Count(monkeypatch, "log_batch")
    assert replay_dir(pending) == []  # a second replay sends nothing
    assert batch.calls == 0 and len(client.get_metric_history(run.run_id, "loss")) == 40


def test_partial_replay_resumes_where_it_stopped(tmp_path: Path, _migrated_db: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs created offline are created once; an outage mid-replay resumes without resending anything."""
    pending, uri = tmp_path / "pending", _store(tmp_path / "dest" / "mlflow.db", _migrated_db)
    name = _log_offline(pending)
    records = [json.loads(line) for line in (pending / name).read_text().splitlines()]
    assert [r["op"] for r in records] == ["create", "create", "metrics", "end", "end"]
    assert records[1]["parent_local"] == records[0]["run"] and records[1]["parent_run_id"] is None

    # the store answers the first probe, then dies when the first run end is sent
    calls = {"probe": 0}
    search, terminate = MlflowClient.search_experiments, MlflowClient.set_terminated

    def probe(client, *args, **kwargs):
        calls["probe"] += 1
        if calls["probe"] > 1:
            raise ConnectionError("down again")
        return search(client, *args, **kwargs)

    def dead(client, *args, **kwargs):
        raise ConnectionError("down again")

    monkeypatch.setattr(MlflowClient, "search_experiments", probe)
    monkeypatch.setattr(MlflowClient, "set_terminated", dead)
    (first,) = replay_dir(pending, uri=uri)
    assert first.error and "unreachable" in first.error and first.left == 2
    assert (first.sent["runs"], first.sent["metrics"], first.sent["run_ends"]) == (2, 40, 0)
    assert (pending / name).is_file()
    assert json.loads((pending / name.replace(".jsonl", ".progress.json")).read_text())["done"] == 3

    monkeypatch.setattr(MlflowClient, "search_experiments", search)
    monkeypatch.setattr(MlflowClient, "set_terminated", terminate)
    create, batch = _Count(monkeypatch, "create_run"), _Count(monkeypatch, "log_batch")
    (second,) = replay_dir(pending, uri=uri)
    assert second.error is None and second.sent["run_ends"] == 2 and second.sent_total == 2
    assert create.calls == 0 and batch.calls == 0
    assert replay_dir(pending, uri=uri) == [] and create.calls == 0 and batch.calls == 0

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXP).experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    by_name = {r.info.run_name: r for r in runs}
    train = by_name["train"]
    assert train.data.tags[PARENT_TAG] == by_name["pipeline"].info.run_id
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 40
    assert _steps(client, train.info.run_id) == list(range(40))


def test_cli_replay_offline_run_into_a_store(tmp_path: Path, _migrated_db: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit import storage
    from versavit.cli import app

    monkeypatch.setattr(storage, "_config", storage._config)  # restored after the CLI configures storage
    pending = tmp_path / "pending"
    name = _log_offline(pending)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: replay-test\nworkdir: {tmp_path / 'run'}\n")
    runner = CliRunner()

    down = runner.invoke(app, ["tracking", "replay", str(pending), "--config", str(cfg)])
    assert down.exit_code == 1, down.output
    assert down.output.startswith("error: MLflow at http://127.0.0.1:") and "unreachable" in down.output
    assert (pending / name).is_file()

    uri = _store(tmp_path / "dest.db", _migrated_db)
    up = runner.invoke(app, ["tracking", "replay", str(pending), "--config", str(cfg), "--uri", uri])
    assert up.exit_code == 0, up.output
    assert up.output.splitlines()[0] == (f"{name}: sent 2 runs, 40 metrics, 2 run_ends to {uri} "
                                         "(done, moved to replayed/)")
    again = runner.invoke(app, ["tracking", "replay", str(pending), "--config", str(cfg), "--uri", uri])
    assert again.exit_code == 0 and again.output.startswith("nothing to replay")
    client = MlflowClient(uri)
    (train,) = client.search_runs([client.get_experiment_by_name(EXP).experiment_id], "tags.`versavit.stage` = 'train'")
    assert len(client.get_metric_history(train.info.run_id, "loss")) == 40


def test_a_bad_record_does_not_block_the_rest(tmp_path: Path, _migrated_db: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pending, uri = tmp_path / "pending", _store(tmp_path / "mlflow.db", _migrated_db)
    outage = _Outage(monkeypatch)
    outage.down = True
    tracker = Tracker(uri, EXP, pending_dir=str(pending))
    run = tracker.start_pipeline_run("p")
    tracker.log_artifact(run, str(tmp_path / "gone.json"))  # missing at replay: rejected
    tracker.set_tags(run, {"a": "b"})
    tracker.end_run(run)
    tracker.close()
    outage.down = False
    terminate = MlflowClient.set_terminated
    attempts = {"n": 0}

    def flaky(client, *args, **kwargs):  # fails while the server answers: a bad record, tried twice
        attempts["n"] += 1
        raise RuntimeError("server error")

    monkeypatch.setattr(MlflowClient, "set_terminated", flaky)
    (report,) = replay_dir(pending)
    assert report.error is None and attempts["n"] == 2
    assert (report.sent["runs"], report.sent["tags"]) == (1, 1)
    assert (report.rejected["artifacts"], report.rejected["run_ends"]) == (1, 1)
    assert "rejected 1 artifacts, 1 run_ends" in report.line()
    monkeypatch.setattr(MlflowClient, "set_terminated", terminate)
    assert not list(pending.glob("pending-*")) and replay_dir(pending) == []


def _cfg(tmp_path: Path, template: Path) -> RunConfig:
    cfg = RunConfig(name="exp", workdir=str(tmp_path))
    _store(tmp_path / "mlflow.db", template)
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    return cfg


def test_stage_run_replays_pending_records_first(tmp_path: Path, _migrated_db: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, _migrated_db)
    outage = _Outage(monkeypatch)
    outage.down = True
    with stage_run(cfg, "data") as (tracker, run):
        for step in range(40):
            tracker.log_metrics(run, {"loss": float(step)}, step=step)
    pending = tmp_path / "mlflow-pending"
    assert len(list(pending.glob("pending-*.jsonl"))) == 1
    with stage_run(cfg, "data_check"):  # still down: the records stay, nothing raises
        pass
    assert len(list(pending.glob("pending-*.jsonl"))) == 2

    outage.down = False
    with stage_run(cfg, "label"):  # the server answers: both files are sent before the stage's run starts
        pass
    assert not list(pending.glob("pending-*")) and len(list((pending / "replayed").iterdir())) == 2
    client = MlflowClient(tracking_uri(cfg))
    runs = {r.data.tags[STAGE_TAG]: r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])}
    assert set(runs) == {"data", "data_check", "label"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    assert _steps(client, runs["data"].info.run_id) == list(range(40))
    assert runs["data"].data.tags[PID_TAG] == str(os.getpid())


def test_close_pipeline_run_replays_at_its_end(tmp_path: Path, _migrated_db: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.stages import close_pipeline_run

    cfg = _cfg(tmp_path, _migrated_db)
    outage = _Outage(monkeypatch)
    outage.down = True
    with stage_run(cfg, "data") as (tracker, run):
        tracker.log_metrics(run, {"loss": 1.0}, step=0)
    outage.down = False
    close_pipeline_run(cfg)
    pending = tmp_path / "mlflow-pending"
    assert not list(pending.glob("pending-*")) and len(list((pending / "replayed").iterdir())) == 1
    client = MlflowClient(tracking_uri(cfg))
    (data,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert data.info.status == "FINISHED" and data.data.metrics == {"loss": 1.0}


def test_killed_attempt_is_marked_killed_when_the_stage_opens_again(tmp_path: Path, _migrated_db: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, _migrated_db)
    uri, host = tracking_uri(cfg), socket.gethostname()
    tracker = Tracker(uri, cfg.tracking.experiment)
    parent = tracker.start_pipeline_run("exp")
    other_parent = tracker.start_pipeline_run("exp-other")
    dead, me = str(_dead_pid()), str(os.getpid())

    def running(stage: str, under, **tags: str):
        return tracker.start_stage_run(stage, under, tags={"versavit.config_hash": config_hash(cfg), **tags})

    stale = running("train", parent, **{HOST_TAG: host, PID_TAG: dead})
    live = running("train", parent, **{HOST_TAG: host, PID_TAG: me})
    elsewhere = running("train", parent, **{HOST_TAG: "another-host", PID_TAG: dead})
    untagged = running("train", parent)
    other_stage = running("eval", parent, **{HOST_TAG: host, PID_TAG: dead})
    other_run = running("train", other_parent, **{HOST_TAG: host, PID_TAG: dead})
    unparented = running("train", None, **{HOST_TAG: host, PID_TAG: dead})
    assert tracker.flush()
    monkeypatch.setenv(PARENT_RUN_ENV, parent.run_id)

    with stage_run(cfg, "train") as (_, new):
        pass
    client = MlflowClient(uri)
    status = {h: client.get_run(h.run_id).info.status for h in
              (stale, live, elsewhere, untagged, other_stage, other_run, unparented, new)}
    assert status.pop(stale) == "KILLED" and status.pop(new) == "FINISHED"
    assert set(status.values()) == {"RUNNING"}
    assert client.get_run(stale.run_id).data.tags[FAILURE_TAG].startswith(f"killed: process {dead} on ")

    monkeypatch.delenv(PARENT_RUN_ENV)  # without a parent: same stage and config hash
    with stage_run(cfg, "train"):
        pass
    assert client.get_run(unparented.run_id).info.status == "KILLED"
    assert client.get_run(other_run.run_id).info.status == "KILLED"  # same stage and config, process gone
    for h in (live, elsewhere, untagged, other_stage):
        assert client.get_run(h.run_id).info.status == "RUNNING"
    tracker.close()


def test_pid_alive() -> None:
    now_ms = int(time.time() * 1000)
    assert pid_alive(os.getpid(), now_ms) and not pid_alive(_dead_pid())
    if Path("/proc/self/stat").is_file():  # our pid, but for a run started an hour before we were: reused
        assert not pid_alive(os.getpid(), now_ms - 3_600_000)


def test_failed_attempt_logs_its_failure(tmp_path: Path, _migrated_db: Path) -> None:
    cfg = _cfg(tmp_path, _migrated_db)
    message = "cannot reach http://alice:s3cret@minio:9000/bucket\nsecond line " + "x" * 1000
    with pytest.raises(RuntimeError), stage_run(cfg, "eval") as (_, run):
        raise RuntimeError(message)
    got = MlflowClient(tracking_uri(cfg)).get_run(run.run_id)
    failure = got.data.tags[FAILURE_TAG]
    assert got.info.status == "FAILED" and len(failure) == 500
    assert failure.startswith("RuntimeError: cannot reach http://***@minio:9000/bucket second line xxx")
    assert "s3cret" not in failure and "\n" not in failure
    assert got.data.tags[HOST_TAG] == socket.gethostname() and got.data.tags[PID_TAG] == str(os.getpid())
