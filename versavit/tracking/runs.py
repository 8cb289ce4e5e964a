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
import os
from collections.abc import Iterator, Mapping

from versavit import layout, storage
from versavit.config import RunConfig, config_hash
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
    """A stage's MLflow run, nested under the pipeline's parent run; FAILED if the body raises."""
    storage.configure(cfg.storage)
    tracker = make_tracker(cfg, rank)
    try:
        parent, all_tags = tracker.parent_from_env(), {**run_tags(cfg), **(tags or {})}
        # an earlier attempt of this stage (same parent; without one, same config) killed on this host
        scope = {PARENT_TAG: parent.run_id} if parent else {"versavit.config_hash": all_tags["versavit.config_hash"]}
        tracker.end_orphaned_runs({STAGE_TAG: name, **scope})
        with tracker.stage(name, parent, tags={**all_tags, **process_tags()}) as run:
            yield tracker, run
    finally:
        tracker.close()
