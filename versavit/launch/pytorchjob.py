"""Kubeflow Training Operator (v1) PyTorchJob: Master + Workers running torchrun, no SSH/MPI.

Built with the `kubeflow-training` SDK models and created/watched/deleted with its `TrainingClient`.
Every replica runs the same command (`base.torchrun_command`); the operator injects MASTER_ADDR,
PET_NODE_RANK & co. DeepSpeed is initialised inside the entry point (`deepspeed.initialize` on the
torch.distributed process group torchrun set up), so no launcher of its own is needed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from versavit.config import RunConfig
from versavit.launch import base, scheduling
from versavit.launch.base import ClusterLauncher, JobState

KIND = "PyTorchJob"
API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the operator (and TrainingClient's log lookup) find the training container by this name
MASTER_PORT = 23456  # the operator's default; named so it picks it for MASTER_PORT
CLEAN_POD_POLICY = "Running"  # on completion kill what still runs, keep finished pods for their logs
TTL_AFTER_FINISHED_S = 7 * 24 * 3600  # garbage-collect finished jobs after a week
# c10d rendezvous: how long the first node waits for the others (torch's default, 600 s, is short for 16 pods
# pulling a large image onto fresh nodes)
RDZV_JOIN_TIMEOUT_S = 1800
# Istio sidecars (on by default in Kubeflow profile namespaces) break pod-to-pod NCCL / rendezvous traffic
# and keep a finished pod running: training pods opt out
POD_ANNOTATIONS = {"sidecar.istio.io/inject": "false"}
# torchrun's agents share their c10d rendezvous TCPStore with the workers by default, and then (torch 2.13,
# torch/distributed/elastic/rendezvous/dynamic_rendezvous.py `next_rendezvous`) rank 0 publishes MASTER_ADDR /
# MASTER_PORT for the first round only: a node that joins a later round (a restarted pod) waits for them under
# the new round's prefix until the store's 60 s timeout, fails, restarts, and so on until backoffLimit. Found by
# tests/launch/test_mini_operator.py. Opting out of the sharing makes rank 0 publish them every round.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def elastic_policy(cfg: RunConfig, name: str) -> dict[str, Any] | None:
    """spec.elasticPolicy (Kubernetes field names) of a multi-node job: c10d rendezvous on the master's service
    (`<job>-master-0`, the operator's per-replica headless Service) with min = max = nnodes, so a restarted
    or replaced pod rejoins; maxRestarts = launch.max_restarts. The operator turns it into PET_RDZV_ENDPOINT,
    PET_RDZV_BACKEND, PET_NNODES="n:n", PET_MAX_RESTARTS, PET_RDZV_ID, PET_RDZV_CONF (release-1.9,
    pkg/controller.v1/pytorch/elastic.go). None on one node: its validating webhook requires a Worker replica
    for an elastic policy, and one node needs no rendezvous service (torchrun --standalone)."""
    n = cfg.launch.nnodes
    if n == 1:
        return None
    return {"minReplicas": n, "maxReplicas": n, "rdzvBackend": "c10d", "rdzvHost": f"{name}-master-0",
            "rdzvPort": MASTER_PORT, "rdzvId": name, "maxRestarts": cfg.launch.max_restarts,
            "rdzvConf": [{"key": "join_timeout", "value": str(RDZV_JOIN_TIMEOUT_S)}]}


def pytorchjob_model(cfg: RunConfig, stage: str, config_ref: str, name: str | None = None,
                     env: dict[str, str] | None = None, active_deadline_s: int | None = None,
                     variant: str = "", namespace: str | None = None,
                     owner: dict[str, Any] | None = None) -> Any:
    """The PyTorchJob as a `KubeflowOrgV1PyTorchJob` (kubeflow-training SDK model), in `namespace` (None:
    launch.namespace), with `owner` as its ownerReference (versavit.launch.identity) if given; gang scheduling
    from launch.scheduling (versavit.launch.scheduling), elastic restarts from launch.max_restarts."""
    from kubeflow.training import models as kf
    from kubernetes import client as k8s

    launch = cfg.launch
    name = name or base.make_job_name(cfg, stage)
    labels = base.job_labels(cfg, stage, variant)
    env_vars = [k8s.V1EnvVar(name=e["name"], value=e.get("value"), value_from=_env_source(e.get("valueFrom")))
                for e in base.container_env(cfg, {**(ELASTIC_ENV if launch.nnodes > 1 else {}), **(env or {})})]
    res = base.resources(cfg)
    sec = base.container_security_context(cfg)
    psc = base.pod_security_context()
    container = k8s.V1Container(
        name=CONTAINER,
        image=launch.image,
        image_pull_policy="IfNotPresent",
        command=base.torchrun_command(cfg, stage, config_ref, variant, elastic=True),
        env=env_vars,
        ports=[k8s.V1ContainerPort(name="pytorchjob-port", container_port=MASTER_PORT, protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests=res["requests"], limits=res["limits"]),
        volume_mounts=[k8s.V1VolumeMount(**_snake(base.shm_mount()))],
        # on an error the log tail becomes the termination message: the failure report shows it
        termination_message_policy="FallbackToLogsOnError",
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=sec["allowPrivilegeEscalation"],
            capabilities=k8s.V1Capabilities(drop=sec["capabilities"]["drop"], add=sec["capabilities"].get("add"))),
    )
    shm = base.shm_volume(cfg)
    net = base.network_pod_fields(cfg)  # launch.network.host_network
    pod_spec = k8s.V1PodSpec(
        containers=[container],
        service_account_name=launch.service_account,
        # the training processes never call the Kubernetes API: no token in their pods
        automount_service_account_token=False,
        host_network=net.get("hostNetwork"), dns_policy=net.get("dnsPolicy"),
        node_selector=dict(launch.node_selector) or None,
        tolerations=[k8s.V1Toleration(**_snake(t)) for t in base.tolerations(cfg)] or None,
        volumes=[k8s.V1Volume(name=shm["name"], empty_dir=k8s.V1EmptyDirVolumeSource(
            medium="Memory", size_limit=shm["emptyDir"]["sizeLimit"]))],
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=psc["runAsNonRoot"], run_as_user=psc["runAsUser"], run_as_group=psc["runAsGroup"],
            fs_group=psc["fsGroup"], seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        scheduler_name=scheduling.scheduler_name(cfg),
        priority_class_name=scheduling.priority_class_name(cfg),
    )
    template = k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels, annotations=dict(POD_ANNOTATIONS)),
                                     spec=pod_spec)
    replicas = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=template)}
    if launch.nnodes > 1:
        replicas["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=launch.nnodes - 1, restart_policy="OnFailure",
                                                         template=template)
    owners = [k8s.V1OwnerReference(**_snake(owner))] if owner else None
    gang = scheduling.scheduling_policy(cfg)
    elastic = elastic_policy(cfg, name)
    return kf.KubeflowOrgV1PyTorchJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace or launch.namespace, owner_references=owners,
                                  labels={**labels, **scheduling.job_labels(cfg)}),  # Kueue's: the job's only
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(launch.nproc_per_node),
            pytorch_replica_specs=replicas,
            elastic_policy=kf.KubeflowOrgV1ElasticPolicy(
                rdzv_conf=[kf.KubeflowOrgV1RDZVConf(**c) for c in elastic.pop("rdzvConf")],
                **_snake(elastic)) if elastic else None,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=launch.backoff_limit, clean_pod_policy=CLEAN_POD_POLICY,
                ttl_seconds_after_finished=TTL_AFTER_FINISHED_S, active_deadline_seconds=active_deadline_s,
                scheduling_policy=kf.KubeflowOrgV1SchedulingPolicy(**_snake(gang)) if gang else None),
        ),
    )


def build_pytorchjob(cfg: RunConfig, stage: str, config_ref: str, name: str | None = None,
                     env: dict[str, str] | None = None, active_deadline_s: int | None = None,
                     variant: str = "", namespace: str | None = None,
                     owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PyTorchJob serialised to a plain dict (what `kubectl apply` or the API server takes)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(
        pytorchjob_model(cfg, stage, config_ref, name=name, env=env, active_deadline_s=active_deadline_s,
                         variant=variant, namespace=namespace, owner=owner))


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
              env: dict[str, str] | None = None, variant: str = "", namespace: str | None = None,
              owner: dict[str, Any] | None = None) -> Any:
        deadline = None if self.timeout_s is None else int(self.timeout_s + self.deadline_margin_s)
        return pytorchjob_model(cfg, stage, config_ref, name=name, env=env, active_deadline_s=deadline,
                                variant=variant, namespace=namespace, owner=owner)

    def _read_pod(self, name: str, namespace: str) -> Any:
        return self._client.core_api.read_namespaced_pod(name=name, namespace=namespace)

    def _list(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        group, version = API_VERSION.split("/")
        return self._client.custom_api.list_namespaced_custom_object(
            group, version, namespace, f"{KIND.lower()}s", label_selector=selector)["items"]

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
