"""Where a training stage runs: local torchrun (here); Kubeflow PyTorchJob / TrainJob (cluster)."""

from versavit.launch.base import (
    ClusterLauncher,
    JobFailed,
    Launcher,
    LaunchResult,
    LaunchTimeout,
    LocalLauncher,
    get_launcher,
    localize_config,
)
from versavit.launch.local import LaunchError, launch_local
from versavit.launch.pytorchjob import PyTorchJobLauncher, build_pytorchjob
from versavit.launch.trainjob import TrainJobLauncher, build_trainjob

__all__ = [
    "ClusterLauncher",
    "JobFailed",
    "LaunchError",
    "LaunchResult",
    "LaunchTimeout",
    "Launcher",
    "LocalLauncher",
    "PyTorchJobLauncher",
    "TrainJobLauncher",
    "build_pytorchjob",
    "build_trainjob",
    "get_launcher",
    "launch_local",
    "localize_config",
]
