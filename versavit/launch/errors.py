"""What a launch raises: one message naming the problem, whichever backend ran the stage."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A training stage failed; the message says which rank or job and why."""


class LaunchTimeout(LaunchError):
    """The job did not finish in time; it has been deleted."""


class JobFailed(LaunchError):
    """The cluster job ended in failure; the message carries the job's own reason."""


class RankFailed(LaunchError):
    """A rank of a local run failed: the first failure by time, with its real cause (`error_type`, e.g.
    StorageError, and `cause`, its message), on one line."""

    def __init__(self, message: str, rank: int, error_type: str, cause: str, log_dir: str = ""):
        super().__init__(message)
        self.rank, self.error_type, self.cause, self.log_dir = rank, error_type, cause, log_dir
