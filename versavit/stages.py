"""The stages of a run as plain functions: `stage_<name>(cfg, ...) -> URL or manifest`.

The same function runs from the CLI, a KFP component (components/), a test, or a PyTorchJob's
entry point. Each opens its own MLflow run nested under the pipeline's parent run (its id comes
as an argument or `$VERSAVIT_PARENT_RUN_ID`) and is idempotent: finished work found at its
output URL with the same settings is reused, so a retried or re-run pipeline does not redo it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from versavit import storage
from versavit.config import RunConfig, config_hash, config_to_dict
from versavit.data.build import labelled_root, synthetic_root
from versavit.pipeline import make_tracker, run_data, run_data_check
from versavit.tracking import PARENT_RUN_ENV, lineage_tags

KFP_RUN_ENV = "KFP_RUN_ID"


def _context(parent_run_id: str | None, kfp_run_id: str | None) -> None:
    """Stages started by KFP get the parent and KFP run ids as arguments; pass them on by env."""
    if parent_run_id:
        os.environ[PARENT_RUN_ENV] = parent_run_id
    if kfp_run_id:
        os.environ[KFP_RUN_ENV] = kfp_run_id


def _tags(cfg: RunConfig, upstream: dict[str, str] | None = None) -> dict[str, str]:
    return lineage_tags(config_hash(cfg), upstream, kfp_run_id=os.environ.get(KFP_RUN_ENV))


def open_pipeline_run(cfg: RunConfig, kfp_run_id: str | None = None) -> str:
    """Create the pipeline's MLflow parent run (flattened config as params); returns its id."""
    storage.configure(cfg.storage)
    storage.ensure_bucket(cfg.workdir)
    _context(None, kfp_run_id)
    tracker = make_tracker(cfg)
    parent = tracker.start_pipeline_run(cfg.name, tags={**_tags(cfg), "versavit.workdir": cfg.workdir,
                                                        "versavit.pipeline": "true"})
    tracker.log_config(parent, config_to_dict(cfg))
    run_id = tracker.run_id(parent) or ""
    tracker.close()
    return run_id


def close_pipeline_run(cfg: RunConfig, parent_run_id: str = "", kfp_run_id: str = "",
                       status: str = "FINISHED") -> None:
    """End the parent run, named by id or found by its KFP run id tag (KFP exit handlers get only that)."""
    tracker = make_tracker(cfg)
    if not parent_run_id and kfp_run_id:
        parent_run_id = tracker.find_run_id({"versavit.kfp_run_id": kfp_run_id, "versavit.pipeline": "true"}) or ""
    if parent_run_id:
        tracker.end_run(tracker.attach_run(parent_run_id), status)
    tracker.close()


def stage_data(cfg: RunConfig, parent_run_id: str | None = None, kfp_run_id: str | None = None) -> str:
    """Render the synthetic world (or reuse it); returns the dataset root URL (train/ and val/ below)."""
    _context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    tracker = make_tracker(cfg)
    with tracker.stage("data", tracker.parent_from_env(), tags=_tags(cfg)) as run:
        run_data(cfg, tracker, run)
    tracker.close()
    return synthetic_root(cfg.workdir)


def stage_data_check(cfg: RunConfig, dataset_url: str, parent_run_id: str | None = None,
                     kfp_run_id: str | None = None) -> str:
    """Read every split back through the training reader; returns the stats JSON (a string)."""
    from versavit.data.shards import read_manifest

    _context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    tracker = make_tracker(cfg)
    manifests = {s: read_manifest(storage.join(dataset_url, s)) for s in ("train", "val")}
    with tracker.stage("data_check", tracker.parent_from_env(), tags=_tags(cfg)) as run:
        checks = run_data_check(cfg, tracker, run, manifests)
    tracker.close()
    return json.dumps(checks, default=str)


def label_kinds(cfg: RunConfig) -> list[str]:
    """What the synthetic world needs from the teachers: embeddings always (it has none); depth and
    masks only when the config asks to replace its exact ground truth by teacher labels."""
    return ["embed"] if cfg.labeling.use_ground_truth else ["depth", "masks", "embed"]


def stage_label(cfg: RunConfig, dataset_url: str, parent_run_id: str | None = None,
                kfp_run_id: str | None = None) -> str:
    """Run the labelling steps over both splits; returns the labelled dataset root URL."""
    from versavit.labeling.jobs import label_dataset
    from versavit.progress import per_name, progress_bar

    _context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    tracker = make_tracker(cfg)
    out_root = labelled_root(cfg.workdir)
    kinds = label_kinds(cfg)
    with tracker.stage("label", tracker.parent_from_env(), tags=_tags(cfg)) as run:
        tracker.log_config(run, {"labeling": cfg.labeling.model_dump(mode="json")})
        for split in ("train", "val"):
            source = storage.join(dataset_url, split)
            for i, kind in enumerate(kinds):
                # chained steps: each adds its fields; the last writes the labelled dataset
                target = storage.join(out_root, split) if i == len(kinds) - 1 else \
                    storage.join(cfg.workdir, "data", f"labelled-{kind}", split)
                with progress_bar() as bar:
                    counts = label_dataset(kind, source, target, cfg.labeling, progress=per_name(bar, kind),
                                           tracker=tracker, run=run,
                                           max_corrupt_fraction=cfg.data.max_corrupt_fraction)
                tracker.log_metrics(run, {f"label/{split}_{kind}_{k}": v for k, v in counts.items()
                                          if isinstance(v, int | float) and not isinstance(v, bool)}, step=0)
                source = target
        tracker.set_tags(run, {"versavit.output_url": out_root})
    tracker.close()
    return out_root


def stage_train(cfg: RunConfig, stage: str, variant: str = "", parent_run_id: str | None = None,
                kfp_run_id: str | None = None) -> str:
    """Train recipe stage `stage` (e.g. warmup | multitask, or a `train.recipe` stage) where launch.backend
    says; returns the URL of its stage.json.

    A finished stage with the same config is reused; an interrupted one resumes from its checkpoint.
    """
    from versavit.launch import get_launcher
    from versavit.train.loop import stage_url

    cfg.train.stage(stage)  # an unknown name fails here, before anything is launched
    _context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    manifest_url = storage.join(stage_url(cfg, stage, variant), "stage.json")
    if storage.exists(manifest_url):
        done = json.loads(storage.read_text(manifest_url))
        if done.get("config_hash") == config_hash(cfg):
            return manifest_url
    get_launcher(cfg).launch(cfg, stage, variant=variant)  # local torchrun, PyTorchJob or TrainJob
    return manifest_url


def stage_eval(cfg: RunConfig, exports: dict[str, str], parent_run_id: str | None = None,
               kfp_run_id: str | None = None) -> str:
    """Evaluate the named backbone exports against the baseline; returns the report folder URL."""
    from versavit.eval import run_eval

    _context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    result: dict[str, Any] = run_eval(cfg, exports=exports)
    return str(result.get("report_dir", ""))


def stage_eval_manifests(cfg: RunConfig, manifests: list[str], parent_run_id: str | None = None,
                         kfp_run_id: str | None = None) -> str:
    """`stage_eval` on the exports named by stage.json URLs (what training stages return)."""
    storage.configure(cfg.storage)
    exports = {}
    for url in manifests:
        stage = json.loads(storage.read_text(url))
        exports[stage["variant"]] = stage["export_url"]
    return stage_eval(cfg, exports, parent_run_id, kfp_run_id)
