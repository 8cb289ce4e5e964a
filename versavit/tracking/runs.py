"""Tracker creation and the stage-run context every stage opens (one prologue, written once).

    with stage_run(cfg, "data") as (tracker, run):
        tracker.log_metrics(run, {...}, step=0)

opens a run nested under the pipeline's parent run (`$VERSAVIT_PARENT_RUN_ID`), tags it with the
config hash, the git commit, the KFP run id (`$KFP_RUN_ID`) and its host and pid, marks it FAILED if the
body raises (with the error as tag `versavit.failure`), FINISHED otherwise, and closes the tracker
(flushing what is buffered, saving what could not be sent). Before that, on rank 0, it sends the records
earlier processes saved for the same tracking URI (`replay_pending`) and marks KILLED the runs of this
stage that a killed earlier attempt on this host left RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from versavit import layout, storage
from versavit.config import RunConfig, config_hash
from versavit.tracking.identity import VIEW_TAG, headline_view
from versavit.tracking.replay import replay_pending
from versavit.tracking.tracker import (
    PARENT_RUN_ENV,
    PARENT_TAG,
    STAGE_TAG,
    RunHandle,
    Tracker,
    default_tracking_uri,
    lineage_tags,
    process_tags,
)

KFP_RUN_ENV = "KFP_RUN_ID"
# Set by `versavit pipeline run --local` on its steps' processes (and so on the training ranks they start): at exit,
# such a process freezes the garbage collector, so the interpreter's teardown skips a last collection of the ~270k
# objects torch, transformers, MLflow and pandas leave: 0.6 s instead of 5.5 s per process measured on the loaded
# 2-core machine. Only cyclic garbage is left uncollected at exit; files are closed by their owners before.
QUICK_EXIT_ENV = "VERSAVIT_QUICK_EXIT"
if os.environ.get(QUICK_EXIT_ENV) == "1":
    import atexit
    import gc

    atexit.register(gc.freeze)


def tracking_uri(cfg: RunConfig) -> str:
    """The config's MLflow URI, or a SQLite file in the run's local root."""
    return cfg.tracking.uri or default_tracking_uri(str(layout.local_root(cfg)))


def make_tracker(cfg: RunConfig, rank: int = 0, replay: bool = True) -> Tracker:
    """The run's tracker; only rank 0 talks to MLflow. With `replay`, records saved in the run's pending
    folder for the same tracking URI are sent first if the store answers (quietly; else they stay)."""
    tracker = Tracker.for_rank(rank, tracking_uri=tracking_uri(cfg), experiment=cfg.tracking.experiment,
                               enabled=cfg.tracking.enabled, pending_dir=str(layout.tracking_pending_dir(cfg)))
    if tracker.enabled and replay:
        reports = replay_pending(layout.tracking_pending_dir(cfg), tracker.tracking_uri)
        if down := next((r.error for r in reports if r.error), None):
            # the store did not answer: the tracker warns once and backs off, as after its own failed call
            tracker._on_failure(ConnectionError(down))
    return tracker


def set_run_context(parent_run_id: str | None = None, kfp_run_id: str | None = None) -> None:
    """Stages started by KFP get the parent and KFP run ids as arguments; pass them on by env
    (to this process's stage runs and to the training processes it starts)."""
    if parent_run_id:
        os.environ[PARENT_RUN_ENV] = parent_run_id
    if kfp_run_id:
        os.environ[KFP_RUN_ENV] = kfp_run_id


def run_tags(cfg: RunConfig, upstream: Mapping[str, str] | None = None) -> dict[str, str]:
    """Lineage tags of any run of `cfg`: config hash, upstream runs, KFP run id, git commit."""
    return lineage_tags(config_hash(cfg), upstream, kfp_run_id=os.environ.get(KFP_RUN_ENV))


@contextlib.contextmanager
def stage_run(cfg: RunConfig, name: str, tags: Mapping[str, str] | None = None,
              rank: int = 0) -> Iterator[tuple[Tracker, RunHandle]]:
    """A stage's MLflow run, nested under the pipeline's parent run; FAILED if the body raises. Tagged with
    `versavit.upstream.<stage>` = the run id of each stage whose output it reads (`upstream_runs`)."""
    storage.configure(cfg.storage)
    tracker = make_tracker(cfg, rank)
    try:
        parent = tracker.parent_from_env()
        all_tags = {**run_tags(cfg, upstream_runs(cfg, name, tags or {}, tracker, parent)), **(tags or {})}
        # an earlier attempt of this stage (same parent; without one, same config) killed on this host
        scope = {PARENT_TAG: parent.run_id} if parent else {"versavit.config_hash": all_tags["versavit.config_hash"]}
        tracker.end_orphaned_runs({STAGE_TAG: name, **scope})
        with tracker.stage(name, parent, tags={**all_tags, **process_tags()}) as run:
            yield tracker, run
    finally:
        tracker.close()


# ---------------------------------------------------------------------------------------------------
# lineage: which runs produced what a stage reads


def _split_run_name(name: str, stages: list[str]) -> tuple[str, str] | None:
    """A training run's name `<stage>[-<variant>]` -> (stage, variant); None if it names no recipe stage."""
    if name in stages:
        return name, ""
    for stage in sorted(stages, key=len, reverse=True):
        if name.startswith(f"{stage}-"):
            return stage, name[len(stage) + 1:]
    return None


def _manifest_run(manifest_url: str) -> tuple[str, str] | None:
    """(run name, MLflow run id) recorded by a training stage's stage.json, if any."""
    try:
        done = json.loads(storage.read_text(manifest_url))
    except (storage.StorageError, OSError, ValueError):
        return None
    run_id = done.get("mlflow_run_id") if isinstance(done, dict) else None
    if not run_id:
        return None
    return layout.run_name(str(done.get("stage", "")), str(done.get("variant") or "")), str(run_id)


def _data_upstream(cfg: RunConfig) -> list[str]:
    """The stage whose output the first training stage reads: the label step (last kind of the label chain)."""
    if cfg.data.source == "synthetic":
        return ["label"]
    kinds = cfg.label_kinds()
    return [f"label_{kinds[-1]}"] if kinds else ["prepare"]


def upstream_stages(cfg: RunConfig, name: str) -> list[str]:
    """The stages (run names) whose MLflow runs a stage run `name` finds under its parent (data lineage);
    training stages and the evaluation name their upstream runs exactly instead (`upstream_runs`)."""
    if name in ("data_check", "label"):
        return ["data"]
    if name == "prepare":
        return ["weights"] if cfg.weights.url else []
    if name.startswith("label_"):
        kinds = cfg.label_kinds()
        kind = name.removeprefix("label_")
        before = kinds[:kinds.index(kind)] if kind in kinds else []
        return [f"label_{before[-1]}"] if before else ["prepare"]
    return []


def upstream_runs(cfg: RunConfig, name: str, tags: Mapping[str, str], tracker: Tracker,
                  parent: RunHandle | None) -> dict[str, str]:
    """stage run name -> MLflow run id of each run whose output stage run `name` reads:
    a training stage: the previous stage of its recipe (from that stage's stage.json: same variant, else
    variant ""), or for the first stage the label step's run under the same parent; the evaluation: the run
    that trained each export it compares (`versavit.eval.source.*` tags -> <stage>/stage.json); a data step:
    its predecessor's run under the same parent (`upstream_stages`). Rank 0 only; {} when untracked."""
    if not tracker.enabled:
        return {}
    found: dict[str, str] = {}
    wanted: list[str] = []
    recipe = [s.name for s in cfg.train.stages()]
    if (split := _split_run_name(name, recipe)) is not None:
        stage, variant = split
        i = recipe.index(stage)
        if i == 0:
            wanted = _data_upstream(cfg)
        for v in dict.fromkeys([variant, ""]) if i > 0 else ():
            if (hit := _manifest_run(layout.stage_manifest_url(cfg, recipe[i - 1], v))) is not None:
                found[hit[0]] = hit[1]
                break
    elif name == "eval" or name.startswith("eval-"):  # the report, or one evaluator's step / job
        for key, url in tags.items():
            export = url.rstrip("/")
            if (key.startswith("versavit.eval.source.") and export.endswith("/export")
                    and (hit := _manifest_run(storage.join(export[:-len("/export")], "stage.json"))) is not None):
                found[hit[0]] = hit[1]
    else:
        wanted = upstream_stages(cfg, name)
    if parent is not None and parent.run_id:
        for stage in wanted:
            if run_id := tracker.find_run_id({PARENT_TAG: parent.run_id, STAGE_TAG: stage}):
                found[stage] = run_id
    return found


# ---------------------------------------------------------------------------------------------------
# what the evaluation publishes beyond its own run


def publish_evaluation(cfg: RunConfig, headline: Mapping[str, float], eval_run_id: str | None,
                       trained: Mapping[str, tuple[str, Mapping[str, float]]] | None = None) -> None:
    """The evaluation's headline metrics (`eval.report.headline_metrics`) onto the pipeline's parent run, the
    experiment's saved runs-table view of them (`identity.headline_view`), and each trained backbone's own
    figures (`trained`: backbone -> (the run that trained it, its figures)) onto the model versions that
    training run registered, as tags `versavit.eval.<benchmark>/<group>/<metric>` and a description line."""
    tracker = make_tracker(cfg, replay=False)
    try:
        parent = tracker.parent_from_env()
        if parent is not None:
            tracker.log_metrics(parent, headline, step=0)
            if eval_run_id:
                tracker.set_tags(parent, {"versavit.eval_run_id": eval_run_id})
            tracker.set_experiment_tags({VIEW_TAG: json.dumps(headline_view(headline), separators=(",", ":"))})
        by = tracker.attach_run(eval_run_id) if eval_run_id else (parent or tracker.attach_run("-"))
        for backbone, (run_id, figures) in (trained or {}).items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
            tags = {**{f"versavit.eval.{k}": f"{v:.6g}" for k, v in figures.items()},
                    "versavit.eval.run_id": eval_run_id or "", "versavit.eval.backbone": backbone}
            tracker.annotate_model_versions(by, run_id, tags, f"Evaluation (run {eval_run_id}, as `{backbone}`; "
                                            f"{UNITS}): {shown}")
    finally:
        tracker.close()


UNITS = "mIoU, pixel accuracy, cIoU, AbsRel and δ1 in %, RMSE in metres"


def model_version_meta(cfg: RunConfig, run_name: str, tasks: list[str], steps: int, source: str,
                       metrics_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """`tags` and `description` of the model version a training stage registers: config hash, stage,
    tasks, steps, the immutable source, the pipeline's KFP run id and git commit (`run_tags`), and the
    final training losses (the last record of the stage's metrics.jsonl)."""
    last: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        lines = [ln for ln in Path(metrics_path).read_text().splitlines() if ln.strip()] if metrics_path else []
        last = json.loads(lines[-1]) if lines else {}
    losses = {k: float(v) for k, v in last.items() if k.startswith("loss/") and isinstance(v, int | float)}
    tags = {**run_tags(cfg), "versavit.stage": run_name, "versavit.tasks": ",".join(tasks),
            "versavit.steps": str(steps), "versavit.source": source,
            **{f"versavit.final.{k}": f"{v:.6g}" for k, v in losses.items()}}
    shown = ", ".join(f"{k.removeprefix('loss/')} {v:.4g}" for k, v in losses.items())
    description = (f"Vision backbone after training stage `{run_name}` of config `{cfg.name}` (hash "
                   f"`{tags['versavit.config_hash']}`): {steps} steps on {', '.join(tasks)}"
                   + (f"; final losses {shown}" if shown else "") + f". Files (written once, never replaced): {source}")
    return {"tags": tags, "description": description}
