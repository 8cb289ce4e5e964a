"""Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1) on the `torch-distributed` runtime.

The runtime (a ClusterTrainingRuntime installed with Kubeflow Trainer) provides the JobSet with one
`node` replicated job and the torch plugin's PET_* variables; the TrainJob sets image, command,
nodes, processes per node, resources and env, and patches the `node` pods (service account, node
selector, tolerations, /dev/shm) through `podSpecOverrides`.

The object is a plain dict shaped by the TrainJob CRD this project validates against
(../shared/k8s/crds): the `kubeflow.trainer` SDK's models target a newer API (`runtimePatches`) and
its `TrainerClient` resolves runtimes cluster-wide on every read (a ClusterRole just to watch one
job), so the launcher talks to the API with the kubernetes `CustomObjectsApi` directly, needing no
more than the namespaced Role in manifests/base/rbac.yaml.
"""

from __future__ import annotations

from typing import Any, ClassVar

from versavit.config import RunConfig
from versavit.launch import base, scheduling
from versavit.launch.base import ClusterLauncher, JobState
from versavit.launch.errors import LaunchError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
RUNTIME = "torch-distributed"
NODE = "node"  # replicated job and container name in the torch-distributed runtime
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
RJOB_NAME_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def build_trainjob(cfg: RunConfig, stage: str, config_ref: str, name: str | None = None,
                   env: dict[str, str] | None = None, runtime: str | None = None,
                   runtime_kind: str | None = None, variant: str = "", namespace: str | None = None,
                   owner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The TrainJob as a dict. Pod security settings come from the runtime (the CRD's overrides cannot
    set them): the namespaced `versavit-torch` TrainingRuntime (manifests/components/trainer-runtime)
    runs its pods as non-root; the stock torch-distributed ClusterTrainingRuntime may not. `runtime` /
    `runtime_kind`: None = launch.trainjob_runtime / launch.trainjob_runtime_kind. `namespace` (None:
    launch.namespace) and `owner` (an ownerReferences entry) as for the PyTorchJob. Gang scheduling:
    Kueue's labels on the TrainJob; coscheduling is the runtime's podGroupPolicy (versavit.launch.scheduling);
    restarts: static rendezvous, the runtime's JobSet restarts the gang (base.torchrun_command)."""
    launch = cfg.launch
    runtime, runtime_kind = _runtime(cfg, runtime, runtime_kind)
    scheduling.check_trainjob(cfg)
    name = name or base.make_job_name(cfg, stage)
    labels = base.job_labels(cfg, stage, variant)
    override: dict[str, Any] = {
        "targetJobs": [{"name": NODE}],
        "serviceAccountName": launch.service_account,
        "volumes": [base.shm_volume(cfg)],
        "containers": [{"name": NODE, "volumeMounts": [base.shm_mount()]}],
    }
    if launch.node_selector:
        override["nodeSelector"] = dict(launch.node_selector)
    if tolerations := base.tolerations(cfg):
        override["tolerations"] = tolerations
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace or launch.namespace,
                     "labels": {**labels, **scheduling.job_labels(cfg)},  # Kueue's: the TrainJob's only
                     **({"ownerReferences": [dict(owner)]} if owner else {})},
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": runtime_kind, "name": runtime},
            "labels": dict(labels),  # onto the derived JobSet and Jobs
            "trainer": {
                "image": launch.image,
                "command": base.torchrun_command(cfg, stage, config_ref, variant),
                "numNodes": launch.nnodes,
                "numProcPerNode": launch.nproc_per_node,
                "resourcesPerNode": base.resources(cfg),
                "env": base.container_env(cfg, env),
            },
            "podSpecOverrides": [override],
        },
    }


