"""versavit.layout: every URL and path of a run from one module, with no torch behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from versavit import layout
from versavit.config import RunConfig


def test_local_workdir_holds_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(layout.EVAL_CACHE_ENV, raising=False)
    cfg = RunConfig(name="exp", workdir=str(tmp_path))
    assert layout.local_root(cfg) == tmp_path
    assert layout.stage_url(cfg, "multitask") == f"{tmp_path}/stages/multitask"
    assert layout.stage_url(cfg, "multitask", "caption") == f"{tmp_path}/stages/multitask-caption"
    assert layout.stage_manifest_url(cfg, "warmup") == f"{tmp_path}/stages/warmup/stage.json"
    assert layout.export_url(cfg, "multitask", "all") == f"{tmp_path}/stages/multitask-all/export"
    assert layout.synthetic_root(cfg.workdir) == f"{tmp_path}/data/synthetic"
    assert layout.labelled_root(cfg.workdir) == f"{tmp_path}/data/labelled"
    assert layout.label_step_url(cfg.workdir, "depth", "val") == f"{tmp_path}/data/labelled-depth/val"
    assert layout.reports_dir(cfg, "eval") == tmp_path / "reports" / "eval"
    assert (tmp_path / "reports" / "eval").is_dir()  # created: stages write into it at once
    assert layout.eval_cache_dir(cfg) == tmp_path / "cache" / "eval"
    assert layout.tracking_pending_dir(cfg) == tmp_path / "mlflow-pending"


def test_s3_workdir_keeps_local_things_under_runs_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(layout.EVAL_CACHE_ENV, raising=False)
    cfg = RunConfig(name="paper", workdir="s3://bucket/exp")
    assert layout.stage_url(cfg, "warmup") == "s3://bucket/exp/stages/warmup"
    assert layout.synthetic_root(cfg.workdir) == "s3://bucket/exp/data/synthetic"
    assert layout.local_root(cfg) == Path("runs/paper")
    assert layout.reports_dir(cfg, "data_check") == Path("runs/paper/reports/data_check")
    assert layout.eval_cache_dir(cfg) == Path("runs/paper/cache/eval")
    monkeypatch.setenv(layout.EVAL_CACHE_ENV, str(tmp_path / "shared-cache"))
    assert layout.eval_cache_dir(cfg) == tmp_path / "shared-cache"


def test_the_layout_and_the_ground_layer_import_no_torch() -> None:
    """What launches jobs or resolves URLs must not pay for torch (or DeepSpeed) at import."""
    code = ("import sys, versavit.layout, versavit.tracking, versavit.launch.base; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == "[]"
