"""The GPU benches run at tiny size on the CPU (issue 14): bench/gpu_memory.py prints the measured bytes next to
the plan's (here: bytes saved for backward, within 15%), bench/gpu_step.py per-task samples/s and MFU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gpu_memory_tiny_prints_measured_next_to_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = _bench("gpu_memory").main(["--tiny", "--stage", "multitask", f"workdir={tmp_path}"])
    out = capsys.readouterr().out
    assert "planned GiB" in out and "measured GiB" in out and "bytes saved for backward" in out
    assert [r["task"] for r in rows] == ["caption", "depth", "refseg"]
    for r in rows:
        assert 0.85 <= r["ratio"] <= 1.15, r
        assert r["params_planned"] == r["params_measured"]


def test_gpu_step_tiny_prints_samples_per_second_and_mfu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = _bench("gpu_step").main(["--tiny", "--steps", "1", "--warmup", "0", f"workdir={tmp_path}"])
    out = capsys.readouterr().out
    assert "samples/s" in out and "MFU" in out and "FlopCounterMode" in out and "multi-task step" in out
    assert set(res["tasks"]) == {"caption", "depth", "refseg"}
    for r in res["tasks"].values():
        assert r["flops_per_sample"] > 0 and r["samples_per_s"] > 0 and 0 < r["mfu"] < 1