def _runtime(cfg: RunConfig, runtime: str | None, runtime_kind: str | None) -> tuple[str, str]:
    """The runtime's (name, kind); refuses network settings a TrainJob cannot carry on the stock runtime: the
    TrainJob API has no field for hostNetwork or capabilities, so they must come from the runtime."""
    runtime = runtime or cfg.launch.trainjob_runtime
    runtime_kind = runtime_kind or cfg.launch.trainjob_runtime_kind
    net = cfg.launch.network
    wanted = [k for k, on in (("host_network", net.host_network), ("ipc_lock", net.ipc_lock)) if on]
    if wanted and runtime == RUNTIME:
        raise LaunchError(f"launch.network.{' and '.join(wanted)}: a TrainJob cannot set these, its runtime must; "
                          f"the stock {RUNTIME} runtime does not. Set launch.trainjob_runtime to a runtime that "
                          "does (e.g. versavit-torch with the component manifests/overlays/h20/network)")
    return runtime, runtime_kind


class TrainJobLauncher(ClusterLauncher):
    """Runs a stage as a TrainJob through the kubernetes CustomObjectsApi / CoreV1Api."""

    backend = "trainjob"
    kind: ClassVar[str] = KIND

    def __init__(self, *args: Any, runtime: str | None = None, runtime_kind: str | None = None,
                 **kwargs: Any):
        """Options as `ClusterLauncher`; `runtime`/`runtime_kind` name the training runtime, e.g.
        ("versavit-torch", "TrainingRuntime") for the one in manifests/components/trainer-runtime;
        None: the config's launch.trainjob_runtime / launch.trainjob_runtime_kind."""
        super().__init__(*args, **kwargs)
        self.runtime, self.runtime_kind = runtime, runtime_kind
        self._custom: Any = None
        self._core: Any = None

    def build(self, cfg: RunConfig, stage: str, config_ref: str, name: str,
              env: dict[str, str] | None = None, variant: str = "", namespace: str | None = None,
              owner: dict[str, Any] | None = None) -> dict[str, Any]:
        return build_trainjob(cfg, stage, config_ref, name=name, env=env, runtime=self.runtime,
                              runtime_kind=self.runtime_kind, variant=variant, namespace=namespace, owner=owner)

    def _read_pod(self, name: str, namespace: str) -> Any:
        return self._core.read_namespaced_pod(name=name, namespace=namespace)

    def _list(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                          label_selector=selector)["items"]

    def _connect(self, namespace: str) -> None:
        from kubernetes import client, config

        if self.client_configuration is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        api = client.ApiClient(self.client_configuration)
        self._custom, self._core = client.CustomObjectsApi(api), client.CoreV1Api(api)

    def _create(self, job: dict[str, Any], namespace: str) -> None:
        try:
            self._custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        except Exception as exc:
            raise base.create_error(KIND, namespace, job["metadata"]["name"], exc) from exc

    def _read(self, name: str, namespace: str) -> dict[str, Any]:
        return self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def _pods(self, name: str, namespace: str) -> list[Any]:
        selector = f"{JOBSET_NAME_LABEL}={name},{RJOB_NAME_LABEL}={NODE}"
        return list(self._core.list_namespaced_pod(namespace, label_selector=selector).items)

    def _is_master(self, pod: Any) -> bool:
        # node 0 of the JobSet hosts torchrun's rank 0 (PET_NODE_RANK = completion index)
        return (pod.metadata.labels or {}).get(JOB_INDEX_LABEL) == "0"

    def _state(self, obj: dict[str, Any], pods: list[Any]) -> JobState:
        conds = base.true_conditions(obj)
        if "Failed" in conds:
            c = conds["Failed"]
            return JobState("failed", "Failed", c.get("reason") or "", c.get("message") or "")
        if "Complete" in conds:
            c = conds["Complete"]
            return JobState("succeeded", "Complete", c.get("reason") or "", c.get("message") or "")
        if "Suspended" in conds:
            return JobState("pending", "Suspended")
        # TrainJob has no Running condition: it runs once its node pods do
        if pods and all((p.status.phase if p.status else None) in ("Running", "Succeeded") for p in pods):
            return JobState("running", "Running")
        return JobState("pending", "Created")

    def _delete(self, name: str, namespace: str) -> None:
        from kubernetes.client import V1DeleteOptions

        self._custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                     body=V1DeleteOptions(propagation_policy="Background"))

    def _open_log(self, pod_name: str, namespace: str) -> Any:
        return self._core.read_namespaced_pod_log(name=pod_name, namespace=namespace, container=NODE,
                                                  follow=True, _preload_content=False)
