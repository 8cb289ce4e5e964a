"""What a launch raises: one message naming the problem, whichever backend ran the stage."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A training stage failed; the message says which rank or job and why."""


class LaunchTimeout(LaunchError):
    """The job did not finish in time; it has been deleted."""


class JobFailed(LaunchError):
    """The cluster job ended in failure; the message carries the job's own reason."""
