"""MLflow tracking for the VersaViT pipeline that never takes a stage down.

All MLflow traffic goes through ``Tracker._drain``: operations sit in an ordered queue and are
sent when the store answers; a down or slow server costs one warning, a bounded retry rate and,
on ``close()``, a JSONL file of whatever could not be sent, which ``versavit tracking replay`` or the
next stage that opens (``tracking.replay``) sends once the server answers again.

Distributed training: only rank 0 should talk to MLflow. Build trackers with
``Tracker.for_rank(rank, ...)`` (equivalently ``enabled=(rank == 0)``); every other rank gets
a disabled tracker whose methods are cheap no-ops that still return handles.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PARENT_RUN_ENV = "VERSAVIT_PARENT_RUN_ID"
STAGE_TAG = "versavit.stage"
PARENT_TAG = "mlflow.parentRunId"
# Who runs a stage run (so a later attempt can tell a killed one from a live one), and why it failed.
HOST_TAG = "versavit.host"
PID_TAG = "versavit.pid"
FAILURE_TAG = "versavit.failure"
MAX_FAILURE_CHARS = 500
# A pid whose process started this long after the run did belongs to another process (pid reuse).
_PID_REUSE_SLACK_S = 5.0
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow server/store limits (mlflow.utils.validation); repeated so the module does not depend
# on private MLflow names.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_DIGEST = 36
MAX_RETRY_SECONDS = 300.0

# MLflow error codes that mean "this request is wrong", not "the server is unavailable":
# retrying them would block the queue forever, so such operations are rejected instead.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST", "INVALID_STATE",
}
_SUMMARY_KEYS = ("runs", "params", "tags", "metrics", "datasets", "artifacts", "models", "run_ends")
_OP_SUMMARY_KEY = {"create": "runs", "params": "params", "tags": "tags", "metrics": "metrics",
                   "inputs": "datasets", "artifact": "artifacts", "register": "models", "version": "models",
                   "exp_tags": "tags", "end": "run_ends"}


def _redact(text: str) -> str:
    """Strip ``user:password@`` from any URI in ``text``."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def failure_message(exc: BaseException) -> str:
    """``Type: message`` on one line, credentials in URIs redacted, at most 500 characters."""
    message = " ".join(str(exc).split())
    return _redact(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)[:MAX_FAILURE_CHARS]


def process_tags() -> dict[str, str]:
    """``versavit.host`` and ``versavit.pid`` of this process."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def _process_start_s(pid: int) -> tuple[str, float] | None:
    """(state, start time in epoch seconds) of a Linux process, from /proc; None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        fields = stat[stat.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
        return fields[0], btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int, since_ms: int | None = None) -> bool:
    """Whether process ``pid`` of this host is alive (and, on Linux, the same one that existed at
    ``since_ms``: a pid reused by a process started later counts as dead). Unsure means alive."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        pass
    info = _process_start_s(pid)
    if info is None:
        return True
    state, started = info
    if state in ("Z", "X"):  # a zombie: it ended, its parent has not reaped it yet
        return False
    return since_ms is None or started <= since_ms / 1000 + _PID_REUSE_SLACK_S


def _disable_telemetry() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    # `import mlflow` decides telemetry once; if it was imported before us, re-decide now.
    if "mlflow.telemetry.client" in sys.modules:
        with contextlib.suppress(Exception):
            from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client
            from mlflow.telemetry.utils import is_telemetry_disabled

            if is_telemetry_disabled() and get_telemetry_client() is not None:
                set_telemetry_client()


def default_tracking_uri(workdir: str) -> str:
    """Local SQLite store under ``workdir`` (created if missing)."""
    path = Path(workdir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config to dotted keys with string values, readable in a runs table: a list of
    plain values becomes one comma-separated value (``train.multitask.tasks = caption,depth``), a list of
    mappings that each carry a distinct ``name`` is keyed by those names (``train.recipe.coarse.lr_heads``),
    any other list by position (``a.0.b``); an empty list, tuple or mapping is kept as ``[]``/``()``/``{}``."""
    out: dict[str, str] = {}
    items = d.items() if isinstance(d, Mapping) else _list_items(d)
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (list, tuple)) and v and not any(isinstance(x, (Mapping, list, tuple)) for x in v):
            out[key] = ",".join(str(x) for x in v)
        elif isinstance(v, (Mapping, list, tuple)) and len(v) > 0:
            out.update(flatten_config(v, key))
        else:
            out[key] = str(v)
    return out


