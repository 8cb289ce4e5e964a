"""Where a training stage runs: local torchrun (here); Kubeflow PyTorchJob / TrainJob (cluster)."""

from __future__ import annotations

from typing import Any

from versavit.config import RunConfig
from versavit.launch.base import ClusterLauncher, Launcher, LaunchResult
from versavit.launch.errors import (
    JobFailed,
    LaunchError,
    LaunchTimeout,
    RankFailed,
    TransientJobFailed,
    TransientLaunchError,
)
from versavit.launch.local import LocalLauncher, launch_local
from versavit.launch.pytorchjob import PyTorchJobLauncher, build_pytorchjob
from versavit.launch.trainjob import TrainJobLauncher, build_trainjob

LAUNCHERS: dict[str, type[Launcher]] = {"local": LocalLauncher, "pytorchjob": PyTorchJobLauncher,
                                         "trainjob": TrainJobLauncher}


def get_launcher(cfg: RunConfig, **options: Any) -> Launcher:
    """The launcher of `cfg.launch.backend`; `options` go to its constructor (timeouts, API client)."""
    backend = cfg.launch.backend
    if backend not in LAUNCHERS:
        raise LaunchError(f"unknown launch.backend {backend!r} ({', '.join(LAUNCHERS)})")
    return LAUNCHERS[backend](**options)


__all__ = [
    "LAUNCHERS",
    "ClusterLauncher",
    "JobFailed",
    "LaunchError",
    "LaunchResult",
    "LaunchTimeout",
    "Launcher",
    "LocalLauncher",
    "PyTorchJobLauncher",
    "RankFailed",
    "TrainJobLauncher",
    "TransientJobFailed",
    "TransientLaunchError",
    "build_pytorchjob",
    "build_trainjob",
    "get_launcher",
    "launch_local",
]
