"""`versavit train STAGE --dry-run`: the cluster job a launch would create, printed as YAML, nothing created."""

from __future__ import annotations

import subprocess
import sys

import jsonschema
import pytest
import yaml
from launch_helpers import ROOT, crd_schema


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "versavit.cli", "train", *args, "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("backend", "kind"), [("pytorchjob", "PyTorchJob"), ("trainjob", "TrainJob")])
def test_dry_run_prints_a_valid_job_of_the_configured_backend(backend: str, kind: str) -> None:
    res = dry_run("multitask", "--config", "configs/paper.yaml", f"launch.backend={backend}")
    assert res.returncode == 0, res.stderr
    job = yaml.safe_load(res.stdout)  # the leading comment line is YAML too
    assert job["kind"] == kind and job["metadata"]["namespace"] == "versavit"
    jsonschema.validate(job, crd_schema(kind))
    assert "s3://versavit/runs/paper/launch/multitask/" in res.stdout  # where its pods read the config
    assert "AWS_SECRET_ACCESS_KEY" in res.stdout and "secretKeyRef" in res.stdout  # by secret name only


def test_dry_run_of_a_local_config_is_a_usage_error() -> None:
    res = dry_run("warmup", "--config", "configs/tiny.yaml")
    assert res.returncode == 2
    out = res.stderr + res.stdout
    assert out.count("\n") <= 1 and "launch.backend=pytorchjob" in out
