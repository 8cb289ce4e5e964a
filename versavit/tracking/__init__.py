"""Experiment tracking (MLflow) for the VersaViT pipeline."""

from versavit.tracking.tracker import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_ENV,
    PARENT_TAG,
    STAGE_TAG,
    RunHandle,
    Tracker,
    default_tracking_uri,
    flatten_config,
    lineage_tags,
)

__all__ = [
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "PARENT_RUN_ENV",
    "PARENT_TAG",
    "STAGE_TAG",
    "RunHandle",
    "Tracker",
    "default_tracking_uri",
    "flatten_config",
    "lineage_tags",
]
