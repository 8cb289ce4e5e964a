"""The stages of a run, in order, on this machine, tracked in MLflow.

`versavit pipeline run --local` calls `run_local`: one MLflow parent run, a nested run per stage.
Stages meet at URLs and manifests: `data` writes shard datasets under `<workdir>/data/`, the next
stage reads them by URL. Stages that are not built yet are not listed; the KFP local runner will
take over the ordering once the pipeline definitions exist.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from versavit import storage
from versavit.config import RunConfig, config_hash, config_to_dict
from versavit.data.build import build_synthetic, synthetic_root
from versavit.data.inspect import inspect_dataset
from versavit.data.shards import Manifest, read_manifest
from versavit.progress import per_name, progress_bar
from versavit.tracking import RunHandle, Tracker, default_tracking_uri, lineage_tags


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
                                             workers=cfg.data.num_workers if workers is None else workers))
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
            res = inspect_dataset([m.url], num_workers=cfg.data.num_workers,
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


def run_local(cfg: RunConfig, console: Console | None = None) -> dict[str, Any]:
    """Run every stage that exists, in order, as one tracked pipeline run."""
    console = console or Console(stderr=True)
    storage.configure(cfg.storage)
    storage.ensure_bucket(cfg.workdir)
    tracker = make_tracker(cfg)
    started = time.perf_counter()
    lineage = lineage_tags(config_hash(cfg), kfp_run_id=os.environ.get("KFP_RUN_ID"))
    parent = tracker.start_pipeline_run(cfg.name, tags={**lineage,
                                                         "versavit.workdir": cfg.workdir})
    tracker.log_config(parent, config_to_dict(cfg))
    status = "FAILED"
    try:
        with tracker.stage("data", parent) as data_run:
            manifests = run_data(cfg, tracker, data_run, console)
        data_id = tracker.run_id(data_run) or ""
        with tracker.stage("data_check", parent, tags={"versavit.upstream.data": data_id}) as check_run:
            checks = run_data_check(cfg, tracker, check_run, manifests)
        status = "FINISHED"
    finally:
        tracker.end_run(parent, status)
        parent_id = tracker.run_id(parent)
        unlogged = tracker.close()
    table = Table(title=f"versavit pipeline: {cfg.name} ({time.perf_counter() - started:.0f} s)")
    for col in ("split", "samples", "shards", "skipped", "samples/s", "objects/image (n:count)", "depth (m)"):
        table.add_column(col)
    for split, r in checks.items():
        table.add_row(split, str(r["num_samples"]), str(r["num_shards"]), str(r["skipped"]),
                      f"{r['samples_per_s']:.0f}",
                      " ".join(f"{k}:{v}" for k, v in r["objects_per_image"].items()),
                      f"{r['depth_range'][0]:.2f}-{r['depth_range'][1]:.2f}")
    uri = tracking_uri(cfg)
    console.print(table)
    shown_id = parent_id or "(not created: tracking server unreachable)"
    console.print(f"MLflow: parent run {shown_id} in experiment {cfg.tracking.experiment!r} at {uri}")
    if uri.startswith("sqlite:"):
        console.print(f"  open the UI: versavit ui --config <this config>  (or: mlflow ui --backend-store-uri {uri})")
    if any(unlogged.values()):
        console.print(f"[yellow]tracking: not logged: {unlogged}[/yellow]")
    return {"parent_run_id": parent_id, "manifests": manifests, "checks": checks, "unlogged": unlogged}
