"""A tiny stand-in for the Kubernetes API server, for the launcher tests (no cluster can run here).

It serves just what the launchers call: create/get/delete of namespaced custom objects
(PyTorchJob, TrainJob), listing pods by label selector, and a pod's log. The job's status follows a
script: the n-th GET of the job shows step n (the last step repeats), and the pods listed reflect the
step of the latest GET. Requests are recorded for the assertions.
"""

from __future__ import annotations

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


@dataclass
class Step:
    """One observed state: true job conditions (a type, or a dict with reason/message) and the master pod."""

    conditions: list[str | dict[str, str]] = field(default_factory=list)
    pod_phase: str | None = None  # None: no pod yet
    container_state: dict[str, Any] | None = None  # Kubernetes ContainerState, e.g. {"running": {}}
    last_state: dict[str, Any] | None = None
    restart_count: int = 0
    pod_conditions: list[dict[str, str]] = field(default_factory=list)


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
            status = {"phase": step.pod_phase, "conditions": step.pod_conditions, "containerStatuses": [{
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
                if m := re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", url.path):
                    return self._custom(method, m.group(3), m.group(4), m.group(5))
                if method == "GET" and (m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)):
                    items = stub._pods(m.group(1), query.get("labelSelector", [""])[0])
                    return self._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
                if method == "GET" and re.fullmatch(r"/api/v1/namespaces/[^/]+/pods/[^/]+/log", url.path):
                    stub.log_requests.append(query)
                    return self._send(200, stub.log_text, "text/plain")
                self._status(404, "NotFound", f"no route for {method} {url.path}")

            def _custom(self, method: str, ns: str, plural: str, name: str | None) -> None:
                if method == "POST" and name is None:
                    body = self._body()
                    key = (plural, ns, body["metadata"]["name"])
                    if key in stub.objects:
                        return self._status(409, "AlreadyExists", f"{plural} {key[2]} already exists")
                    body["metadata"].update(uid="6f1d2c1e-0000-4000-8000-000000000001", resourceVersion="1",
                                            creationTimestamp="2026-01-01T00:00:00Z")
                    stub.objects[key] = body
                    stub.created.append(json.loads(json.dumps(body)))
                    return self._send(201, body)
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
