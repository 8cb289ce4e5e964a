"""The `versavit` command line: data synth to a folder and to S3, clear errors, help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from versavit.data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "versavit.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


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
