"""Tracker creation and the stage-run context every stage opens (one prologue, written once).

    with stage_run(cfg, "data") as (tracker, run):
        tracker.log_metrics(run, {...}, step=0)

opens a run nested under the pipeline's parent run (`$VERSAVIT_PARENT_RUN_ID`), tags it with the
config hash, the git commit and the KFP run id (`$KFP_RUN_ID`), marks it FAILED if the body raises,
FINISHED otherwise, and closes the tracker (flushing what is buffered, saving what could not be sent).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from versavit import layout, storage
from versavit.config import RunConfig, config_hash
from versavit.tracking.tracker import PARENT_RUN_ENV, RunHandle, Tracker, default_tracking_uri, lineage_tags

KFP_RUN_ENV = "KFP_RUN_ID"


def tracking_uri(cfg: RunConfig) -> str:
    """The config's MLflow URI, or a SQLite file in the run's local root."""
    return cfg.tracking.uri or default_tracking_uri(str(layout.local_root(cfg)))


def make_tracker(cfg: RunConfig, rank: int = 0) -> Tracker:
    """The run's tracker; only rank 0 talks to MLflow."""
    return Tracker.for_rank(rank, tracking_uri=tracking_uri(cfg), experiment=cfg.tracking.experiment,
                            enabled=cfg.tracking.enabled, pending_dir=str(layout.tracking_pending_dir(cfg)))


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
        with tracker.stage(name, tracker.parent_from_env(), tags={**run_tags(cfg), **(tags or {})}) as run:
            yield tracker, run
    finally:
        tracker.close()
