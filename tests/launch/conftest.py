"""Fixtures for the launcher tests: the Kubernetes API stub, the CRD schemas, cluster-style configs."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from k8s_stub import KubeApiStub
from launch_helpers import ROOT, cluster_overrides

from versavit import storage
from versavit.config import RunConfig, load_config
from versavit.layout import stage_manifest_url


@pytest.fixture
def kube() -> Iterator[KubeApiStub]:
    stub = KubeApiStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def kube_config(kube: KubeApiStub) -> Any:
    from kubernetes.client import Configuration

    conf = Configuration()
    conf.host = kube.url
    return conf


@pytest.fixture
def cluster_cfg(s3: str) -> Callable[[str], RunConfig]:
    """The tiny config switched to a cluster backend, its workdir on the moto S3 server, and a
    stage.json in place as if the pods had written it."""

    def make(backend: str, stage: str = "multitask") -> RunConfig:
        workdir = f"s3://launch-tests/{uuid.uuid4().hex[:8]}"
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [f"workdir={workdir}", f"storage.s3_endpoint_url={s3}", *cluster_overrides(backend)])
        storage.configure(cfg.storage)
        storage.ensure_bucket(workdir)
        outputs = {"stage": stage, "steps": 60}
        storage.write_text(stage_manifest_url(cfg, stage), json.dumps(outputs))
        return cfg

    return make
