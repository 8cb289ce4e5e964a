"""The `versavit` command line: data synth to a folder and to S3, one-line errors, help, version, ui."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from versavit.data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # a wide terminal: an error line must be one line because it is, not because rich wrapped it
    return subprocess.run([sys.executable, "-m", "versavit.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})})


def small_config(tmp_path: Path) -> str:
    """A config of defaults with its workdir under tmp_path (not created)."""
    path = tmp_path / "cli.yaml"
    path.write_text(f"name: cli-test\nworkdir: {tmp_path / 'run'}\n")
    return str(path)


def test_help_lists_commands() -> None:
    res = cli("--help")
    assert res.returncode == 0
    for word in ("config", "data", "pipeline", "ui"):
        assert word in res.stdout


def test_data_synth_local(tmp_path: Path) -> None:
    out = tmp_path / "world"
    res = cli("data", "synth", "--out", str(out), "--num-samples", "20", "--num-val", "4", "--seed", "3",
              "--image-size", "64", "--samples-per-shard", "8", "--workers", "2")
    assert res.returncode == 0, res.stderr
    train, val = read_manifest(str(out / "train")), read_manifest(str(out / "val"))
    assert (train.num_samples, len(train.shards), val.num_samples) == (20, 3, 4)
    assert train.meta["seed"] == 3 and train.meta["image_size"] == 64
    assert {"rgb.jpg", "depth.png", "inst.png", "sem.png", "json"} <= set(train.fields)

    # deterministic: the same command elsewhere gives byte-identical shards
    res = cli("data", "synth", "--out", str(tmp_path / "again"), "--num-samples", "20", "--num-val", "4",
              "--seed", "3", "--image-size", "64", "--samples-per-shard", "8", "--workers", "0")
    assert res.returncode == 0, res.stderr
    assert read_manifest(str(tmp_path / "again" / "train")).digest == train.digest


def test_data_synth_to_s3(s3: str) -> None:
    env = {"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    res = cli("data", "synth", "--out", "s3://cli-bucket/world", "-n", "6", "--num-val", "2",
              "--image-size", "48", "--workers", "0", env=env)
    assert res.returncode == 0, res.stderr
    assert "testing-secret" not in res.stdout + res.stderr
    assert read_manifest("s3://cli-bucket/world/train").num_samples == 6


def test_data_synth_unreachable_endpoint_is_one_clear_error(tmp_path: Path, free_tcp_port: int) -> None:
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_tcp_port}", "AWS_ACCESS_KEY_ID": "a",
           "AWS_SECRET_ACCESS_KEY": "b"}
    res = cli("data", "synth", "--out", "s3://nobucket/world", "-n", "2", "--workers", "0", env=env)
    assert res.returncode == 1
    assert "cannot reach the S3 endpoint" in res.stderr and "Traceback" not in res.stderr


def test_bare_command_and_group_print_help_exit_0() -> None:
    for args in ((), ("data",)):
        res = cli(*args)
        assert res.returncode == 0, res.stderr
        assert "Usage" in res.stdout and "error" not in res.stderr
    assert "synth" in res.stdout


def test_version() -> None:
    res = cli("--version")
    assert (res.returncode, res.stdout) == (0, f"versavit {version('versavit')}\n")


@pytest.mark.parametrize(("args", "line"), [
    (("pipline", "run"), "error: No such command 'pipline'. Did you mean 'pipeline'?"),
    (("pipeline", "rn"), "error: No such command 'rn'. Did you mean 'run'?"),
])
def test_unknown_command_is_one_line_with_a_suggestion(args: tuple[str, ...], line: str) -> None:
    res = cli(*args)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [line] and res.stdout == ""


@pytest.mark.parametrize(("args", "start"), [
    (("pipeline", "submit"), "error: Missing option '--host'."),  # data synth's --out has a default now
    (("data", "synth", "--out", "X", "-n", "-3"), "error: Invalid value for '--num-samples' / '-n': "),
    (("data", "synth", "--out", "X", "-n", "many"), "error: Invalid value for '--num-samples' / '-n': "),
    (("data", "synth", "--out", "X", "--bogus"), "error: No such option: --bogus"),
])
def test_usage_error_is_one_line_exit_2(args: tuple[str, ...], start: str) -> None:
    res = cli(*args)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), res.stderr
    assert res.stdout == ""


def test_bad_config_still_names_each_problem(tmp_path: Path) -> None:
    res = cli("config", "validate", "--config", small_config(tmp_path), "train.seed=abc")
    assert res.returncode == 2
    first, *problems = res.stderr.splitlines()
    assert first.startswith("error: invalid configuration (") and first.endswith("): 1 problem(s)")
    assert len(problems) == 1 and problems[0].strip().startswith("train.seed = 'abc':")


def test_unwritable_out_is_one_line_exit_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    for out, reason in ((tmp_path / "file" / "x", "Not a directory"), ("/proc/versavit-test", "")):
        res = cli("data", "synth", "--out", str(out), "-n", "2", "--workers", "0", "--config", small_config(tmp_path))
        assert res.returncode == 1
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith(f"error: cannot write {out}: {reason}")
        assert lines[0].endswith(" (choose a writable --out / workdir)")


def test_ui_refuses_a_missing_store_and_does_not_create_it(tmp_path: Path) -> None:
    db = (tmp_path / "run" / "mlflow.db").resolve()
    for _ in ("no workdir", "an empty workdir"):
        res = cli("ui", "--config", small_config(tmp_path))
        assert res.returncode == 1
        assert res.stderr.splitlines() == [f"error: no MLflow store at {db}: run a pipeline first, or pass "
                                           "tracking.uri=..."]
        assert not db.exists()
        db.parent.mkdir(exist_ok=True)
    res = cli("ui", "--config", small_config(tmp_path), f"tracking.uri=sqlite:///{tmp_path / 'other.db'}")
    assert res.returncode == 1 and "no MLflow store at" in res.stderr
    assert not tmp_path.joinpath("other.db").exists()


def test_ui_refuses_a_busy_port(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").touch()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = cli("ui", "--config", small_config(tmp_path), "--port", str(port),
                  f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"error: port {port} on 127.0.0.1 is in use: pass --port N"]


def test_ui_exit_status_is_mlflows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from versavit import storage
    from versavit.cli import app

    monkeypatch.setattr(storage, "_config", storage._config)  # restored after the CLI configures storage
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv, env: calls.append(argv) or 3)  # mlflow failed
    (tmp_path / "mlflow.db").touch()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with socket.socket() as probe:  # a port free now, for `ui` to find free (mlflow itself never starts here)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = CliRunner().invoke(app, ["ui", "--config", small_config(tmp_path), "--port", str(port),
                                      f"tracking.uri={uri}"])
    assert result.exit_code == 3, result.output
    assert calls and calls[0][-6:] == ["--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)]


def test_tracking_replay_server_still_down_is_one_line_exit_1(tmp_path: Path, free_tcp_port: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from versavit.tracking import Tracker

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # Tracker sets them: undo
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)
    pending = tmp_path / "pending"
    tracker = Tracker(f"http://127.0.0.1:{free_tcp_port}", "cli-test", pending_dir=str(pending))
    parent = tracker.start_pipeline_run("pipeline")
    with tracker.stage("train", parent=parent) as run:
        for step in range(40):
            tracker.log_metrics(run, {"loss": float(step)}, step=step)
    tracker.end_run(parent)
    tracker.close()
    (name,) = (p.name for p in pending.glob("pending-*.jsonl"))

    # the server is still down: one line, exit 1, the file stays (a real process: stderr is what a user sees)
    down = cli("tracking", "replay", str(pending), "--config", small_config(tmp_path))
    assert down.returncode == 1
    lines = down.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow at http://127.0.0.1:{free_tcp_port} unreachable: ")
    assert lines[0].endswith(f"5 record(s) in 1 file(s) kept in {pending}: run `versavit tracking replay` again later")
    assert (pending / name).is_file()
    # the success case (exit 0, one line per file) is in tests/tracking/test_replay.py, in-process
