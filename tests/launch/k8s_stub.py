"""A tiny stand-in for the Kubernetes API server, for the launcher tests (no cluster can run here).

It serves just what the launchers call: create/get/delete of namespaced custom objects
(PyTorchJob, TrainJob), listing pods by label selector, and a pod's log. The job's status follows a
script: the n-th GET of the job shows step n (the last step repeats), and the pods listed reflect the
step of the latest GET. Requests are recorded for the assertions.

It also holds a little cluster state for the preflight (`versavit cluster check`): objects in
`resources` (CRDs, nodes, storage classes, secrets, training runtimes: `add_crd`, `add_node`, ...) are
served by GET (one, or a list), with API discovery (/apis/<group>/<version>) derived from the CRDs and
/version. RBAC is off by default (everything allowed); set `rbac` (and `rbac_as` per impersonated user)
to a set of allowed (verb, group, resource, namespace) rules ("*" matches anything; resource may be
"pods/log"; namespace "" is cluster-scoped) and every resource request is checked against it (403 as the
API server words it), as are SelfSubjectAccessReviews, which are always answered.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-response (a cancelled launcher) is expected here, not an error to print."""

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


POD_LABELS = {
    "pytorchjobs": lambda job: {"training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type": "master",
                                "training.kubeflow.org/job-role": "master", "training.kubeflow.org/replica-index": "0"},
    "trainjobs": lambda job: {"jobset.sigs.k8s.io/jobset-name": job, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                              "batch.kubernetes.io/job-completion-index": "0"},
}
POD_NAME = {"pytorchjobs": "{job}-master-0", "trainjobs": "{job}-node-0-0-x7k2p"}
CONTAINER = {"pytorchjobs": "pytorch", "trainjobs": "node"}
SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
VERSION = {"major": "1", "minor": "31", "gitVersion": "v1.31.0-stub", "gitCommit": "0", "gitTreeState": "clean",
           "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.22", "compiler": "gc", "platform": "linux/amd64"}
_NAMESPACED = re.compile(r"/(?:api/v1|apis/([^/]+)/[^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+)(?:/([^/]+))?)?")
_CLUSTER = re.compile(r"/(?:api/v1|apis/([^/]+)/[^/]+)/([^/]+)(?:/([^/]+)(?:/([^/]+))?)?")


def parse_path(path: str) -> tuple[str, str, str, str, str] | None:
    """(group, namespace, plural, name, subresource) of a resource path; namespace "" = cluster-scoped."""
    if m := _NAMESPACED.fullmatch(path):
        return m.group(1) or "", m.group(2), m.group(3), m.group(4) or "", m.group(5) or ""
    if m := _CLUSTER.fullmatch(path):
        return m.group(1) or "", "", m.group(2), m.group(3) or "", m.group(4) or ""
    return None


def request_attributes(method: str, path: str, query: dict[str, list[str]]) -> tuple[str, str, str, str] | None:
    """(verb, group, resource, namespace) as the API server's authorizer sees a request; None for what every
    authenticated user may do (discovery, /version, SelfSubjectAccessReview)."""
    discovery = re.fullmatch(r"/(version|api|apis)(/[^/]+){0,2}/?", path) and not path.startswith("/api/v1/")
    if path == SSAR_PATH or discovery:
        return None
    parsed = parse_path(path)
    if parsed is None:
        return None
    group, ns, plural, name, sub = parsed
    if method == "GET":
        verb = "get" if name else ("watch" if query.get("watch", [""])[0] in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())
    return verb, group, f"{plural}/{sub}" if sub else plural, ns


@dataclass
class Step:
    """One observed state: true job conditions (a type, or a dict with reason/message) and the master pod."""

    conditions: list[str | dict[str, str]] = field(default_factory=list)
    pod_phase: str | None = None  # None: no pod yet
    container_state: dict[str, Any] | None = None  # Kubernetes ContainerState, e.g. {"running": {}}
    last_state: dict[str, Any] | None = None
    restart_count: int = 0
    pod_conditions: list[dict[str, str]] = field(default_factory=list)
    pod_reason: str | None = None  # pod status.reason, e.g. Evicted
    pod_message: str | None = None


