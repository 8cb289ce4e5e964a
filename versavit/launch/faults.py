"""Transient or permanent: what a failed cluster job says about a retry, and the record that stops KFP from
re-running a permanent failure.

KFP v2 retries a failed step whatever the cause (`set_retry`). A retry helps when the cluster failed the
job (a pod evicted, a node lost or shut down, a pod preempted, an image pull backing off, a gang that was not
scheduled in time, the API server gone): `classify_pods` finds that evidence in the pods' statuses and the
launcher raises `TransientLaunchError`. Anything else (a non-zero exit code of the training code, an
OOMKill, a missing secret, a refused create, the job's deadline) is permanent: the same job would fail the
same way, on up to 128 GPUs. The launcher then writes `failed-permanently/<KFP run id>.json` into the stage
folder before it raises, and a retried attempt of the same KFP run finds it (`check_not_failed`) and fails
at once with the same message, before it takes the lease or creates anything.

The evidence, with the Kubernetes names:
- pod `status.reason`: Evicted (kubelet node-pressure eviction), Preempting, NodeLost, Shutdown /
  NodeShutdown / Terminated (graceful node shutdown), UnexpectedAdmissionError (a device vanished);
- pod condition `DisruptionTarget=True` (Kubernetes >= 1.26) with reason PreemptionByScheduler,
  DeletionByTaintManager (node not ready / unreachable), EvictionByEvictionAPI (drain), DeletionByPodGC
  (node deleted), TerminationByKubelet;
- container waiting reason ImagePullBackOff / ErrImagePull (a registry outage; a wrong name is
  InvalidImageName, permanent).
A container's own end (exit code, OOMKilled, Error) is the code's, hence permanent, unless its pod carries
one of the signs above. No evidence either way is permanent: never re-run 128 GPUs on a guess.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from versavit.config import RunConfig
from versavit.launch.errors import LaunchError

TRANSIENT_POD_REASONS = frozenset({"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated",
                                   "UnexpectedAdmissionError"})
DISRUPTION_REASONS = frozenset({"PreemptionByScheduler", "PreemptionByKubeScheduler", "DeletionByTaintManager",
                                "EvictionByEvictionAPI", "DeletionByPodGC", "TerminationByKubelet"})
TRANSIENT_WAITING = frozenset({"ImagePullBackOff", "ErrImagePull"})
KFP_RUN_ENV = "KFP_RUN_ID"
RECORD_DIR = "failed-permanently"


@dataclass(frozen=True)
class Classification:
    transient: bool
    reason: str

    def tag(self) -> str:
        """How the failure message states it (the KFP UI shows the step's last error lines)."""
        if self.transient:
            return f"[transient: {self.reason}; a retry of the step may succeed]"
        return f"[permanent: {self.reason}; a retry would fail the same way, so the step is not run again]"


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return obj


def _name(pod: Any) -> str:
    return str(_get(pod, "metadata", "name") or "?")


def disruption(pod: Any) -> str | None:
    """Why the cluster took this pod away (eviction, node loss, preemption), or None."""
    reason = _get(pod, "status", "reason")
    if reason in TRANSIENT_POD_REASONS:
        message = (_get(pod, "status", "message") or "").strip()
        return f"pod {_name(pod)} {reason}" + (f" ({message})" if message else "")
    for cond in _get(pod, "status", "conditions") or []:
        if _get(cond, "type") == "DisruptionTarget" and str(_get(cond, "status")) == "True" \
                and _get(cond, "reason") in DISRUPTION_REASONS:
            message = (_get(cond, "message") or "").strip()
            return f"pod {_name(pod)} {_get(cond, 'reason')}" + (f" ({message})" if message else "")
    return None


def _statuses(pod: Any) -> list[Any]:
    return list(_get(pod, "status", "init_container_statuses") or _get(pod, "status", "initContainerStatuses")
                or []) + list(_get(pod, "status", "container_statuses") or _get(pod, "status", "containerStatuses")
                              or [])


def _terminated(cs: Any) -> Any:
    """The container's failed end: now, or (restarted in place) the previous run's."""
    for state in ("state", "last_state", "lastState"):
        term = _get(cs, state, "terminated")
        if term is not None and (_get(term, "exit_code") or _get(term, "exitCode")):
            return term
    return None


def classify_pods(pods: list[Any]) -> Classification:
    """Transient if any pod shows the cluster took it away or an image pull backs off; else permanent, naming
    the code's failure (exit code / OOMKilled) when a container shows one."""
    for pod in pods:
        if found := disruption(pod):
            return Classification(True, found)
    for pod in pods:
        for cs in _statuses(pod):
            waiting = _get(cs, "state", "waiting")
            if waiting is not None and _get(waiting, "reason") in TRANSIENT_WAITING:
                return Classification(True, f"pod {_name(pod)}: {_get(waiting, 'reason')}")
    for pod in pods:
        for cs in _statuses(pod):
            if (term := _terminated(cs)) is not None:
                code = _get(term, "exit_code") or _get(term, "exitCode")
                reason = _get(term, "reason") or "Error"
                what = "out of memory (OOMKilled)" if reason == "OOMKilled" else f"{reason}, exit code {code}"
                return Classification(False, f"container {_get(cs, 'name')} of pod {_name(pod)} ended: {what}")
    return Classification(False, "no sign of eviction, node loss or preemption on the job's pods")


def classify_waiting(reason: str) -> Classification:
    """A pod stuck waiting (base.STUCK_REASONS): an image pull backing off may be the registry; a wrong image
    name or a missing secret is the configuration."""
    return Classification(reason.split(":", 1)[0] in TRANSIENT_WAITING, reason.split(":", 1)[0])


def classify_api_status(status: int | None) -> Classification:
    """A refused API call: 403/404/409/422 are the configuration or the cluster's setup; 429/5xx and no answer
    at all are the API server's trouble."""
    if status in (403, 404, 409, 422):
        return Classification(False, f"the API server answered {status}")
    return Classification(True, f"the API server answered {status}" if status else "the API server did not answer")


# --------------------------------------------------------------------------------------------
# the record of a permanent failure, per KFP run


def kfp_run_id() -> str:
    return os.environ.get(KFP_RUN_ENV, "").strip()


def record_url(cfg: RunConfig, stage: str, variant: str, run_id: str) -> str:
    from versavit import storage
    from versavit.layout import stage_url

    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_id)
    return storage.join(stage_url(cfg, stage, variant), RECORD_DIR, f"{safe}.json")


