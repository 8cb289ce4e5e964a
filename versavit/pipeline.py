"""Running pipelines on this machine, and the data stages' library functions.

`versavit pipeline run --local` calls `run_local`: the KFP pipeline (pipelines/) under KFP's local
runner, one MLflow parent run with a nested run per stage. Stages meet at URLs and manifests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from versavit import storage
from versavit.config import RunConfig
from versavit.data.build import build_synthetic, synthetic_root
from versavit.data.inspect import inspect_dataset
from versavit.data.loader import loader_workers
from versavit.data.shards import Manifest, read_manifest
from versavit.progress import per_name, progress_bar
from versavit.tracking import RunHandle, Tracker, default_tracking_uri


def tracking_uri(cfg: RunConfig) -> str:
    """The config's MLflow URI, or a SQLite file in the (local) workdir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    local = cfg.workdir if not storage.is_remote(cfg.workdir) else f"runs/{cfg.name}"
    return default_tracking_uri(local)


def make_tracker(cfg: RunConfig, rank: int = 0) -> Tracker:
    pending = None if storage.is_remote(cfg.workdir) else str(Path(cfg.workdir) / "mlflow-pending")
    return Tracker.for_rank(rank, tracking_uri=tracking_uri(cfg), experiment=cfg.tracking.experiment,
                            enabled=cfg.tracking.enabled, pending_dir=pending)


def reports_dir(cfg: RunConfig, stage: str) -> Path:
    """A local folder for a stage's figures and tables (the workdir, or ./runs/<name> for s3://)."""
    root = Path(cfg.workdir) if not storage.is_remote(cfg.workdir) else Path("runs") / cfg.name
    path = root / "reports" / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def _reusable(url: str, wanted: dict[str, Any]) -> Manifest | None:
    """A finished dataset written with the same settings (so a rerun does not redo it)."""
    try:
        manifest = read_manifest(url)
    except (storage.StorageError, ValueError):
        return None
    same = all(manifest.meta.get(k) == v for k, v in wanted.items())
    return manifest if same else None


def run_data(cfg: RunConfig, tracker: Tracker, run: RunHandle, console: Console | None = None,
             workers: int | None = None) -> dict[str, Manifest]:
    """Stage `data`: render the synthetic world's train/val shards (or reuse identical ones)."""
    root = synthetic_root(cfg.workdir)
    syn = cfg.data.synthetic
    manifests: dict[str, Manifest] = {}
    for split in ("train", "val"):
        if (m := _reusable(storage.join(root, split), syn.model_dump())) is not None:
            manifests[split] = m
    missing = tuple(s for s in ("train", "val") if s not in manifests)
    start = time.perf_counter()
    if missing:
        with progress_bar() as bar:
            manifests.update(build_synthetic(root, syn, splits=missing, progress=per_name(bar, "render"),
                                             workers=loader_workers(cfg.data.num_workers, training=False)
                                             if workers is None else workers))
    elif console:
        console.print(f"data: reusing the synthetic world at {root} (same settings)")
    elapsed = time.perf_counter() - start
    rendered = sum(manifests[s].num_samples for s in missing)
    tracker.log_config(run, {"data": cfg.data.model_dump(mode="json")})
    for split, m in manifests.items():
        tracker.log_dataset(run, f"synthetic-{split}", m.url, m.digest, context=split,
                            num_samples=m.num_samples)
    tracker.log_metrics(run, {"data/rendered": rendered, "data/render_s": elapsed,
                              **{f"data/{s}_samples": m.num_samples for s, m in manifests.items()}}, step=0)
    tracker.set_tags(run, {"versavit.output_url": root})
    return manifests


def run_data_check(cfg: RunConfig, tracker: Tracker, run: RunHandle, manifests: dict[str, Manifest],
                   ) -> dict[str, Any]:
    """Stage `data_check`: read every split back through the training reader; stats + preview.

    Figures and statistics are written under `<workdir>/reports/data_check/` (kept even when the
    tracking server is down) and logged as artifacts of the stage run.
    """
    results: dict[str, Any] = {}
    tmp = reports_dir(cfg, "data_check")
    with progress_bar() as bar:
        for split, m in manifests.items():
            task = bar.add_task(f"read {split}", total=m.num_samples)
            res = inspect_dataset([m.url], num_workers=loader_workers(cfg.data.num_workers, training=False),
                                  max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                                  progress=lambda n, t=task: bar.update(t, completed=n))
            preview = res.pop("preview")
            if preview is not None:
                path = tmp / f"preview-{split}.png"
                preview.save(path)
                tracker.log_artifact(run, str(path), "previews")
            stats_path = tmp / f"stats-{split}.json"
            stats_path.write_text(json.dumps(res, indent=1, default=str))
            tracker.log_artifact(run, str(stats_path), "stats")
            tracker.log_dataset(run, f"synthetic-{split}", m.url, m.digest, context=split,
                                num_samples=m.num_samples)
            tracker.log_metrics(run, {f"data_check/{split}_samples": res["num_samples"],
                                      f"data_check/{split}_skipped": res["skipped"],
                                      f"data_check/{split}_samples_per_s": res["samples_per_s"]}, step=0)
            results[split] = res
    return results


def run_local(cfg: RunConfig, pipeline: str = "versavit", console: Console | None = None) -> dict[str, Any]:
    """Run a KFP pipeline on this machine with KFP's local runner (subprocesses, this Python).

    Training stages become local torchrun launches; MLflow is the config's URI (a SQLite file in
    the workdir by default). Prints the comparison table and how to open the MLflow UI.
    """
    import logging

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
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(workdir / "kfp-local"),
               raise_on_error=True)
    PIPELINES[pipeline](cfg)()
    elapsed = time.perf_counter() - started
    report = workdir / "reports" / "eval" / "comparison.md"
    if report.is_file():
        console.print(report.read_text())
    uri = tracking_uri(cfg)
    console.print(f"pipeline {pipeline!r} finished in {elapsed / 60:.1f} min; MLflow runs in experiment "
                  f"{cfg.tracking.experiment!r} at {uri}")
    if uri.startswith("sqlite:"):
        console.print(f"  open the UI: versavit ui workdir={workdir}  (or: mlflow ui --backend-store-uri {uri})")
    return {"elapsed_s": elapsed, "report": str(report) if report.is_file() else None}
