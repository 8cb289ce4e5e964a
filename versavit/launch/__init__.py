"""Where a training stage runs: local torchrun (here); Kubeflow PyTorchJob / TrainJob (cluster)."""

from versavit.launch.local import LaunchError, launch_local

__all__ = ["LaunchError", "launch_local"]
