"""Tracker tests against throwaway SQLite stores (and a port with no server behind it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from versavit.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_ENV,
    Tracker,
    default_tracking_uri,
    flatten_config,
    lineage_tags,
)
from versavit.tracking.tracker import _redact

LOGGER = "versavit.tracking"
_ENV = ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tracker sets these process-wide with setdefault; start each test without them and
    # restore the original state afterwards (setenv first so undo also removes new ones).
    for var in _ENV:
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)


@pytest.fixture(scope="session")
def _migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Creating MLflow's schema costs ~1 s per database; build it once and copy it per test.
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def uri(tmp_path: Path, _migrated_db: Path) -> str:
    shutil.copy(_migrated_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path}/mlflow.db"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(LOGGER)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Spy:
    """Wraps an MlflowClient method, counting calls and optionally failing the first few."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, fail_first: int = 0):
        self.calls, self.fail_first = 0, fail_first
        original = getattr(MlflowClient, name)

        def wrapper(client, *args, **kwargs):
            self.calls += 1
            if self.calls <= self.fail_first:
                raise ConnectionError("simulated outage")
            return original(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, wrapper)


def test_parent_and_stage_runs(uri: str) -> None:
    tracker = Tracker(uri, "versavit-test")
    parent = tracker.start_pipeline_run("pipeline", tags={"owner": "ci"})
    with tracker.stage("train", parent=parent) as train:
        tracker.log_metrics(train, {"loss": 1.0}, step=0)
    with pytest.raises(RuntimeError, match="boom"), tracker.stage("eval", parent=parent) as ev:
        raise RuntimeError("boom")
    tracker.end_run(parent)
    assert tracker.close() == dict.fromkeys(tracker.unlogged_summary(), 0)

    client = MlflowClient(uri)
    p, t, e = (client.get_run(h.run_id) for h in (parent, train, ev))
    assert p.info.status == "FINISHED" and p.data.tags["owner"] == "ci"
    assert p.info.run_name == "pipeline"
    for run, stage, status in ((t, "train", "FINISHED"), (e, "eval", "FAILED")):
        assert run.data.tags["mlflow.parentRunId"] == parent.run_id
        assert run.data.tags["versavit.stage"] == stage
        assert run.info.status == status
        assert run.info.end_time is not None


