"""Shared fixtures: a moto S3 server on 127.0.0.1 (optionally checking signatures)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

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
def free_tcp_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for unreachable-server tests)."""
    return free_port()


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
