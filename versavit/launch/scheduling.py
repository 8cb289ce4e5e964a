"""Gang scheduling (`launch.scheduling`): every replica of a training job starts together, or none does.

A partly scheduled 16-node job holds GPUs it cannot use and can deadlock with another partly scheduled
job. What each `kind` becomes, with the field names of the operators' source:

PyTorchJob (Training Operator v1, release-1.9, pkg/controller.v1/common/job.go and
pkg/controller.v1/control/podgroup_control.go):
  volcano       runPolicy.schedulingPolicy {minAvailable: every replica, queue, priorityClass,
                scheduleTimeoutSeconds} and `schedulerName: volcano` in the pod templates. The operator (run
                with `--gang-scheduler-name=volcano`) makes a Volcano PodGroup {minMember, queue,
                priorityClassName} from it and holds the pods back until the PodGroup is Inqueue. (Volcano's
                PodGroup has no timeout: scheduleTimeoutSeconds is enforced by the launcher, below.)
  coscheduling  the same schedulingPolicy and the scheduler-plugins scheduler as `schedulerName`
                (`--gang-scheduler-name=<that scheduler>`): a scheduler-plugins PodGroup {minMember,
                scheduleTimeoutSeconds}.
  kueue         the labels `kueue.x-k8s.io/queue-name` (a LocalQueue of the job's namespace) and
                `kueue.x-k8s.io/priority-class` (a WorkloadPriorityClass) on the job; Kueue suspends it
                (runPolicy.suspend) until the whole job fits the queue's quota, then admits it at once.
  priority_class also becomes the pods' priorityClassName (volcano, coscheduling, none).

TrainJob (Kubeflow Trainer v2, the vendored v1alpha1 API):
  kueue         the same two labels on the TrainJob.
  coscheduling  belongs to the runtime: `spec.podGroupPolicy.coscheduling.scheduleTimeoutSeconds` of the
                (Cluster)TrainingRuntime the TrainJob names (`runtime_pod_group_policy` gives the stanza;
                the runtime plugin sets minMember = numNodes); a TrainJob has no field for it.
  volcano       refused: the vendored runtime API has no podGroupPolicy.volcano (newer Trainer releases
                add it to the runtime, not to the TrainJob).

Whatever the kind, `schedule_timeout_s` is also enforced by the launcher: a job whose pods are not all
running that long after its creation is deleted and the step fails as transient (KFP retries it later).
"""

from __future__ import annotations

from typing import Any

from versavit.config import RunConfig
from versavit.launch.errors import LaunchError

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
VOLCANO_SCHEDULER = "volcano"


def scheduling_policy(cfg: RunConfig) -> dict[str, Any] | None:
    """PyTorchJob runPolicy.schedulingPolicy (Kubernetes field names), or None."""
    sched = cfg.launch.scheduling
    if sched.kind not in ("volcano", "coscheduling"):
        return None
    policy: dict[str, Any] = {"minAvailable": cfg.launch.nnodes}  # every replica: Master + Workers
    if sched.kind == "volcano" and sched.queue:
        policy["queue"] = sched.queue
    if sched.priority_class:
        policy["priorityClass"] = sched.priority_class
    if sched.schedule_timeout_s:
        policy["scheduleTimeoutSeconds"] = sched.schedule_timeout_s
    return policy


def scheduler_name(cfg: RunConfig) -> str | None:
    """The pods' schedulerName: the gang scheduler's (the operator leaves a set name alone)."""
    sched = cfg.launch.scheduling
    return {"volcano": VOLCANO_SCHEDULER, "coscheduling": sched.scheduler_name}.get(sched.kind)


def priority_class_name(cfg: RunConfig) -> str | None:
    """The pods' priorityClassName (Kueue's priority is a WorkloadPriorityClass label instead)."""
    sched = cfg.launch.scheduling
    return sched.priority_class if sched.kind != "kueue" else None


def job_labels(cfg: RunConfig) -> dict[str, str]:
    """Labels on the job object itself (both kinds): Kueue's queue and priority."""
    sched = cfg.launch.scheduling
    if sched.kind != "kueue":
        return {}
    labels = {KUEUE_QUEUE_LABEL: sched.queue or ""}
    if sched.priority_class:
        labels[KUEUE_PRIORITY_LABEL] = sched.priority_class
    return labels


def check_trainjob(cfg: RunConfig) -> None:
    """Refuse what a TrainJob of the vendored Trainer API cannot express."""
    if cfg.launch.scheduling.kind == "volcano":
        raise LaunchError("launch.scheduling.kind=volcano: a TrainJob cannot ask for a Volcano PodGroup, and the "
                          "Trainer runtime API this project targets (manifests/crds) has only "
                          "podGroupPolicy.coscheduling; use launch.backend=pytorchjob for Volcano, or kind kueue / "
                          "coscheduling (the latter set in the runtime: see manifests/README.md)")


def runtime_pod_group_policy(cfg: RunConfig) -> dict[str, Any] | None:
    """`spec.podGroupPolicy` of the (Cluster)TrainingRuntime for kind coscheduling (the Trainer's coscheduling
    plugin sets minMember to the TrainJob's numNodes), else None."""
    sched = cfg.launch.scheduling
    if sched.kind != "coscheduling":
        return None
    coscheduling: dict[str, Any] = {}
    if sched.schedule_timeout_s:
        coscheduling["scheduleTimeoutSeconds"] = sched.schedule_timeout_s
    return {"coscheduling": coscheduling}
