"""Shared fixtures: a moto S3 server on 127.0.0.1 (optionally checking signatures), the CLI in-process."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator

import pytest

# Nothing is downloaded in tests (no hub access here, nor in CI): a hub id that is not on disk fails at
# once instead of after the hub client's connection retries (23 s per lookup). Set before any test
# module imports huggingface_hub; subprocesses inherit it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from versavit import storage  # noqa: E402
from versavit.config.schema import StorageConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_tcp_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections for the whole test (unreachable-server tests): bound by this
    fixture and never listened on, so no server another test starts meanwhile (xdist runs two at once) can take it;
    a port merely found free could be, and the "unreachable" server then answered."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server bound to 127.0.0.1 on a free port; stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Storage pointed at the moto server with test credentials; yields the endpoint."""
    import requests

    requests.post(f"{s3_server}/moto-api/reset")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    storage.configure(StorageConfig(s3_endpoint_url=s3_server))
    yield s3_server
    storage.configure(StorageConfig())


@pytest.fixture
def cli_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Callable[..., tuple[int, str]]:
    """`versavit ARGS...` through the CLI's own `main()` in this process; returns (exit status, stdout + stderr).

    `main()` is what a `versavit` process runs (its error lines and exit statuses included); a fresh process
    would first spend seconds importing torch, transformers and MLflow, which this process has done already.
    What `main()` changes process-wide (argv, logging, the storage configuration) is restored afterwards.
    """
    from versavit import cli

    monkeypatch.setattr(storage, "_config", storage._config)  # restored after the CLI configures storage
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal, as the subprocess tests have

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["versavit", *args])
        loggers = [logging.getLogger(name) for name in ("", "alembic", "botocore", "urllib3", "s3fs", "aiobotocore",
                                                         "mlflow.store")]
        saved = [(lg, lg.level, list(lg.handlers)) for lg in loggers]
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        finally:
            for lg, level, handlers in saved:
                lg.setLevel(level)
                lg.handlers[:] = handlers
        out = capsys.readouterr()
        return code, out.out + out.err

    return run


@pytest.fixture(scope="session")
def local_pipeline(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - pipeline_run.PipelineRun
    """The shrunk tiny pipeline run once per session (tests/pipeline_run.py), shared by the end-to-end tests that
    read its MLflow store and reports; a test that changes the store works on a copy."""
    from pipeline_run import run_shrunk_pipeline

    return run_shrunk_pipeline(tmp_path_factory.mktemp("pipeline") / "run")
