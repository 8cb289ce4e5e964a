"""Experiment tracking (MLflow) for the VersaViT pipeline."""

from versavit.tracking.replay import ReplayReport, replay_dir, replay_pending
from versavit.tracking.runs import KFP_RUN_ENV, make_tracker, run_tags, set_run_context, stage_run, tracking_uri
from versavit.tracking.tracker import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    FAILURE_TAG,
    HOST_TAG,
    PARENT_RUN_ENV,
    PARENT_TAG,
    PID_TAG,
    STAGE_TAG,
    RunHandle,
    Tracker,
    default_tracking_uri,
    flatten_config,
    lineage_tags,
)

__all__ = [
    "KFP_RUN_ENV",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "FAILURE_TAG",
    "HOST_TAG",
    "PARENT_RUN_ENV",
    "PARENT_TAG",
    "PID_TAG",
    "STAGE_TAG",
    "ReplayReport",
    "RunHandle",
    "Tracker",
    "default_tracking_uri",
    "flatten_config",
    "lineage_tags",
    "make_tracker",
    "replay_dir",
    "replay_pending",
    "run_tags",
    "set_run_context",
    "stage_run",
    "tracking_uri",
]
