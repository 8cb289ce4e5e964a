"""One launcher interface, three backends: local torchrun, Kubeflow PyTorchJob, Kubeflow Trainer v2 TrainJob.

    launcher = get_launcher(cfg)                 # (versavit.launch) picks cfg.launch.backend
    result = launcher.launch(cfg, "multitask")   # -> LaunchResult (outputs = the stage's stage.json)

The cluster backends share one life cycle (`ClusterLauncher`): take the stage's lease (as the local
launcher does: one run at a time writes a stage folder), publish the resolved config to an URL
the pods can read, create the job, poll it until it ends (streaming the master's log meanwhile),
and on failure raise a `LaunchError` with the job's own reason (failed condition, container exit
reason/code and termination message, log tail). A timeout or a cancel (Ctrl-C, SIGTERM from KFP)
deletes the job, so nothing keeps holding GPUs.

Config transport: the pods get `--config s3://<workdir>/launch/<stage>/<job>.yaml`, a copy of the
resolved config written by the launcher (the config holds no credentials: only env var names).
`storage.localize_config` turns such a URL back into a local file inside the pod.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from versavit.config import RunConfig, config_hash, dump_yaml
from versavit.launch import faults
from versavit.launch.errors import JobFailed, LaunchError, LaunchTimeout, TransientJobFailed, TransientLaunchError
from versavit.layout import lease_url, stage_manifest_url
from versavit.storage import STORAGE_ENV
from versavit.train import lease
from versavit.weights import pod_env

# Plain (non-secret) variables of the launching process that the training pods inherit, so the
# stage's MLflow run nests under the pipeline's parent run and carries the KFP run id.
FORWARDED_ENV = ("VERSAVIT_PARENT_RUN_ID", "KFP_RUN_ID")
_CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.I)

TRAINER_UID = 1000  # the non-root user of images/trainer
SHM_VOLUME = "dshm"
DEFAULT_TIMEOUT_S = 3 * 24 * 3600.0
# Container states that never resolve by waiting: past this grace the job fails instead of
# sitting pending until the timeout (e.g. a missing secret, a wrong image name).
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")


@dataclass
class LaunchResult:
    """What a finished training stage left: its stage.json and where it ran."""

    backend: str
    stage: str
    outputs: dict[str, Any]
    job_name: str | None = None
    namespace: str | None = None
    config_url: str | None = None
    elapsed_s: float = 0.0


class Launcher(ABC):
    """Runs one training stage somewhere and returns when it has finished."""

    backend: ClassVar[str]

    @abstractmethod
    def launch(self, cfg: RunConfig, stage: str, config_url: str | None = None,
               env: dict[str, str] | None = None, variant: str = "") -> LaunchResult:
        """Run `stage` of `cfg` (outputs in stages/<stage>[-<variant>]); raise `LaunchError` if it fails."""


# --------------------------------------------------------------------------------------------
# pieces of the pod spec shared by PyTorchJob and TrainJob (plain dicts, Kubernetes field names)


def _dns_label(text: str, limit: int) -> str:
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return out if out[:1].isalpha() else f"v{out}"[:limit].rstrip("-")


def make_job_name(cfg: RunConfig, stage: str) -> str:
    """`<run>-<stage>-<6 hex>`: a fresh DNS-1035 name per launch, short enough for derived pod/service names."""
    return f"{_dns_label(cfg.name, 20)}-{stage}-{uuid.uuid4().hex[:6]}"


def _label_value(text: str) -> str:
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", out)


def job_labels(cfg: RunConfig, stage: str, variant: str = "") -> dict[str, str]:
    """Labels on the job and its pods: find a run's jobs with `-l versavit.io/run=<name>`."""
    labels = {
        "app.kubernetes.io/name": "versavit-trainer",
        "app.kubernetes.io/part-of": "versavit",
        "app.kubernetes.io/managed-by": "versavit-launcher",
        "versavit.io/run": _label_value(cfg.name) or "versavit",
        "versavit.io/stage": stage,
        "versavit.io/variant": _label_value(variant),  # "" for none (an empty label value is valid)
        "versavit.io/config-hash": config_hash(cfg),
    }
    if kfp_run := _label_value(os.environ.get("KFP_RUN_ID", "")):
        labels["versavit.io/kfp-run-id"] = kfp_run
    return labels


