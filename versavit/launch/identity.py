"""Where a cluster launch runs from: the driver pod (the KFP step that creates and watches the job).

A training job goes to the namespace of the pod that launches it, which is the KFP run's own namespace
(a Kubeflow profile namespace in a multi-user install, `kubeflow` in a standalone one), and it carries an
owner reference to that pod: when the pod goes (the run is deleted, Argo garbage-collects its pods), the
Kubernetes garbage collector deletes the job and, through the operator's own owner references, its pods.
Outside a pod (a laptop with a kubeconfig) the job goes to `launch.namespace` and has no owner.

The pod is identified, in this order, by
- the downward-API variables the compiled pipeline sets on its steps (`DOWNWARD_ENV`: pipelines/__init__.py
  adds them with kfp-kubernetes `use_field_path_as_env`): namespace, name and uid;
- else the service-account namespace file every pod with a token has, `$HOSTNAME` as the pod name (a pod's
  hostname is its name unless spec.hostname says otherwise), and the uid read from the API (`get pods`).

The owner reference is not a controller reference and does not block the owner's deletion
(`blockOwnerDeletion: false` needs no `pods/finalizers` permission), and it is only ever set in the pod's
own namespace: the garbage collector resolves an owner in the dependent's namespace, so a reference to a
pod elsewhere would make it delete the job at once.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from versavit.config import RunConfig

# env var -> the pod field it holds (Kubernetes downward API, `fieldRef.fieldPath`)
POD_NAMESPACE_ENV, POD_NAME_ENV, POD_UID_ENV = "VERSAVIT_POD_NAMESPACE", "VERSAVIT_POD_NAME", "VERSAVIT_POD_UID"
DOWNWARD_ENV = {POD_NAMESPACE_ENV: "metadata.namespace", POD_NAME_ENV: "metadata.name", POD_UID_ENV: "metadata.uid"}
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class DriverPod:
    """The pod this process runs in. `uid` is None until read from the API (`with_uid`)."""

    namespace: str
    name: str
    uid: str | None = None
    source: Literal["downward-api", "service-account"] = "downward-api"

    def owner_reference(self) -> dict[str, Any]:
        """metadata.ownerReferences entry of a job owned by this pod (Kubernetes field names)."""
        if not self.uid:
            raise ValueError(f"pod {self.namespace}/{self.name}: uid unknown")
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid,
                "controller": False, "blockOwnerDeletion": False}


def current_pod() -> DriverPod | None:
    """The pod this process runs in, or None outside Kubernetes."""
    namespace = os.environ.get(POD_NAMESPACE_ENV, "").strip()
    name = os.environ.get(POD_NAME_ENV, "").strip()
    if namespace and name:
        return DriverPod(namespace, name, os.environ.get(POD_UID_ENV, "").strip() or None, "downward-api")
    try:
        namespace = SA_NAMESPACE_FILE.read_text().strip()
    except OSError:
        return None
    name = (os.environ.get("HOSTNAME") or socket.gethostname()).strip()
    if not (namespace and name):
        return None
    return DriverPod(namespace, name, None, "service-account")


def job_namespace(cfg: RunConfig, pod: DriverPod | None = None) -> str:
    """Where the training jobs of `cfg` go: the launching pod's namespace (launch.namespace_from: pod, the
    default), else launch.namespace (outside a pod, or namespace_from: config)."""
    pod = pod if pod is not None else current_pod()
    if pod is not None and cfg.launch.namespace_from == "pod":
        return pod.namespace
    return cfg.launch.namespace


def with_uid(pod: DriverPod, read_pod: Any) -> tuple[DriverPod | None, str]:
    """`pod` with its uid, read by `read_pod(name, namespace)` (a kubernetes V1Pod or dict) if the downward
    API did not give it; (None, why) when it cannot be known (no `get pods` permission, a hostname that is
    not the pod's name)."""
    if pod.uid:
        return pod, ""
    try:
        obj = read_pod(pod.name, pod.namespace)
    except Exception as exc:  # 403 / 404: no owner reference, the job is still created and watched
        status = getattr(exc, "status", None)
        why = {403: "no permission to get pods", 404: "no pod of that name (hostname is not the pod name?)"}
        return None, f"cannot read pod {pod.namespace}/{pod.name}: {why.get(status, exc)}"
    meta = obj.get("metadata", {}) if isinstance(obj, dict) else getattr(obj, "metadata", None)
    uid = meta.get("uid") if isinstance(meta, dict) else getattr(meta, "uid", None)
    if not uid:
        return None, f"pod {pod.namespace}/{pod.name} has no uid"
    return DriverPod(pod.namespace, pod.name, uid, pod.source), ""