class KubeApiStub:
    """Threaded HTTP server on 127.0.0.1 (free port) speaking a sliver of the Kubernetes REST API."""

    def __init__(self) -> None:
        self.steps: list[Step] = [Step()]
        self.log_text = ""
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace, name)
        self.created: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.log_requests: list[dict[str, list[str]]] = []
        self.requests: list[tuple[str, str]] = []
        self.fail_next_gets = 0  # answer this many job GETs with 500 (transient API trouble)
        self.on_get: Any = None  # callback(step_index) after each job GET
        # cluster state for the preflight, and RBAC (see the module docstring)
        self.resources: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, namespace or "", name)
        self.rbac: set[tuple[str, str, str, str]] | None = None  # None: everything allowed
        self.rbac_as: dict[str, set[tuple[str, str, str, str]]] = {}  # per Impersonate-User
        self.access_reviews: list[dict[str, Any]] = []  # resourceAttributes of each SSAR, plus "user"
        self.denied: list[tuple[str, str, str, str, str]] = []  # (user, verb, group, resource, namespace)
        # namespaces: None = any exists; else a request into another one is 404, as the API server answers
        self.namespaces: set[str] | None = None
        self.collected: list[tuple[str, str, str]] = []  # deleted by `collect_garbage` (owner gone)
        self._gets = 0
        self._step = -1
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="kube-api-stub")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> KubeApiStub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- cluster state and RBAC (the preflight) ---------------------------------------------------
    def add(self, plural: str, obj: dict[str, Any], namespace: str = "") -> dict[str, Any]:
        obj.setdefault("metadata", {}).setdefault("name", "unnamed")
        if namespace:
            obj["metadata"]["namespace"] = namespace
        self.resources[(plural, namespace, obj["metadata"]["name"])] = obj
        return obj

    def add_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        """A CustomResourceDefinition as in its YAML (e.g. manifests/crds/*), shown Established."""
        crd = json.loads(json.dumps(crd))
        crd.setdefault("status", {"conditions": [{"type": "Established", "status": "True"}]})
        return self.add("customresourcedefinitions", crd)

    def add_node(self, name: str, labels: dict[str, str] | None = None, allocatable: dict[str, str] | None = None,
                 taints: list[dict[str, str]] | None = None, unschedulable: bool = False,
                 ready: bool = True) -> dict[str, Any]:
        return self.add("nodes", {"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": name, "labels": dict(labels or {})},
                                  "spec": {"taints": list(taints or []), "unschedulable": unschedulable},
                                  "status": {"allocatable": dict(allocatable or {}), "conditions": [
                                      {"type": "Ready", "status": "True" if ready else "False"}]}})

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        return self.add("secrets", {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                    "metadata": {"name": name}, "data": encoded}, namespace)

    def add_storage_class(self, name: str, default: bool = False,
                          provisioner: str = "rancher.io/local-path") -> dict[str, Any]:
        annotations = {"storageclass.kubernetes.io/is-default-class": "true"} if default else {}
        return self.add("storageclasses", {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                                           "metadata": {"name": name, "annotations": annotations},
                                           "provisioner": provisioner})

    def allows(self, verb: str, group: str, resource: str, namespace: str, user: str = "") -> bool:
        rules = self.rbac_as.get(user) if user else self.rbac
        if rules is None:  # RBAC off (an impersonated user without rules of its own: as RBAC is)
            return self.rbac is None
        return any(all(want in ("*", got) for want, got in zip(rule, (verb, group, resource, namespace),
                                                               strict=True)) for rule in rules)

    def _discovery(self, group: str, version: str) -> dict[str, Any] | None:
        found = []
        for (plural, _, _), crd in self.resources.items():
            spec = crd.get("spec") or {}
            if plural == "customresourcedefinitions" and spec.get("group") == group and any(
                    v.get("name") == version and v.get("served", True) for v in spec.get("versions") or []):
                names = spec.get("names") or {}
                found.append({"name": names.get("plural"), "singularName": names.get("singular", ""),
                              "namespaced": spec.get("scope") == "Namespaced", "kind": names.get("kind"),
                              "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]})
        if not found:
            return None
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": f"{group}/{version}",
                "resources": found}

    def _list(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        return [obj for (p, ns, _), obj in self.resources.items() if p == plural and ns == namespace]

    def add_pod(self, namespace: str, name: str, uid: str, phase: str = "Running") -> dict[str, Any]:
        """A pod that is not a job's (e.g. the KFP step that launches one): GET by name returns it."""
        return self.add("pods", {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "uid": uid},
                                 "spec": {"containers": [{"name": "main", "image": "driver"}]},
                                 "status": {"phase": phase}}, namespace)

    def delete_pod(self, namespace: str, name: str) -> None:
        self.resources.pop(("pods", namespace, name), None)

    def collect_garbage(self) -> list[tuple[str, str, str]]:
        """The garbage collector's rule for owner references (kube-controller-manager): an owner is looked up
        in the dependent's own namespace by kind, name and uid; a dependent none of whose owners exists is
        deleted. (Only Pod owners here, the only kind the launcher names.) Returns what it deleted."""
        gone = []
        for key, obj in list(self.objects.items()):
            owners = obj["metadata"].get("ownerReferences") or []
            pods = [o for o in owners if o.get("kind") == "Pod" and o.get("apiVersion") == "v1"]
            if not pods:
                continue
            alive = [o for o in pods if (pod := self.resources.get(("pods", key[1], o["name"])))
                     and pod["metadata"].get("uid") == o["uid"]]
            if not alive:
                del self.objects[key]
                gone.append(key)
        self.collected += gone
        return gone

    # ------------------------------------------------------------------------------------------
    def _job_view(self, key: tuple[str, str, str]) -> dict[str, Any]:
        with self._lock:
            index = min(self._gets, len(self.steps) - 1)
            self._gets += 1
            self._step = index
        step = self.steps[index]
        obj = json.loads(json.dumps(self.objects[key]))
        conds = []
        for c in step.conditions:
            c = {"type": c} if isinstance(c, str) else dict(c)
            conds.append({"status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z",
                          "lastUpdateTime": "2026-01-01T00:00:00Z", "reason": c["type"], "message": "", **c})
        obj["status"] = {"conditions": conds}
        if self.on_get:
            self.on_get(index)
        return obj

    def _pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part and "!" not in part)
        step = self.steps[self._step] if self._step >= 0 else Step()
        pods = []
        for plural, ns, name in list(self.objects):
            if ns != namespace or step.pod_phase is None:
                continue
            labels = POD_LABELS[plural](name)
            if any(labels.get(k) != v for k, v in wanted.items()):
                continue
            status = {"phase": step.pod_phase, "conditions": step.pod_conditions,
                      **({"reason": step.pod_reason, "message": step.pod_message or ""} if step.pod_reason else {}),
                      "containerStatuses": [{
                "name": CONTAINER[plural], "image": "ghcr.io/versavit/trainer:0.1.0", "imageID": "sha256:0",
                "ready": step.pod_phase == "Running", "restartCount": step.restart_count,
                "state": step.container_state or {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                **({"lastState": step.last_state} if step.last_state else {}),
            }]}
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": POD_NAME[plural].format(job=name), "namespace": ns, "labels": labels,
                                      "creationTimestamp": "2026-01-01T00:00:00Z"},
                         "spec": {"containers": [{"name": CONTAINER[plural], "image": "trainer"}]},
                         "status": status})
        return pods

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                  "reason": reason, "message": message, "code": code})

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"null")

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                stub.requests.append((method, url.path))
                user = self.headers.get("Impersonate-User", "")
                attrs = request_attributes(method, url.path, query)
                if attrs is not None and not stub.allows(*attrs, user=user):
                    return self._forbidden(user, *attrs)
                if method == "GET" and url.path.rstrip("/") == "/version":
                    return self._send(200, VERSION)
                if method == "POST" and url.path == SSAR_PATH:
                    return self._access_review(user)
                if method == "GET" and (m := re.fullmatch(r"/apis/([^/]+)/([^/]+)", url.path)):
                    found = stub._discovery(m.group(1), m.group(2))
                    return self._send(200, found) if found else self._status(404, "NotFound", "not found")
                parsed = parse_path(url.path)
                if method == "GET" and parsed and parsed[3] and not parsed[4] and \
                        (key := (parsed[2], parsed[1], parsed[3])) in stub.resources:
                    return self._send(200, stub.resources[key])
                if m := re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", url.path):
                    return self._custom(method, m.group(3), m.group(4), m.group(5))
                if method == "GET" and (m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)):
                    items = stub._pods(m.group(1), query.get("labelSelector", [""])[0])
                    return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                if method == "GET" and re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log", url.path):
                    stub.log_requests.append(query)
                    return self._send(200, stub.log_text, "text/plain")
                if method == "GET" and parsed and not parsed[4]:  # the cluster state: one object, or a list
                    group, ns, plural, name, _ = parsed
                    if name:
                        return self._status(404, "NotFound", f'{plural}{"." + group if group else ""} "{name}" '
                                            "not found")
                    return self._send(200, {"apiVersion": "v1", "kind": "List", "metadata": {},
                                            "items": stub._list(plural, ns)})
                self._status(404, "NotFound", f"no route for {method} {url.path}")

            def _forbidden(self, user: str, verb: str, group: str, resource: str, ns: str) -> None:
                stub.denied.append((user, verb, group, resource, ns))
                plural, _, sub = resource.partition("/")
                where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
                self._status(403, "Forbidden", f'{plural}{"." + group if group else ""} is forbidden: User '
                             f'"{user or "stub-user"}" cannot {verb} resource "{resource}" in API group "{group}"'
                             f"{where}")

            def _access_review(self, user: str) -> None:
                body = self._body()
                attrs = dict((body.get("spec") or {}).get("resourceAttributes") or {})
                stub.access_reviews.append({**attrs, "user": user})
                resource = attrs.get("resource", "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
                allowed = stub.allows(attrs.get("verb", ""), attrs.get("group", ""), resource,
                                      attrs.get("namespace", ""), user=user)
                body["status"] = {"allowed": allowed, **({} if allowed else {"reason": "no RBAC rule allows it"})}
                self._send(201, body)

            def _custom(self, method: str, ns: str, plural: str, name: str | None) -> None:
                if stub.namespaces is not None and ns not in stub.namespaces:
                    return self._status(404, "NotFound", f'namespaces "{ns}" not found')
                if method == "POST" and name is None:
                    body = self._body()
                    key = (plural, ns, body["metadata"]["name"])
                    if body["metadata"].get("namespace", ns) != ns:
                        return self._status(400, "BadRequest", "the namespace of the provided object does not "
                                            "match the namespace sent on the request")
                    for i, ref in enumerate(body["metadata"].get("ownerReferences") or []):
                        if missing := [f for f in ("apiVersion", "kind", "name", "uid") if not ref.get(f)]:
                            return self._status(422, "Invalid", f"metadata.ownerReferences[{i}].{missing[0]}: "
                                                "Required value")
                    if key in stub.objects:
                        return self._status(409, "AlreadyExists", f"{plural} {key[2]} already exists")
                    body["metadata"].update(uid="6f1d2c1e-0000-4000-8000-000000000001", resourceVersion="1",
                                            creationTimestamp="2026-01-01T00:00:00Z")
                    stub.objects[key] = body
                    stub.created.append(json.loads(json.dumps(body)))
                    return self._send(201, body)
                if method == "GET" and name is None:  # a list, by label selector (equality terms only)
                    selector = parse_qs(urlparse(self.path).query).get("labelSelector", [""])[0]
                    wanted = dict(t.split("=", 1) for t in selector.split(",") if "=" in t)
                    items = [o for (p, n, _), o in stub.objects.items() if p == plural and n == ns and all(
                        (o["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]
                    return self._send(200, {"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})
                key = (plural, ns, name or "")
                if key not in stub.objects:
                    return self._status(404, "NotFound", f"{plural} {name!r} not found")
                if method == "GET":
                    if stub.fail_next_gets > 0:
                        stub.fail_next_gets -= 1
                        return self._status(500, "InternalError", "etcdserver: request timed out")
                    return self._send(200, stub._job_view(key))
                if method == "DELETE":
                    self._body()
                    del stub.objects[key]
                    stub.deleted.append(key)
                    return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
                self._status(405, "MethodNotAllowed", method)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler
