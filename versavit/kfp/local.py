"""Running a pipeline on this machine: the KFP pipeline (pipelines/) under KFP's local runner, one
MLflow parent run with a nested run per stage. Stages meet at URLs and manifests."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from versavit import layout, storage
from versavit.config import RunConfig
from versavit.tracking import tracking_uri


def run_local(cfg: RunConfig, pipeline: str = "versavit", console: Console | None = None) -> dict[str, Any]:
    """Run a KFP pipeline on this machine with KFP's local runner (subprocesses, this Python).

    Training stages become local torchrun launches; MLflow is the config's URI (a SQLite file in
    the workdir by default). Prints the comparison table and how to open the MLflow UI.
    """
    from kfp import local

    from pipelines import PIPELINES

    console = console or Console(stderr=True)
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; expected one of {sorted(PIPELINES)}")
    if storage.is_remote(cfg.workdir):
        raise ValueError("a local pipeline run needs a local workdir (KFP's local runner cannot use s3:// as its "
                         "pipeline root); use `versavit pipeline submit` for s3:// workdirs")
    storage.configure(cfg.storage)
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(update={"workdir": str(workdir)})  # components run with their own cwd
    started = time.perf_counter()
    logging.getLogger("kfp").setLevel(logging.WARNING)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(layout.kfp_local_root(workdir)),
               raise_on_error=True)
    PIPELINES[pipeline](cfg)()
    elapsed = time.perf_counter() - started
    report = layout.reports_dir(cfg, "eval") / "comparison.md"
    if report.is_file():
        console.print(report.read_text())
    uri = tracking_uri(cfg)
    console.print(f"pipeline {pipeline!r} finished in {elapsed / 60:.1f} min; MLflow runs in experiment "
                  f"{cfg.tracking.experiment!r} at {uri}")
    if uri.startswith("sqlite:"):
        console.print(f"  open the UI: versavit ui workdir={workdir}  (or: mlflow ui --backend-store-uri {uri})")
    return {"elapsed_s": elapsed, "report": str(report) if report.is_file() else None}