def record_permanent(cfg: RunConfig, stage: str, variant: str, error: LaunchError) -> str | None:
    """Write the permanent failure of this KFP run's launch of the stage; None outside KFP (no run id)."""
    from versavit import storage

    run_id = kfp_run_id()
    if not run_id:
        return None
    url = record_url(cfg, stage, variant, run_id)
    record = {"kfp_run_id": run_id, "stage": stage, "variant": variant, "error": type(error).__name__,
              "message": str(error), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        storage.write_text(url, json.dumps(record, indent=1))
    except storage.StorageError:  # the failure itself matters more; a retry then runs the job again
        return None
    return url


def check_not_failed(cfg: RunConfig, stage: str, variant: str) -> None:
    """Raise the recorded permanent failure if an earlier attempt of this KFP run had one."""
    from versavit import storage

    run_id = kfp_run_id()
    if not run_id:
        return
    url = record_url(cfg, stage, variant, run_id)
    try:
        if not storage.exists(url):
            return
        record = json.loads(storage.read_text(url))
    except (storage.StorageError, ValueError):
        return
    raise LaunchError(f"{record.get('message', '')}\n(an earlier attempt of KFP run {run_id} failed permanently at "
                      f"{record.get('time', '?')}; recorded in {url}: this retry does not run the job again)")
