"""Kubeflow Training Operator (v1) PyTorchJob: Master + Workers running torchrun, no SSH/MPI.

Built with the `kubeflow-training` SDK models and created/watched/deleted with its `TrainingClient`.
Every replica runs the same command (`base.torchrun_command`); the operator injects MASTER_ADDR,
PET_NODE_RANK & co. DeepSpeed is initialised inside the entry point (`deepspeed.initialize` on the
torch.distributed process group torchrun set up), so no launcher of its own is needed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from versavit.config import RunConfig
from versavit.launch import base
from versavit.launch.base import ClusterLauncher, JobState

KIND = "PyTorchJob"
API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the operator (and TrainingClient's log lookup) find the training container by this name
MASTER_PORT = 23456  # the operator's default; named so it picks it for MASTER_PORT
CLEAN_POD_POLICY = "Running"  # on completion kill what still runs, keep finished pods for their logs
TTL_AFTER_FINISHED_S = 7 * 24 * 3600  # garbage-collect finished jobs after a week


def pytorchjob_model(cfg: RunConfig, stage: str, config_ref: str, name: str | None = None,
                     env: dict[str, str] | None = None, active_deadline_s: int | None = None,
                     variant: str = "") -> Any:
    """The PyTorchJob as a `KubeflowOrgV1PyTorchJob` (kubeflow-training SDK model)."""
    from kubeflow.training import models as kf
    from kubernetes import client as k8s

    launch = cfg.launch
    name = name or base.make_job_name(cfg, stage)
    labels = base.job_labels(cfg, stage)
    env_vars = [k8s.V1EnvVar(name=e["name"], value=e.get("value"), value_from=_env_source(e.get("valueFrom")))
                for e in base.container_env(cfg, env)]
    res = base.resources(cfg)
    sec = base.container_security_context()
    psc = base.pod_security_context()
    container = k8s.V1Container(
        name=CONTAINER,
        image=launch.image,
        image_pull_policy="IfNotPresent",
        command=base.torchrun_command(cfg, stage, config_ref, variant),
        env=env_vars,
        ports=[k8s.V1ContainerPort(name="pytorchjob-port", container_port=MASTER_PORT, protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests=res["requests"], limits=res["limits"]),
        volume_mounts=[k8s.V1VolumeMount(**_snake(base.shm_mount()))],
        # on an error the log tail becomes the termination message: the failure report shows it
        termination_message_policy="FallbackToLogsOnError",
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=sec["allowPrivilegeEscalation"],
            capabilities=k8s.V1Capabilities(drop=sec["capabilities"]["drop"])),
    )
    shm = base.shm_volume(cfg)
    pod_spec = k8s.V1PodSpec(
        containers=[container],
        service_account_name=launch.service_account,
        # the training processes never call the Kubernetes API: no token in their pods
        automount_service_account_token=False,
        node_selector=dict(launch.node_selector) or None,
        tolerations=[k8s.V1Toleration(**_snake(t)) for t in base.tolerations(cfg)] or None,
        volumes=[k8s.V1Volume(name=shm["name"], empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=shm["emptyDir"]["sizeLimit"]))],
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=psc["runAsNonRoot"], run_as_user=psc["runAsUser"], run_as_group=psc["runAsGroup"],
            fs_group=psc["fsGroup"], seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
    )
    template = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=pod_spec)
    replicas = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=template)}
    if launch.nnodes > 1:
        replicas["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=launch.nnodes - 1, restart_policy="OnFailure",
                                                         template=template)
    return kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=launch.namespace, labels=labels),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(launch.nproc_per_node),
            pytorch_replica_specs=replicas,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=launch.backoff_limit, clean_pod_policy=CLEAN_POD_POLICY,
                ttl_seconds_after_finished=TTL_AFTER_FINISHED_S, active_deadline_seconds=active_deadline_s),
        ),
    )


def build_pytorchjob(cfg: RunConfig, stage: str, config_ref: str, name: str | None = None,
                     env: dict[str, str] | None = None, active_deadline_s: int | None = None,
                     variant: str = "") -> dict[str, Any]:
    """The PyTorchJob serialised to a plain dict (what `kubectl apply` or the API server takes)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(
        pytorchjob_model(cfg, stage, config_ref, name=name, env=env, active_deadline_s=active_deadline_s,
                         variant=variant))