EVAL_STAGE_PREFIX = "eval-"  # a training-type evaluator's job (versavit.eval.jobs): stage eval-<evaluator>


def entry_module(stage: str) -> str:
    """What each rank runs (`python -m`): the training entry, or for `eval-<evaluator>` jobs the evaluation's."""
    return "versavit.eval.entry" if stage.startswith(EVAL_STAGE_PREFIX) else "versavit.train.entry"


def torchrun_command(cfg: RunConfig, stage: str, config_ref: str, variant: str = "",
                     elastic: bool = False) -> list[str]:
    """The container command; the same for every replica (torchrun reads the PET_* variables the operators set
    as its defaults).

    `elastic` (PyTorchJob): c10d rendezvous with torchrun's restart budget (launch.max_restarts), so a
    restarted or replaced pod rejoins and every rank resumes from the latest checkpoint: on several nodes the
    endpoint and id come from the operator's elasticPolicy variables (PET_RDZV_ENDPOINT, PET_RDZV_ID); one
    node rendezvouses with itself (--standalone). Otherwise (TrainJob) static rendezvous on PET_MASTER_ADDR /
    PET_NODE_RANK, no torchrun restarts: the runtime's JobSet restarts the whole gang."""
    launch = cfg.launch
    if not elastic:
        rendezvous = ["--max-restarts", "0"]
    elif launch.nnodes == 1:
        rendezvous = ["--standalone", "--max-restarts", str(launch.max_restarts)]
    else:
        rendezvous = ["--rdzv-backend", "c10d", "--max-restarts", str(launch.max_restarts)]
    return ["python", "-m", "torch.distributed.run", "--nnodes", str(launch.nnodes),
            "--nproc-per-node", str(launch.nproc_per_node), *rendezvous,
            "-m", entry_module(stage), "--stage", stage, "--config", config_ref,
            *(["--variant", variant] if variant else [])]


def secret_env(cfg: RunConfig) -> list[dict[str, Any]]:
    """`launch.secret_env` as secretKeyRef entries: the pod spec names secrets, never holds values."""
    out = []
    for name, ref in cfg.launch.secret_env.items():
        secret, sep, key = ref.partition("/")
        if not (sep and secret and key):
            raise LaunchError(f"launch.secret_env.{name} = {ref!r}: expected 'secret-name/key'")
        out.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return out