def _list_items(values: Any) -> Any:
    names = [v.get("name") if isinstance(v, Mapping) else None for v in values]
    if all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names):
        return zip(names, values, strict=True)
    return enumerate(values)


def _clean_key(key: str) -> str:
    # MLflow only accepts these characters in param/metric/tag keys.
    return re.sub(r"[^\w\-. /:]", "_", key).strip("/")[:MAX_KEY] or "_"


GIT_COMMIT_ENV = "VERSAVIT_GIT_COMMIT"  # an image without .git names its commit here (set at build)
_COMMIT: list[str | None] = []  # one lookup per process


def _git_commit() -> str | None:
    """The commit of the versavit checkout this process runs (``git rev-parse HEAD`` in the package's own
    folder, whatever the cwd: KFP steps, torchrun ranks), else ``$VERSAVIT_GIT_COMMIT``."""
    if not _COMMIT:
        sha = ""
        try:
            res = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                                 capture_output=True, text=True, timeout=5, check=False)
            sha = res.stdout.strip() if res.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            pass
        if not re.fullmatch(r"[0-9a-f]{40,64}", sha):
            sha = os.environ.get(GIT_COMMIT_ENV, "").strip()
        _COMMIT.append(sha if re.fullmatch(r"[0-9a-f]{7,64}", sha) else None)
    return _COMMIT[0]


def lineage_tags(config_hash: str, upstream_run_ids: Mapping[str, str] | None = None,
                 kfp_run_id: str | None = None) -> dict[str, str]:
    """Tags linking a run to its config, upstream stage runs, KFP run and git commit."""
    tags = {"versavit.config_hash": config_hash}
    for stage, run_id in (upstream_run_ids or {}).items():
        tags[f"versavit.upstream.{stage}"] = run_id
    if kfp_run_id:
        tags["versavit.kfp_run_id"] = kfp_run_id
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


@dataclass(eq=False)
class RunHandle:
    """A run as the caller sees it; ``run_id`` stays None until MLflow has created it."""

    name: str
    stage: str | None = None
    parent: RunHandle | None = None
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    start_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    local_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass(eq=False)
class _Op:
    kind: str  # one of _OP_SUMMARY_KEY
    handle: RunHandle
    data: Any = None

    def size(self) -> int:
        return len(self.data) if self.kind in ("params", "tags", "metrics") else 1


