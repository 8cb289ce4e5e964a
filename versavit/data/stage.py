"""The data stages' bodies: render the synthetic world (or reuse it), and read a dataset back
through the training reader (statistics and a preview). `versavit.stages` wraps them in runs."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console

from versavit import layout, storage
from versavit.config import RunConfig
from versavit.data.build import build_synthetic
from versavit.data.inspect import inspect_dataset
from versavit.data.loader import loader_workers
from versavit.data.shards import Manifest, read_manifest
from versavit.progress import per_name, progress_bar
from versavit.tracking import RunHandle, Tracker

SPLITS = ("train", "val")


def reusable(url: str, wanted: dict[str, Any]) -> Manifest | None:
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
    root = layout.synthetic_root(cfg.workdir)
    syn = cfg.data.synthetic
    manifests: dict[str, Manifest] = {}
    for split in SPLITS:
        if (m := reusable(storage.join(root, split), syn.model_dump())) is not None:
            manifests[split] = m
    missing = tuple(s for s in SPLITS if s not in manifests)
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
    tmp = layout.reports_dir(cfg, "data_check")
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