def container_env(cfg: RunConfig, extra: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Env of the training container: plain settings, forwarded run ids, then the secret refs."""
    plain: dict[str, str] = {"PYTHONUNBUFFERED": "1", STORAGE_ENV: cfg.storage.model_dump_json()}
    if cfg.storage.s3_endpoint_url:
        plain["AWS_ENDPOINT_URL_S3"] = cfg.storage.s3_endpoint_url
    plain.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    plain.update(pod_env(cfg))  # HF_HUB_OFFLINE=1 once checkpoints are staged (weights.url)
    plain["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"  # mixed shapes per step (versavit.train.engine)
    plain.update(cfg.launch.network.nccl_env)  # NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ... (launch.network)
    plain.update(extra or {})
    for name in plain:
        if name in cfg.launch.secret_env or _CREDENTIAL_NAME.search(name):
            raise LaunchError(f"env {name!r} looks like a credential: pass it through launch.secret_env "
                              "(a secret reference), never as a value in the job spec")
    return [{"name": k, "value": v} for k, v in plain.items()] + secret_env(cfg)


def resources(cfg: RunConfig) -> dict[str, dict[str, str]]:
    """Requests/limits of one node. GPUs: requests == limits (extended resources need that); memory is
    limited at the request so a leak is an OOMKill with a reason, not a node-wide eviction; CPU is
    not limited (throttling slows NCCL and data loading)."""
    res = cfg.launch.resources
    requests = {"cpu": res.cpu, "memory": res.memory}
    limits = {"memory": res.memory}
    if res.gpus_per_node:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpus_per_node)
    for name, count in cfg.launch.network.rdma_resources.items():  # RDMA devices: extended resources too
        requests[name] = limits[name] = str(count)
    return {"requests": requests, "limits": limits}


def shm_volume(cfg: RunConfig) -> dict[str, Any]:
    """/dev/shm in RAM with a size cap: the container default (64 MiB) breaks DataLoader workers and NCCL."""
    return {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": cfg.launch.resources.shm_size}}


def shm_mount() -> dict[str, str]:
    return {"name": SHM_VOLUME, "mountPath": "/dev/shm"}


def tolerations(cfg: RunConfig) -> list[dict[str, Any]]:
    out = []
    for tol in cfg.launch.tolerations:
        item: dict[str, Any] = dict(tol)
        if "tolerationSeconds" in item:  # the schema holds strings; the API wants an integer
            item["tolerationSeconds"] = int(item["tolerationSeconds"])
        out.append(item)
    return out


def pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": TRAINER_UID, "runAsGroup": TRAINER_UID, "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context(cfg: RunConfig | None = None) -> dict[str, Any]:
    """No privilege escalation, every capability dropped; with launch.network.ipc_lock, IPC_LOCK added back."""
    caps: dict[str, list[str]] = {"drop": ["ALL"]}
    if cfg is not None and cfg.launch.network.ipc_lock:
        caps["add"] = ["IPC_LOCK"]  # pinning (registering) memory for RDMA
    return {"allowPrivilegeEscalation": False, "capabilities": caps}


def network_pod_fields(cfg: RunConfig) -> dict[str, Any]:
    """Pod-level fields of launch.network: the node's network namespace (hostNetwork), with the DNS policy
    that keeps cluster service names resolvable from it; none by default."""
    if not cfg.launch.network.host_network:
        return {}
    return {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}


def publish_config(cfg: RunConfig, stage: str, job_name: str) -> str:
    """Write the resolved config where every pod can read it; return its URL."""
    from versavit import storage

    _require_remote_workdir(cfg)
    url = storage.join(cfg.workdir, "launch", stage, f"{job_name}.yaml")
    storage.ensure_bucket(url)  # also proves the endpoint and credentials work, before any GPU is held
    storage.write_text(url, dump_yaml(cfg))
    return url


def _require_remote_workdir(cfg: RunConfig) -> None:
    from versavit import storage

    if not storage.is_remote(cfg.workdir):
        raise LaunchError(f"launch.backend={cfg.launch.backend!r} needs a workdir the cluster's pods can reach "
                          f"(s3://...), got {cfg.workdir!r}")


# --------------------------------------------------------------------------------------------
# the shared cluster life cycle


@dataclass
class JobState:
    """Where a cluster job stands: phase is pending, running, succeeded or failed."""

    phase: str
    summary: str
    reason: str = ""
    message: str = ""


def true_conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The job's conditions whose status is True, by type."""
    conds = (obj.get("status") or {}).get("conditions") or []
    return {c.get("type"): c for c in conds if str(c.get("status")) == "True"}


def _get(obj: Any, *path: str) -> Any:
    for name in path:
        if obj is None:
            return None
        obj = getattr(obj, name, None)
    return obj


def describe_pod(pod: Any, max_lines: int = 20) -> str:
    """One pod in a few lines: phase, why a container ended or waits, why it is not scheduled."""
    name, phase = _get(pod, "metadata", "name"), _get(pod, "status", "phase")
    lines = [f"pod {name} ({phase})"]
    if reason := _get(pod, "status", "reason"):  # e.g. Evicted
        lines.append(f"  {reason}: {_get(pod, 'status', 'message') or ''}".rstrip(": "))
    statuses = (_get(pod, "status", "init_container_statuses") or []) + \
        (_get(pod, "status", "container_statuses") or [])
    for cs in statuses:
        term = _get(cs, "state", "terminated")
        if not (term and term.exit_code):
            last = _get(cs, "last_state", "terminated")  # restarted in place: the previous run's end
            term = last if last and last.exit_code else term
        waiting = _get(cs, "state", "waiting")
        if term and term.exit_code:
            lines.append(f"  container {cs.name} terminated: {term.reason or 'Error'}, exit code {term.exit_code}"
                         + (f" (restarts: {cs.restart_count})" if cs.restart_count else ""))
            msg = (term.message or "").strip().splitlines()[-max_lines:]
            lines += [f"    {ln}" for ln in msg]
        elif waiting and waiting.reason and waiting.reason not in ("ContainerCreating", "PodInitializing"):
            lines.append(f"  container {cs.name} waiting: {waiting.reason}: {waiting.message or ''}".rstrip(": "))
    for cond in _get(pod, "status", "conditions") or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            lines.append(f"  not scheduled: {cond.reason}: {cond.message or ''}".rstrip(": "))
    return "\n".join(lines)


def _has_termination_message(pod: Any) -> bool:
    for cs in _get(pod, "status", "container_statuses") or []:
        for term in (_get(cs, "state", "terminated"), _get(cs, "last_state", "terminated")):
            if term and term.exit_code and (term.message or "").strip():
                return True
    return False


def _stuck_reason(pod: Any) -> str | None:
    for cs in (_get(pod, "status", "init_container_statuses") or []) + \
            (_get(pod, "status", "container_statuses") or []):
        waiting = _get(cs, "state", "waiting")
        if waiting and waiting.reason in STUCK_REASONS:
            return f"{waiting.reason}: {waiting.message or ''}".rstrip(": ")
    return None


class _LogFollower(threading.Thread):
    """Follows one container's log (chunked HTTP stream) and hands each line to a sink."""

    def __init__(self, open_stream: Callable[[], Any], sink: Callable[[str], None], tail: collections.deque):
        super().__init__(daemon=True, name="versavit-log-follower")
        self._open, self._sink, self._tail = open_stream, sink, tail
        self._resp: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._resp = self._open()
            buf = b""
            for chunk in self._resp.stream(4096, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    self._emit(line)
            if buf:
                self._emit(buf)
        except Exception as exc:  # logs are best effort: the job's status decides success
            self.error = exc
        finally:
            self.stop()

    def _emit(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self._tail.append(line)
        self._sink(line)

    def stop(self) -> None:
        resp, self._resp = self._resp, None
        if resp is not None:
            with contextlib.suppress(Exception):
                resp.release_conn()
                resp.close()


@contextlib.contextmanager
def _sigterm_raises_interrupt(cancelled: threading.Event) -> Iterator[None]:
    """KFP cancels a run by SIGTERM to the step's pod: treat it like Ctrl-C so the job gets deleted.

    The handler also sets `cancelled`, which the poll loop checks: an interrupt raised while the
    main thread runs a finaliser is swallowed by Python ("Exception ignored in ..."), the flag is not.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        cancelled.set()
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class _Watch:
    """What the poll loop remembers between polls."""

    follower: _LogFollower | None = None
    followed: tuple[str, int] | None = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))
    summary: str = ""
    stuck_since: dict[str, float] = field(default_factory=dict)
    api_errors: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    expected_pods: int = 1  # launch.nnodes: the job has started once this many pods run
    schedule_deadline: float | None = None  # monotonic; launch.scheduling.schedule_timeout_s after the create
    started: bool = False


class ClusterLauncher(Launcher):
    """Create a job, wait for it with a timeout, stream the master's log, delete it on cancel/timeout.

    Subclasses supply the object and the API calls; everything that decides is here.
    """

    kind: ClassVar[str]

    def __init__(self, client_configuration: Any = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 poll_interval_s: float = 10.0, log_sink: Callable[[str], None] | None = None,
                 status_sink: Callable[[str], None] | None = None, stream_logs: bool = True,
                 stuck_grace_s: float = 300.0, max_api_errors: int = 6, job_name: str | None = None,
                 lease_ttl_s: float = lease.TTL_S, lease_renew_s: float = lease.RENEW_S):
        """`client_configuration`: a kubernetes.client.Configuration (None: in-cluster or kubeconfig).
        `timeout_s`: None waits forever. `stuck_grace_s`: how long a pod may sit in an unrecoverable
        waiting state (image pull, missing secret) before the job is failed and deleted.
        `lease_ttl_s` / `lease_renew_s`: the stage lease this launcher holds while its job runs."""
        self.client_configuration = client_configuration
        self.timeout_s = timeout_s
        self.poll_interval_s = poll_interval_s
        self.log_sink = log_sink or _stderr_line
        self.status_sink = status_sink or (lambda msg: _stderr_line(f"[launch] {msg}"))
        self.stream_logs = stream_logs
        self.stuck_grace_s = stuck_grace_s
        self.max_api_errors = max_api_errors
        self.job_name = job_name
        self.lease_ttl_s, self.lease_renew_s = lease_ttl_s, lease_renew_s

    # -- what a backend provides ---------------------------------------------------------------
    @abstractmethod
    def build(self, cfg: RunConfig, stage: str, config_ref: str, name: str,
              env: dict[str, str] | None = None, variant: str = "", namespace: str | None = None,
              owner: dict[str, Any] | None = None) -> Any:
        """The job object to create (SDK model or dict), in `namespace` (None: launch.namespace), owned by
        `owner` (an ownerReferences entry) if given."""

    def _read_pod(self, name: str, namespace: str) -> Any:
        """A pod by name (the driver pod's uid for the owner reference); after `_connect`."""
        raise NotImplementedError

    def _list(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        """The jobs of this kind in `namespace` matching a label selector, as dicts; after `_connect`."""
        raise NotImplementedError

    @abstractmethod
    def _connect(self, namespace: str) -> None:
        """Make the API clients for `namespace`."""

    @abstractmethod
    def _create(self, job: Any, namespace: str) -> None: ...

    @abstractmethod
    def _read(self, name: str, namespace: str) -> dict[str, Any]:
        """The job as a dict (Kubernetes field names)."""

    @abstractmethod
    def _pods(self, name: str, namespace: str) -> list[Any]:
        """The job's pods (kubernetes V1Pod)."""

    @abstractmethod
    def _is_master(self, pod: Any) -> bool: ...

    @abstractmethod
    def _state(self, obj: dict[str, Any], pods: list[Any]) -> JobState: ...

    @abstractmethod
    def _delete(self, name: str, namespace: str) -> None: ...

    @abstractmethod
    def _open_log(self, pod_name: str, namespace: str) -> Any:
        """A streaming (follow) response of the master container's log."""

    # -- the life cycle ------------------------------------------------------------------------
    def launch(self, cfg: RunConfig, stage: str, config_url: str | None = None,
               env: dict[str, str] | None = None, variant: str = "") -> LaunchResult:
        """Create the job and watch it to its end, holding the stage's lease (`versavit.train.lease`, as the
        local launcher does) from before the job exists until it has ended: renewed while the job is watched,
        released however the watch ends. A second launch of a stage whose lease is held fails at once with
        `LeaseHeldError` naming the holder, before it publishes or creates anything, unless the holder is a pod
        of this namespace that has ended (a KFP retry after the step's pod was evicted: the lease is taken over).

        A failure is `TransientLaunchError` (the cluster's: a retry may succeed) or a permanent `LaunchError`,
        its message tagged with the classification (`versavit.launch.faults`). A permanent one is recorded
        for the KFP run ($KFP_RUN_ID): a KFP retry of the step then fails at once with the same message."""
        from versavit import storage

        storage.configure(cfg.storage)
        start = time.monotonic()
        if config_url is None:
            _require_remote_workdir(cfg)
        elif not storage.is_remote(config_url):
            raise LaunchError(f"config_url {config_url!r} is a local path: the pods cannot read it (use s3://)")
        if storage.is_remote(cfg.workdir):
            storage.ensure_bucket(cfg.workdir)  # also proves the endpoint and credentials work
        faults.check_not_failed(cfg, stage, variant)
        url = lease_url(cfg, stage, variant)
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(lease.hold(url, ttl_s=self.lease_ttl_s, renew_s=self.lease_renew_s))
                except lease.LeaseHeldError:
                    if not self._take_over_from_dead_pod(cfg, stage, variant):
                        raise
                    stack.enter_context(lease.hold(url, ttl_s=self.lease_ttl_s, renew_s=self.lease_renew_s))
                return self._launch(cfg, stage, config_url, env, variant, start)
        except LaunchError as exc:
            if not exc.transient and (url := faults.record_permanent(cfg, stage, variant, exc)):
                self.status_sink(f"permanent failure recorded in {url}: a KFP retry of this step ends at once")
            raise

    def _launch(self, cfg: RunConfig, stage: str, config_url: str | None, env: dict[str, str] | None,
                variant: str, start: float) -> LaunchResult:
        from versavit import storage
        from versavit.launch import identity

        pod = identity.current_pod()
        namespace = identity.job_namespace(cfg, pod)
        name = self.job_name or make_job_name(cfg, f"{stage}-{variant}" if variant else stage)
        if config_url is None:
            config_url = publish_config(cfg, stage, name)
        self._connect(namespace)
        job = self.build(cfg, stage, config_url, name, env, variant=variant, namespace=namespace,
                         owner=self._owner(pod, namespace))
        self._delete_leftovers(cfg, stage, variant, namespace)
        watch = _Watch(expected_pods=cfg.launch.nnodes)
        timeout_s = cfg.launch.scheduling.schedule_timeout_s
        try:
            with _sigterm_raises_interrupt(watch.cancelled):
                # inside: a cancel that lands while the create is in flight still cleans up
                self._create(job, namespace)
                if timeout_s:
                    watch.schedule_deadline = time.monotonic() + timeout_s
                self.status_sink(f"created {self.kind} {namespace}/{name} ({cfg.launch.nnodes} node(s) x "
                                 f"{cfg.launch.nproc_per_node} process(es)); config {config_url}")
                self._wait(name, namespace, watch)
        except KeyboardInterrupt:
            self.status_sink(f"cancelled: deleting {self.kind} {namespace}/{name}")
            self._delete_quietly(name, namespace)
            raise
        finally:
            if watch.follower is not None:
                watch.follower.stop()
        try:
            outputs = json.loads(storage.read_text(stage_manifest_url(cfg, stage, variant)))
        except storage.StorageError as exc:
            raise LaunchError(f"{self.kind} {namespace}/{name} succeeded but its stage.json cannot be read: "
                              f"{exc}") from exc
        return LaunchResult(cfg.launch.backend, stage, outputs, job_name=name, namespace=namespace,
                            config_url=config_url, elapsed_s=time.monotonic() - start)

    def _take_over_from_dead_pod(self, cfg: RunConfig, stage: str, variant: str) -> bool:
        """A KFP retry of a step whose pod was evicted finds that pod's lease, unrenewed but not yet expired
        (`lease.TTL_S`). Its holder's host is the dead pod's name: if that pod exists in this pod's namespace and
        has ended (phase Failed or Succeeded), nobody renews the lease any more: remove it and say so. A pod that
        cannot be read (gone, elsewhere, no permission) proves nothing: the lease stands."""
        from versavit.launch import identity

        pod = identity.current_pod()
        url = lease_url(cfg, stage, variant)
        record = lease.read(url)
        if pod is None or not record or record.get("host") in (None, pod.name):
            return False
        self._connect(pod.namespace)
        try:
            holder = self._read_pod(str(record["host"]), pod.namespace)
        except Exception:
            return False
        phase = holder.get("status", {}).get("phase") if isinstance(holder, dict) else _get(holder, "status", "phase")
        if phase not in ("Failed", "Succeeded"):
            return False
        self.status_sink(f"the stage's lease is held by pod {pod.namespace}/{record['host']}, which has ended "
                         f"({phase}): taking it over")
        lease._remove(url)  # the lease module's own removal: a holder that has ended cannot release it
        return True

    def _owner(self, pod: Any, namespace: str) -> dict[str, Any] | None:
        """The ownerReferences entry to the driver pod (`versavit.launch.identity`): only in its own namespace."""
        from versavit.launch import identity

        if pod is None or pod.namespace != namespace:
            return None
        resolved, why = identity.with_uid(pod, self._read_pod)
        if resolved is None:
            self.status_sink(f"the job gets no owner reference ({why}): if this step's pod is deleted without "
                             "its SIGTERM reaching this process, delete the job by hand")
            return None
        return resolved.owner_reference()

    def _delete_leftovers(self, cfg: RunConfig, stage: str, variant: str, namespace: str) -> None:
        """A KFP retry of a step whose pod died (evicted, its node lost) may find that attempt's job still running
        (an evicted pod object stays, so its owner reference keeps the job): delete it before creating the new
        one. Only jobs of this stage, variant and KFP run; this launcher holds the stage's lease, so no live
        launcher watches them."""
        labels = job_labels(cfg, stage, variant)
        if "versavit.io/kfp-run-id" not in labels:
            return
        keys = ("versavit.io/run", "versavit.io/stage", "versavit.io/variant", "versavit.io/kfp-run-id")
        selector = ",".join(f"{k}={labels[k]}" for k in keys)
        try:
            jobs = self._list(namespace, selector)
        except Exception as exc:  # e.g. no `list` permission: the new job is created anyway
            self.status_sink(f"could not look for {self.kind}s left by an earlier attempt ({selector}): {exc}")
            return
        for job in jobs:
            old = job["metadata"]["name"]
            if {"Succeeded", "Complete", "Failed"} & set(true_conditions(job)):
                continue  # finished: kept for its logs (the TTL removes it)
            self.status_sink(f"deleting {self.kind} {namespace}/{old}: left running by an earlier attempt of KFP run "
                             f"{labels['versavit.io/kfp-run-id']} whose launcher is gone")
            self._delete_quietly(old, namespace)

    def _wait(self, name: str, namespace: str, watch: _Watch) -> None:
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            if watch.cancelled.is_set():
                raise KeyboardInterrupt("cancelled")
            obj, pods = self._poll(name, namespace, watch)
            if obj is not None:
                state = self._state(obj, pods)
                if state.summary != watch.summary:
                    watch.summary = state.summary
                    self.status_sink(f"{self.kind} {namespace}/{name}: {state.summary}")
                master = next((p for p in pods if self._is_master(p)), None)
                if self.stream_logs and master is not None:
                    self._follow(master, namespace, watch)
                if state.phase == "succeeded":
                    self._drain(watch)
                    return
                if state.phase == "failed":
                    self._drain(watch)
                    verdict = faults.classify_pods(pods)
                    error = TransientJobFailed if verdict.transient else JobFailed
                    raise error(self._failure_report(name, namespace, state, pods, watch, verdict))
                if stuck := self._stuck(pods, watch):
                    self._delete_quietly(name, namespace)
                    verdict = faults.classify_waiting(stuck.split(": ", 1)[-1])
                    error = TransientJobFailed if verdict.transient else JobFailed
                    raise error(f"{self.kind} {namespace}/{name} cannot start: {stuck} {verdict.tag()}\n"
                                f"{self._pods_report(pods)}\nthe job was deleted")
                self._check_scheduled(name, namespace, state, pods, watch)
            if deadline is not None and time.monotonic() >= deadline:
                last = f"last state: {watch.summary or 'unknown'}"
                report = self._pods_report(pods) if obj is not None else ""
                self._delete_quietly(name, namespace)
                verdict = faults.Classification(False, "the job's time limit (a rerun takes as long)")
                raise LaunchTimeout(f"{self.kind} {namespace}/{name} did not finish within {self.timeout_s:g} s "
                                    f"({last}); the job was deleted {verdict.tag()}"
                                    + (f"\n{report}" if report else ""))
            pause = self.poll_interval_s if deadline is None else min(self.poll_interval_s,
                                                                      max(0.0, deadline - time.monotonic()))
            watch.cancelled.wait(pause)

    def _check_scheduled(self, name: str, namespace: str, state: JobState, pods: list[Any], watch: _Watch) -> None:
        """launch.scheduling.schedule_timeout_s: a job not fully running in time is deleted; transient (the
        cluster is busy or short of nodes: a later attempt may find room)."""
        if watch.started:
            return
        running = [p for p in pods if _get(p, "status", "phase") in ("Running", "Succeeded")]
        if state.phase == "succeeded" or (state.phase == "running" and len(running) >= watch.expected_pods):
            watch.started = True
            return
        if watch.schedule_deadline is None or time.monotonic() < watch.schedule_deadline:
            return
        self._delete_quietly(name, namespace)
        verdict = faults.Classification(True, "not scheduled in time")
        report = self._pods_report(pods)
        raise TransientLaunchError(f"{self.kind} {namespace}/{name}: {len(running)} of {watch.expected_pods} pod(s) "
                                   "running at launch.scheduling.schedule_timeout_s; the job was deleted "
                                   f"{verdict.tag()}" + (f"\n{report}" if report else ""))

    def _poll(self, name: str, namespace: str, watch: _Watch) -> tuple[dict[str, Any] | None, list[Any]]:
        """Job + pods; a few API errors in a row are tolerated (API server restarts, throttling)."""
        try:
            obj = self._read(name, namespace)
            pods = self._pods(name, namespace)
        except Exception as exc:
            if _api_status(exc) == 404:
                verdict = faults.Classification(False, "the job was deleted by someone else")
                raise LaunchError(f"{self.kind} {namespace}/{name} disappeared (deleted outside this launcher) "
                                  f"{verdict.tag()}") from exc
            watch.api_errors += 1
            if watch.api_errors > self.max_api_errors:
                verdict = faults.classify_api_status(_api_status(exc))
                error = TransientLaunchError if verdict.transient else LaunchError
                raise error(f"lost the Kubernetes API while watching {self.kind} {namespace}/{name}: {exc} "
                            f"{verdict.tag()}") from exc
            return None, []
        watch.api_errors = 0
        return obj, pods

    def _follow(self, master: Any, namespace: str, watch: _Watch) -> None:
        """Start following the master's log once it runs; again after an in-place restart."""
        phase = _get(master, "status", "phase")
        if phase not in ("Running", "Succeeded", "Failed"):
            return
        restarts = sum(cs.restart_count or 0 for cs in _get(master, "status", "container_statuses") or [])
        key = (master.metadata.name, restarts)
        if key == watch.followed or (watch.follower is not None and watch.follower.is_alive()):
            return
        pod_name = master.metadata.name
        watch.follower = _LogFollower(lambda: self._open_log(pod_name, namespace), self.log_sink, watch.tail)
        watch.followed = key
        watch.follower.start()

    @staticmethod
    def _drain(watch: _Watch, timeout_s: float = 10.0) -> None:
        """Let the follower print the log's last lines (the stream ends when the container does)."""
        if watch.follower is not None:
            watch.follower.join(timeout_s)

    def _stuck(self, pods: list[Any], watch: _Watch) -> str | None:
        now = time.monotonic()
        for pod in pods:
            reason = _stuck_reason(pod)
            key = pod.metadata.name
            if reason is None:
                watch.stuck_since.pop(key, None)
                continue
            since = watch.stuck_since.setdefault(key, now)
            if now - since >= self.stuck_grace_s:
                return f"pod {key}: {reason}"
        return None

    def _pods_report(self, pods: list[Any]) -> str:
        ordered = sorted(pods, key=lambda p: (not self._is_master(p), p.metadata.name))
        return "\n".join(describe_pod(p) for p in ordered)

    def _failure_report(self, name: str, namespace: str, state: JobState, pods: list[Any], watch: _Watch,
                        verdict: Any = None) -> str:
        head = f"{self.kind} {namespace}/{name} failed"
        if state.reason or state.message:
            head += f": {state.reason}" + (f": {state.message}" if state.message else "")
        if verdict is not None:
            head += f" {verdict.tag()}"
        # the pods that say something: failed ones first, the master always
        telling = [p for p in pods if self._is_master(p) or _get(p, "status", "phase") == "Failed"
                   or _has_termination_message(p)]
        parts = [head]
        if telling:
            parts.append(self._pods_report(telling))
        if watch.tail and not any(_has_termination_message(p) for p in telling):
            parts.append("last lines of the master's log:")
            parts += [f"    {ln}" for ln in list(watch.tail)[-20:] if ln.strip()]
        return "\n".join(parts)

    def _delete_quietly(self, name: str, namespace: str) -> None:
        try:
            self._delete(name, namespace)
        except Exception as exc:  # the original error matters more; say what is left behind
            if _api_status(exc) != 404:
                self.status_sink(f"could not delete {self.kind} {namespace}/{name}: {exc} "
                                 f"(delete it by hand: kubectl -n {namespace} delete {self.kind.lower()} {name})")


def _api_status(exc: BaseException) -> int | None:
    """HTTP status of a kubernetes ApiException, also when an SDK wrapped it in RuntimeError."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        status = getattr(cur, "status", None)
        if isinstance(status, int):
            return status
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


def create_error(kind: str, namespace: str, name: str, exc: BaseException) -> LaunchError:
    """A create failure with what usually causes it."""
    status = _api_status(exc)
    hint = {
        403: f"the service account may not create {kind}s in namespace {namespace!r}: install the Role and "
             f"RoleBinding there (manifests/components/profile-namespace; manifests/base/rbac.yaml in versavit)",
        404: f"the {kind} API is not served: is its operator installed, and does namespace {namespace!r} exist?",
        409: "a job of that name exists already",
        422: "the API server rejected the object (schema validation)",
    }.get(status or 0, "")
    verdict = faults.classify_api_status(status)
    error = TransientLaunchError if verdict.transient else LaunchError
    return error(f"cannot create {kind} {namespace}/{name}: {exc} {verdict.tag()}"
                 + (f"\n  hint: {hint}" if hint else ""))