class PyTorchJobLauncher(ClusterLauncher):
    """Runs a stage as a PyTorchJob through `kubeflow.training.TrainingClient`."""

    backend = "pytorchjob"
    kind: ClassVar[str] = KIND

    def __init__(self, *args: Any, deadline_margin_s: float = 600.0, **kwargs: Any):
        """Options as `ClusterLauncher`; the job also gets activeDeadlineSeconds = timeout + margin, so
        the operator stops it even if this process dies without cleaning up."""
        super().__init__(*args, **kwargs)
        self.deadline_margin_s = deadline_margin_s
        self._client: Any = None

    def build(self, cfg: RunConfig, stage: str, config_ref: str, name: str,
              env: dict[str, str] | None = None, variant: str = "") -> Any:
        deadline = None if self.timeout_s is None else int(self.timeout_s + self.deadline_margin_s)
        return pytorchjob_model(cfg, stage, config_ref, name=name, env=env, active_deadline_s=deadline,
                                variant=variant)

    def _connect(self, namespace: str) -> None:
        from kubeflow.training import TrainingClient

        self._client = TrainingClient(client_configuration=self.client_configuration, namespace=namespace,
                                      job_kind=KIND)

    def _create(self, job: Any, namespace: str) -> None:
        try:
            self._client.create_job(job=job, namespace=namespace)
        except Exception as exc:
            raise base.create_error(KIND, namespace, job.metadata.name, exc) from exc

    def _read(self, name: str, namespace: str) -> dict[str, Any]:
        job = self._client.get_job(name=name, namespace=namespace, job_kind=KIND)
        return self._client.api_client.sanitize_for_serialization(job)

    def _pods(self, name: str, namespace: str) -> list[Any]:
        return list(self._client.get_job_pods(name=name, namespace=namespace))

    def _is_master(self, pod: Any) -> bool:
        labels = pod.metadata.labels or {}
        return labels.get("training.kubeflow.org/replica-type", "").lower() == "master" or \
            labels.get("training.kubeflow.org/job-role") == "master"

    def _state(self, obj: dict[str, Any], pods: list[Any]) -> JobState:
        conds = base.true_conditions(obj)
        for kind, phase in (("Failed", "failed"), ("Succeeded", "succeeded"), ("Restarting", "running"),
                            ("Running", "running"), ("Suspended", "pending"), ("Created", "pending")):
            if kind in conds:
                c = conds[kind]
                return JobState(phase, kind, c.get("reason") or "", c.get("message") or "")
        return JobState("pending", "Pending")

    def _delete(self, name: str, namespace: str) -> None:
        from kubernetes.client import V1DeleteOptions

        # Background: the job goes now, the operator's owner references take its pods with it
        self._client.delete_job(name=name, namespace=namespace, job_kind=KIND,
                                delete_options=V1DeleteOptions(propagation_policy="Background"))

    def _open_log(self, pod_name: str, namespace: str) -> Any:
        return self._client.core_api.read_namespaced_pod_log(
            name=pod_name, namespace=namespace, container=CONTAINER, follow=True, _preload_content=False)


def _snake(d: dict[str, Any]) -> dict[str, Any]:
    """camelCase dict keys -> the snake_case keyword names of the kubernetes models."""
    import re

    return {re.sub(r"(?<!^)([A-Z])", r"_\1", k).lower(): v for k, v in d.items()}


def _env_source(value_from: dict[str, Any] | None) -> Any:
    if not value_from:
        return None
    from kubernetes import client as k8s

    ref = value_from["secretKeyRef"]
    return k8s.V1EnvVarSource(secret_key_ref=k8s.V1SecretKeySelector(name=ref["name"], key=ref["key"]))