def test_config_params_flattened_chunked_truncated(uri: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _Spy(monkeypatch, "log_batch")
    config = {
        "train": {"multitask": {"max_steps": 1000, "lr": 1e-4}, "tasks": ["depth", "seg"]},
        "layers": {f"l{i}": {"dim": i} for i in range(150)},
        "notes": "x" * 10_000,
        "empty": {},
    }
    flat = flatten_config(config)
    assert flat["train.multitask.max_steps"] == "1000"
    assert flat["train.tasks"] == "depth,seg" and flat["empty"] == "{}"  # a list reads as one value
    assert len(flat) == 155

    tracker = Tracker(uri, "versavit-test")
    run = tracker.start_pipeline_run("cfg")
    tracker.log_config(run, config)
    tracker.end_run(run)
    tracker.close()

    params = MlflowClient(uri).get_run(run.run_id).data.params
    assert len(params) == 155
    assert params["train.multitask.max_steps"] == "1000"
    assert params["layers.l149.dim"] == "149"
    assert params["notes"] == "x" * 6000
    assert spy.calls == 2  # 155 params -> chunks of 100 + 55


def test_metrics_are_batched(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _Spy(monkeypatch, "log_batch")
    single = _Spy(monkeypatch, "log_metric")
    tracker = Tracker(uri, "versavit-test", flush_every=200)
    run = tracker.start_pipeline_run("metrics")
    keys = ["loss/depth", "loss/seg", "loss/total", "lr", "grad_norm"]
    for step in range(100):  # 500 points
        tracker.log_metrics(run, {k: step * (i + 1) / 10 for i, k in enumerate(keys)}, step=step)
    tracker.end_run(run)
    tracker.close()

    assert single.calls == 0
    assert batch.calls <= 3  # flushes at 200 and 400, rest at end_run
    client = MlflowClient(uri)
    for i, key in enumerate(keys):
        history = sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(100))
        assert [m.value for m in history] == pytest.approx([s * (i + 1) / 10 for s in range(100)])


def test_time_based_flush(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _Spy(monkeypatch, "log_batch")
    tracker = Tracker(uri, "versavit-test", flush_every=10_000, flush_seconds=0.0)
    run = tracker.start_pipeline_run("slow-metrics")
    tracker.log_metrics(run, {"loss": 0.5}, step=1)
    assert batch.calls == 1 and tracker.unlogged_summary()["metrics"] == 0
    tracker.close()


def test_lineage(uri: str) -> None:
    tracker = Tracker(uri, "versavit-lineage")
    run = tracker.start_stage_run("warmup", parent=None)
    digest = "ab" * 32  # sha256 hex: longer than MLflow's 36-char digest column
    tracker.log_dataset(run, "sa1b-subset", "https://data.example/sa1b.tar", digest,
                        context="training", num_samples=1234)
    tags = lineage_tags("cfg123", {"pseudolabel": "abc123"}, kfp_run_id="kfp-42")
    tracker.set_tags(run, tags)
    tracker.end_run(run)
    tracker.close()

    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    (ds_input,) = got.inputs.dataset_inputs
    ds = ds_input.dataset
    assert (ds.name, ds.digest) == ("sa1b-subset", digest[:36])
    assert json.loads(ds.source)["url"] == "https://data.example/sa1b.tar"
    assert mlflow.data.get_source(ds).url == "https://data.example/sa1b.tar"  # resolvable
    assert json.loads(ds.profile) == {"digest": digest, "num_samples": 1234}
    assert {(t.key, t.value) for t in ds_input.tags} == {("mlflow.data.context", "training")}
    assert got.data.tags["versavit.config_hash"] == "cfg123"
    assert got.data.tags["versavit.upstream.pseudolabel"] == "abc123"
    assert got.data.tags["versavit.kfp_run_id"] == "kfp-42"
    if "mlflow.source.git.commit" in tags:  # only inside a git repo with a commit
        assert got.data.tags["mlflow.source.git.commit"] == tags["mlflow.source.git.commit"]
    exp = client.get_experiment_by_name("versavit-lineage")
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_artifact(uri: str, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"miou": 0.5}')
    tracker = Tracker(uri, "versavit-test")
    run = tracker.start_pipeline_run("art")
    tracker.log_artifact(run, str(report), artifact_path="eval")
    tracker.end_run(run)
    tracker.close()
    files = [f.path for f in MlflowClient(uri).list_artifacts(run.run_id, "eval")]
    assert files == ["eval/report.json"]
    assert (tmp_path / "mlartifacts").is_dir()  # next to the DB, not in the cwd


def test_attach_run_from_second_process(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    orchestrator = Tracker(uri, "versavit-test")
    parent = orchestrator.start_pipeline_run("pipeline")
    parent_id = orchestrator.run_id(parent)
    assert parent_id
    monkeypatch.setenv(PARENT_RUN_ENV, parent_id)

    worker = Tracker(uri, "versavit-test")  # as if in the stage's own pod
    attached = worker.parent_from_env()
    assert attached is not None and attached.run_id == parent_id
    with worker.stage("pseudolabel", parent=attached) as stage:
        worker.log_metrics(stage, {"images": 10}, step=0)
    worker.close()
    orchestrator.end_run(parent)
    orchestrator.close()

    client = MlflowClient(uri)
    assert client.get_run(stage.run_id).data.tags["mlflow.parentRunId"] == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert len(client.search_experiments(filter_string="name = 'versavit-test'")) == 1


def test_server_down_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    attempts = _Spy(monkeypatch, "get_experiment_by_name")
    down = f"http://user:secret@127.0.0.1:{_free_port()}"
    start = time.monotonic()
    tracker = Tracker(down, "versavit-test", pending_dir=str(tmp_path / "pending"))
    parent = tracker.start_pipeline_run("pipeline")
    with tracker.stage("train", parent=parent) as run:
        tracker.log_config(run, {"train": {"lr": 0.1, "steps": 500}})
        tracker.set_tags(run, {"versavit.config_hash": "h"})
        for step in range(500):
            tracker.log_metrics(run, {"loss": 1.0 / (step + 1)}, step=step)
        tracker.log_artifact(run, str(tmp_path / "missing-yet.pt"))
    tracker.end_run(parent)
    assert len(_warnings(caplog)) == 1
    assert attempts.calls == 1  # backoff: no retry storm during the stage
    warning = _warnings(caplog)[0].getMessage()
    assert "127.0.0.1" in warning and "MlflowException" in warning and "secret" not in warning

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    summary = tracker.close()
    elapsed = time.monotonic() - start
    assert elapsed < 20
    assert summary == {"runs": 2, "params": 2, "tags": 1, "metrics": 500, "datasets": 0,
                       "artifacts": 1, "models": 0, "run_ends": 2}
    assert tracker.unlogged_summary() == summary
    records = _warnings(caplog)
    assert len(records) == 2
    assert "500 metrics" in records[1].getMessage() and "secret" not in records[1].getMessage()
    (pending,) = (tmp_path / "pending").glob("pending-*.jsonl")
    lines = [json.loads(line) for line in pending.read_text().splitlines()]
    assert [op["op"] for op in lines[:2]] == ["create", "create"]
    assert sum(len(op["data"]) for op in lines if op["op"] == "metrics") == 500
    assert "secret" not in pending.read_text()


def test_hanging_server_costs_bounded_time(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections but never answers: each attempt waits the timeout."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # setdefault keeps it
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)  # connections complete in the backlog; nothing ever reads
        tracker = Tracker(f"http://127.0.0.1:{server.getsockname()[1]}", "versavit-test",
                          retry_seconds=15)
        start = time.monotonic()
        with tracker.stage("train", parent=None) as run:
            for step in range(1000):
                tracker.log_metrics(run, {"loss": 1.0}, step=step)
        stage_seconds = time.monotonic() - start
        summary = tracker.close()
    assert stage_seconds < 5  # one timed-out attempt, then backoff
    assert summary["metrics"] == 1000 and summary["runs"] == 1
    assert len(_warnings(caplog)) == 2  # the outage + the close summary


def test_server_comes_back(uri: str, caplog: pytest.LogCaptureFixture,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    create = _Spy(monkeypatch, "create_run", fail_first=2)
    batch = _Spy(monkeypatch, "log_batch", fail_first=3)
    tracker = Tracker(uri, "versavit-test", flush_every=50, retry_seconds=0)
    parent = tracker.start_pipeline_run("pipeline")
    assert parent.run_id is None  # handle usable before the run exists
    with tracker.stage("multitask", parent=parent) as run:
        tracker.log_config(run, {"a": 1, "b": {"c": 2}})
        for step in range(200):
            tracker.log_metrics(run, {"loss": float(step)}, step=step)
    tracker.end_run(parent)
    assert tracker.close() == dict.fromkeys(tracker.unlogged_summary(), 0)
    assert create.calls >= 4 and batch.calls > 3
    assert len(_warnings(caplog)) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)

    client = MlflowClient(uri)
    got = client.get_run(run.run_id)
    assert got.data.params == {"a": "1", "b.c": "2"}
    assert got.data.tags["mlflow.parentRunId"] == parent.run_id
    assert got.info.status == "FINISHED"
    history = client.get_metric_history(run.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(200))
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_rejected_operations_do_not_block(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    tracker = Tracker(uri, "versavit-test")
    ghost = tracker.attach_run("0" * 32)  # no such run: a permanent error, not an outage
    tracker.set_tags(ghost, {"a": "b"})
    run = tracker.start_pipeline_run("real")
    tracker.log_metrics(run, {"loss": 0.1, "bad": "not-a-number"}, step=0)
    tracker.end_run(run)
    summary = tracker.close()
    assert summary["tags"] == 1 and summary["metrics"] == 1 and summary["runs"] == 0
    assert MlflowClient(uri).get_run(run.run_id).data.metrics == {"loss": 0.1}
    assert "none retryable" in _warnings(caplog)[-1].getMessage()


def test_disabled_and_rank(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    off = Tracker.for_rank(1, tracking_uri=uri, experiment="x")
    assert not off.enabled and Tracker.for_rank(0, tracking_uri=uri, experiment="x").enabled
    run = off.start_pipeline_run("p")
    with off.stage("train", parent=run) as stage:
        off.log_config(stage, {"a": 1})
        off.log_metrics(stage, {"loss": 1.0}, step=0)
    assert off.close() == dict.fromkeys(off.unlogged_summary(), 0)
    assert stage.run_id is None and not (tmp_path / "mlflow.db").exists()


def test_helpers(tmp_path: Path) -> None:
    assert default_tracking_uri(str(tmp_path / "w")) == f"sqlite:///{tmp_path}/w/mlflow.db"
    assert (tmp_path / "w").is_dir()
    assert _redact("https://alice:pw@mlflow.example:5000/x") == "https://***@mlflow.example:5000/x"
    assert flatten_config({"a": [{"b": None}], "c": ()}) == {"a.0.b": "None", "c": "()"}
    # lists of plain values read as one value; lists of named mappings are keyed by name
    assert flatten_config({"t": ["caption", "depth"], "r": [{"name": "coarse", "lr": 1}, {"name": "fine", "lr": 2}],
                           "m": [[1, 2], 3]}) == {"t": "caption,depth", "r.coarse.name": "coarse", "r.coarse.lr": "1",
                                                  "r.fine.name": "fine", "r.fine.lr": "2", "m.0": "1,2", "m.1": "3"}


def test_register_model_versions(tmp_path: Path, _migrated_db: Path) -> None:
    from versavit.tracking import Tracker

    shutil.copy(_migrated_db, tmp_path / "reg.db")
    uri = f"sqlite:///{tmp_path}/reg.db"
    tracker = Tracker(uri, "versavit-test")
    run = tracker.start_pipeline_run("p")
    tracker.register_model(run, "tiny-backbone", str(tmp_path / "export" / "backbone"))
    tracker.register_model(run, "tiny-backbone", str(tmp_path / "export2" / "backbone"))
    tracker.end_run(run)
    assert not any(tracker.close().values())
    from mlflow.tracking import MlflowClient

    versions = MlflowClient(uri).search_model_versions("name='tiny-backbone'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {run.run_id}