class Tracker:
    """Buffered, failure-tolerant MLflow client for pipeline and stage runs."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True,
                 flush_every: int = 200, flush_seconds: float = 10.0,
                 pending_dir: str | None = None, retry_seconds: float = 15.0,
                 artifact_location: str | None = None, max_queued_points: int = 500_000):
        self.tracking_uri, self.experiment, self.enabled = tracking_uri, experiment, enabled
        self.flush_every, self.flush_seconds = flush_every, flush_seconds
        self.pending_dir, self.retry_seconds = pending_dir, retry_seconds
        self.max_queued_points = max_queued_points
        if artifact_location is None and tracking_uri.startswith("sqlite:///"):
            # MLflow's default artifact root is ./mlruns relative to the cwd; keep artifacts
            # next to the database instead.
            db = Path(tracking_uri[len("sqlite:///"):]).resolve()
            artifact_location = str(db.parent / "mlartifacts")
        self.artifact_location = artifact_location
        self._client: Any = None
        self._experiment_id: str | None = None
        self._queue: collections.deque[_Op] = collections.deque()
        self._buffer: dict[RunHandle, list[Any]] = {}
        self._buffered = self._queued_points = 0
        self._last_flush = time.monotonic()
        self._next_retry = 0.0
        self._failing = self._warned = self._closed = False
        self._rejects = self._fail_streak = 0
        self._lost = dict.fromkeys(_SUMMARY_KEYS, 0)  # rejected or dropped, never sendable
        self._lock = threading.RLock()
        if enabled:
            # Buffered points of a stage that forgets close() still get their final flush.
            ref = weakref.ref(self)
            atexit.register(lambda: (t := ref()) is not None and t.close())
            _disable_telemetry()
            if tracking_uri.startswith(("http://", "https://")):
                # Defaults are 7 retries with backoff and 120 s timeouts: minutes per call.
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    @classmethod
    def for_rank(cls, rank: int, **kwargs: Any) -> Tracker:
        """Tracker that is enabled only on rank 0 (and only if ``enabled`` allows it)."""
        kwargs["enabled"] = kwargs.get("enabled", True) and rank == 0
        return cls(**kwargs)

    # ----------------------------------------------------------------- runs
    def start_pipeline_run(self, name: str, tags: Mapping[str, str] | None = None) -> RunHandle:
        """Start a top-level (parent) run."""
        return self._start(RunHandle(name=name, tags=dict(tags or {})))

    def start_stage_run(self, stage: str, parent: RunHandle | None,
                        tags: Mapping[str, str] | None = None) -> RunHandle:
        """Start a stage run nested under ``parent`` (created once the parent exists)."""
        all_tags = {**(tags or {}), STAGE_TAG: stage}
        return self._start(RunHandle(name=stage, stage=stage, parent=parent, tags=all_tags))

    def attach_run(self, run_id: str) -> RunHandle:
        """Handle for an existing run, e.g. a parent created by another process."""
        return RunHandle(name=run_id, run_id=run_id)

    def parent_from_env(self) -> RunHandle | None:
        """Attach to the parent run named by ``$VERSAVIT_PARENT_RUN_ID`` if set."""
        run_id = os.environ.get(PARENT_RUN_ENV)
        return self.attach_run(run_id) if run_id else None

    def find_run_id(self, tags: Mapping[str, str]) -> str | None:
        """Id of the newest run of this experiment carrying all `tags` (None if none, or unreachable)."""
        if not self.enabled:
            return None
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        try:
            runs = self._get_client().search_runs([self._get_experiment_id()], filter_string=query,
                                                  order_by=["attributes.start_time DESC"], max_results=1)
        except Exception as e:  # the tracking server being down must not fail the caller
            self._on_failure(e)
            return None
        return runs[0].info.run_id if runs else None

    def run_id(self, handle: RunHandle) -> str | None:
        """Real MLflow id of ``handle`` (tries pending sends first); None if not created yet."""
        if self.enabled and handle.run_id is None:
            with self._lock:
                self._drain()
        return handle.run_id

    def end_run(self, handle: RunHandle, status: str = "FINISHED") -> None:
        """Flush the run's metrics and mark it terminated."""
        if not self.enabled:
            return
        with self._lock:
            self._move_buffer(handle)
            self._submit(_Op("end", handle, (status, int(time.time() * 1000))))

    @contextlib.contextmanager
    def stage(self, stage: str, parent: RunHandle | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[RunHandle]:
        """``with tracker.stage("train", parent=p) as run:`` — FAILED if the body raises, with the
        exception's one-line message as tag ``versavit.failure``."""
        handle = self.start_stage_run(stage, parent, tags)
        try:
            yield handle
        except BaseException as e:
            self.set_tags(handle, {FAILURE_TAG: failure_message(e)})
            self.end_run(handle, "FAILED")
            raise
        self.end_run(handle, "FINISHED")

    def end_orphaned_runs(self, tags: Mapping[str, str]) -> list[str]:
        """Mark KILLED the runs carrying all ``tags`` that are still RUNNING although the process
        named by their ``versavit.host``/``versavit.pid`` tags is gone: same host and a dead pid
        only (a run of another host, or without these tags, is left alone). Returns their ids."""
        if not self.enabled or (self._failing and time.monotonic() < self._next_retry):
            return []  # disabled, or the store just failed: backing off
        query = " and ".join([*(f"tags.`{k}` = '{v}'" for k, v in tags.items()), "attributes.status = 'RUNNING'"])
        host, killed = socket.gethostname(), []
        try:
            client = self._get_client()
            for run in client.search_runs([self._get_experiment_id()], filter_string=query, max_results=1000):
                run_tags, pid = run.data.tags, run.data.tags.get(PID_TAG, "")
                if run_tags.get(HOST_TAG) != host or not pid.isdigit() or pid_alive(int(pid), run.info.start_time):
                    continue
                if FAILURE_TAG not in run_tags:
                    client.set_tag(run.info.run_id, FAILURE_TAG,
                                   f"killed: process {pid} on {host} ended without ending the run")
                client.set_terminated(run.info.run_id, status="KILLED", end_time=int(time.time() * 1000))
                killed.append(run.info.run_id)
        except Exception as e:  # the tracking server being down must not fail the caller
            self._on_failure(e)
        if killed:
            logger.info("MLflow: marked %d run(s) of a killed earlier attempt KILLED: %s", len(killed),
                        ", ".join(killed))
        return killed

    # -------------------------------------------------------------- logging
    def log_config(self, handle: RunHandle, config: Mapping[str, Any]) -> None:
        """Log a nested config as flattened, truncated params."""
        if not self.enabled:
            return
        params = [(_clean_key(k), v[:MAX_PARAM_VALUE]) for k, v in flatten_config(config).items()]
        params = list(dict(params).items())  # keys may collide after cleaning; keep the last
        with self._lock:
            for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
                self._submit(_Op("params", handle, params[i:i + MAX_PARAMS_PER_BATCH]))

    def set_tags(self, handle: RunHandle, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified)."""
        if not self.enabled:
            return
        items = [(_clean_key(str(k)), str(v)) for k, v in tags.items()]
        with self._lock:
            for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
                self._submit(_Op("tags", handle, items[i:i + MAX_PARAMS_PER_BATCH]))

    def log_metrics(self, handle: RunHandle, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer metric points; sent every ``flush_every`` points or ``flush_seconds``."""
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        with self._lock:
            buf = self._buffer.setdefault(handle, [])
            for key, value in metrics.items():
                try:
                    buf.append((_clean_key(str(key)), float(value), ts, int(step)))
                    self._buffered += 1
                except (TypeError, ValueError) as e:
                    self._reject(_Op("metrics", handle, [key]), e)
            if (self._buffered >= self.flush_every
                    or time.monotonic() - self._last_flush >= self.flush_seconds):
                self.flush()

    def log_dataset(self, handle: RunHandle, name: str, url: str, digest: str,
                    context: str = "training", num_samples: int | None = None) -> None:
        """Record a dataset input (lineage) on the run."""
        if not self.enabled:
            return
        self._submit_locked(_Op("inputs", handle, (name, url, digest, context, num_samples)))

    def log_artifact(self, handle: RunHandle, local_path: str,
                     artifact_path: str | None = None) -> None:
        """Upload a file or directory to the run's artifacts."""
        if not self.enabled:
            return
        self._submit_locked(_Op("artifact", handle, (str(local_path), artifact_path)))

    def register_model(self, handle: RunHandle, name: str, source: str, tags: Mapping[str, Any] | None = None,
                       description: str | None = None) -> None:
        """Register a new version of model `name` whose files are at `source` (a URL), from this run, with
        version tags and a description."""
        if not self.enabled:
            return
        items = {_clean_key(str(k)): str(v)[:MAX_PARAM_VALUE] for k, v in (tags or {}).items()}
        self._submit_locked(_Op("register", handle, (name, source, items, description)))

    def annotate_model_versions(self, handle: RunHandle, run_id: str, tags: Mapping[str, Any],
                                description: str | None = None) -> None:
        """Add tags (and, if given, a description) to every model version registered from run `run_id`
        (e.g. the evaluation's figures on the training run's versions); `handle` is the run that says so."""
        if not self.enabled or not run_id:
            return
        items = {_clean_key(str(k)): str(v)[:MAX_PARAM_VALUE] for k, v in tags.items()}
        self._submit_locked(_Op("version", handle, (run_id, items, description)))

    def set_experiment_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags of this tracker's experiment (e.g. a saved view of the runs table)."""
        if not self.enabled or not tags:
            return
        handle = RunHandle(name=f"experiment {self.experiment}", run_id="-")  # needs no run
        self._submit_locked(_Op("exp_tags", handle, {_clean_key(str(k)): str(v) for k, v in tags.items()}))

    def flush(self, force: bool = False) -> bool:
        """Send buffered metrics and queued operations; True if nothing is left pending."""
        if not self.enabled:
            return True
        with self._lock:
            for handle in list(self._buffer):
                self._move_buffer(handle)
            self._last_flush = time.monotonic()
            return self._drain(force)

    def unlogged_summary(self) -> dict[str, int]:
        """Counts of what has not (yet) reached MLflow, by kind."""
        with self._lock:
            out = dict(self._lost)
            for op in self._queue:
                out[_OP_SUMMARY_KEY[op.kind]] += op.size()
            out["metrics"] += sum(len(b) for b in self._buffer.values())
            return out

    def close(self) -> dict[str, int]:
        """Final flush; save leftovers to ``pending_dir`` and log one summary. Idempotent."""
        if not self.enabled or self._closed:
            return self.unlogged_summary()
        with self._lock:
            self.flush(force=True)
            self._closed = True
            summary = self.unlogged_summary()
            if not any(summary.values()):
                return summary
            where = "none retryable (rejected or dropped)"
            if self._queue:
                where = self._write_pending() if self.pending_dir else "not saved (no pending_dir)"
            counts = ", ".join(f"{v} {k}" for k, v in summary.items() if v)
            logger.warning("MLflow tracking at %s: could not log %s; pending operations: %s",
                           _redact(self.tracking_uri), counts, where)
            return summary

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _start(self, handle: RunHandle) -> RunHandle:
        if self.enabled:
            self._submit_locked(_Op("create", handle))
        return handle

    def _submit_locked(self, op: _Op) -> None:
        with self._lock:
            self._submit(op)

    def _submit(self, op: _Op) -> None:
        self._queue.append(op)
        self._drain()

    def _move_buffer(self, handle: RunHandle) -> None:
        points = self._buffer.pop(handle, [])
        self._buffered -= len(points)
        if self._queued_points + len(points) > self.max_queued_points:
            # Bound memory while the server is away: newest points are dropped and counted.
            self._lost["metrics"] += len(points)
            return
        for i in range(0, len(points), MAX_METRICS_PER_BATCH):
            chunk = points[i:i + MAX_METRICS_PER_BATCH]
            self._queue.append(_Op("metrics", handle, chunk))
            self._queued_points += len(chunk)

    def _drain(self, force: bool = False) -> bool:
        """Send queued operations in order; stop at the first transient failure."""
        if not self._queue:
            return True
        if not force and time.monotonic() < self._next_retry:
            return False  # backoff: a down server must not cost time on every call
        while self._queue:
            op = self._queue[0]
            if op.kind == "metrics":
                self._coalesce()
            try:
                self._execute(op)
            except Exception as e:  # noqa: BLE001 - tracking must never raise into training
                if not _is_permanent(e):
                    self._on_failure(e)
                    return False
                self._reject(op, e)
            self._queue.popleft()
            if op.kind == "metrics":
                self._queued_points -= len(op.data)
        self._fail_streak = 0
        if self._failing:
            logger.info("MLflow tracking at %s reachable again; queued operations sent",
                        _redact(self.tracking_uri))
            self._failing = False
        return True

    def _coalesce(self) -> None:
        # Merge adjacent small metric chunks of one run that piled up during an outage.
        head = self._queue[0]
        while (len(self._queue) > 1 and self._queue[1].kind == "metrics"
               and self._queue[1].handle is head.handle
               and len(head.data) + len(self._queue[1].data) <= MAX_METRICS_PER_BATCH):
            head.data = head.data + self._queue[1].data
            del self._queue[1]

    def _on_failure(self, e: Exception) -> None:
        self._failing = True
        # Exponential backoff (capped): a server that hangs until the HTTP timeout would
        # otherwise cost timeout/retry_seconds of all wall time.
        self._fail_streak += 1
        delay = min(self.retry_seconds * 2 ** (self._fail_streak - 1), MAX_RETRY_SECONDS)
        self._next_retry = time.monotonic() + delay
        msg = f"{type(e).__name__}: {_redact(str(e))[:300]}"
        if not self._warned:
            self._warned = True
            logger.warning("MLflow tracking at %s failed (%s); the stage continues, operations "
                           "are queued and retried with backoff from %.0f s",
                           _redact(self.tracking_uri), msg, self.retry_seconds)
        else:
            logger.debug("MLflow tracking still failing: %s", msg)

    def _reject(self, op: _Op, e: Exception) -> None:
        self._lost[_OP_SUMMARY_KEY[op.kind]] += op.size()
        self._rejects += 1
        if self._rejects <= 3:  # a bug in the caller, not an outage; do not spam
            logger.warning("MLflow rejected %s for run %s: %s: %s", op.kind, op.handle.name,
                           type(e).__name__, _redact(str(e))[:300])

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _get_experiment_id(self) -> str:
        if self._experiment_id is None:
            client = self._get_client()
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    exp_id = client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location,
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
                except Exception:  # another process may have created it meanwhile
                    if (exp := client.get_experiment_by_name(self.experiment)) is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:
                    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            self._experiment_id = exp_id
        return self._experiment_id

    def _execute(self, op: _Op) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

        h = op.handle
        if op.kind == "create":
            tags = dict(h.tags)
            # A parent that was never created (rejected, disabled tracker) leaves it unnested.
            if h.parent is not None and h.parent.run_id is not None:
                tags[PARENT_TAG] = h.parent.run_id
            run = self._get_client().create_run(self._get_experiment_id(), start_time=h.start_ms,
                                                tags=tags, run_name=h.name)
            h.run_id = run.info.run_id
            return
        if h.run_id is None:
            raise _NoRun(f"run {h.name!r} was never created")
        client = self._get_client()
        if op.kind == "params":
            client.log_batch(h.run_id, params=[Param(k, v) for k, v in op.data])
        elif op.kind == "tags":
            client.log_batch(h.run_id, tags=[RunTag(k, v) for k, v in op.data])
        elif op.kind == "metrics":
            client.log_batch(h.run_id, metrics=[Metric(*p) for p in op.data])
        elif op.kind == "inputs":
            name, url, digest, context, num_samples = op.data
            source_type, key = ("http", "url") if url.startswith(("http://", "https://")) else (
                (url.split("://", 1)[0] if "://" in url else "local"), "uri")
            # source/source_type follow mlflow.data's HTTP/artifact sources, so
            # mlflow.data.get_source() can resolve them; the digest column holds 36 chars.
            profile = {"digest": digest, **({"num_samples": num_samples} if num_samples else {})}
            ds = Dataset(name=name, digest=digest[:MAX_DIGEST], source_type=source_type,
                         source=json.dumps({key: url}), profile=json.dumps(profile))
            client.log_inputs(h.run_id, [DatasetInput(ds, [InputTag("mlflow.data.context",
                                                                     context)])])
        elif op.kind == "artifact":
            client.log_artifact(h.run_id, op.data[0], op.data[1])
        elif op.kind == "register":
            name, source, tags, description = (*op.data, None, None)[:4]  # older pending files: name, source
            try:
                client.create_registered_model(name)
            except Exception as e:  # already registered: add a version to it
                if str(getattr(e, "error_code", "")) != "RESOURCE_ALREADY_EXISTS":
                    raise
            client.create_model_version(name, source=source, run_id=h.run_id, tags=tags or None,
                                        description=description)
        elif op.kind == "version":
            run_id, tags, description = op.data
            for version in client.search_model_versions(f"run_id = '{run_id}'"):
                for key, value in tags.items():
                    client.set_model_version_tag(version.name, version.version, key, value)
                if description and description not in (version.description or ""):  # appended, once
                    text = f"{version.description}\n\n{description}" if version.description else description
                    client.update_model_version(version.name, version.version, description=text)
        elif op.kind == "exp_tags":
            for key, value in op.data.items():
                client.set_experiment_tag(self._get_experiment_id(), key, value)
        elif op.kind == "end":
            client.set_terminated(h.run_id, status=op.data[0], end_time=op.data[1])

    def _write_pending(self) -> str:
        """One JSON record per queued operation (``versavit tracking replay`` sends them). Written
        under a temporary name and renamed, so a replay never reads half a file."""
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        path = Path(self.pending_dir) / f"pending-{stamp}.jsonl"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w") as f:
                for op in self._queue:
                    h, p = op.handle, op.handle.parent
                    f.write(json.dumps({
                        "op": op.kind, "run": h.local_id, "run_id": h.run_id, "name": h.name,
                        "parent": (p.run_id or p.local_id) if p else None,
                        # the same, unambiguous: a created parent's id, or the local id of one created later
                        "parent_run_id": p.run_id if p else None,
                        "parent_local": p.local_id if p and p.run_id is None else None,
                        "tags": h.tags if op.kind == "create" else None,
                        "start_ms": h.start_ms, "data": op.data,
                        "tracking_uri": _redact(self.tracking_uri),
                        "experiment": self.experiment}) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return f"could not be saved ({type(e).__name__}: {e})"
        return f"saved to {path}"


class _NoRun(Exception):
    """An operation whose run could not be created; permanent."""


def _is_permanent(e: Exception) -> bool:
    if isinstance(e, (_NoRun, FileNotFoundError)):
        return True
    return str(getattr(e, "error_code", "")) in _PERMANENT_CODES
