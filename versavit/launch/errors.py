"""What a launch raises: one message naming the problem, whichever backend ran the stage."""

from __future__ import annotations


class LaunchError(RuntimeError):
    """A training stage failed; the message says which rank or job and why."""

    transient = False


class LaunchTimeout(LaunchError):
    """The job did not finish in time; it has been deleted."""


class JobFailed(LaunchError):
    """The cluster job ended in failure; the message carries the job's own reason."""


class TransientLaunchError(LaunchError):
    """A failure of the cluster, not of the code (eviction, node loss, preemption, image pull back-off, a job
    not scheduled in time, the API lost): running the step again may succeed. Every other `LaunchError` of a
    cluster launch is permanent, and a KFP retry of the step does not run the job again
    (`versavit.launch.faults`)."""

    transient = True


class TransientJobFailed(TransientLaunchError, JobFailed):
    """The cluster job ended in failure for a transient reason."""


class RankFailed(LaunchError):
    """A rank of a local run failed: the first failure by time, with its real cause (`error_type`, e.g.
    StorageError, and `cause`, its message), on one line."""

    def __init__(self, message: str, rank: int, error_type: str, cause: str, log_dir: str = ""):
        super().__init__(message)
        self.rank, self.error_type, self.cause, self.log_dir = rank, error_type, cause, log_dir
