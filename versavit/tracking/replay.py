"""Replay of the tracking records a ``Tracker`` saved while MLflow was unreachable.

``Tracker.close()`` writes what it could not send to ``<pending dir>/pending-<time>-<pid>-<id>.jsonl``,
one JSON record per operation, in order (see ``Tracker._write_pending``). ``replay_dir`` sends them:

* in order, through the ``Tracker``'s own MLflow calls (``Tracker._execute``);
* exactly once: after each record that was sent, ``pending-<...>.progress.json`` records how many are
  done and the MLflow ids of the runs created from records (a run created offline is created once and
  its later records go to that id), so a replay stopped by an outage resumes where it stopped; a file
  fully handled moves to ``<pending dir>/replayed/``, so a second replay finds nothing to send;
* to the URI the file recorded (where its run ids live), or ``uri`` when given (``--uri``);
* under an exclusive ``flock`` per file, so two processes never send one file twice.

A record MLflow rejects (a permanent error: a missing file, a run that was never created) is counted,
logged and skipped, as the tracker does; a record that fails while the server answers a probe is
retried once, then skipped the same way, so one bad record can never block the rest for good.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from versavit.tracking.tracker import (
    _OP_SUMMARY_KEY,
    _SUMMARY_KEYS,
    RunHandle,
    Tracker,
    _is_permanent,
    _Op,
    _redact,
)

logger = logging.getLogger(__name__)

PENDING_GLOB = "pending-*.jsonl"
REPLAYED_DIR = "replayed"
DEFAULT_EXPERIMENT = "versavit"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class Unreachable(Exception):
    """The tracking store did not answer; the file keeps what was not sent."""


@dataclass
class ReplayReport:
    """What one pending file's replay did."""

    path: Path
    uri: str  # the destination, redacted
    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMMARY_KEYS, 0))
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_SUMMARY_KEYS, 0))
    unreadable: int = 0  # lines that are not JSON records
    left: int = 0  # records still pending (the store was unreachable)
    error: str | None = None  # why the store was unreachable
    busy: bool = False  # another process holds the file
    moved_to: Path | None = None

    @property
    def sent_total(self) -> int:
        return sum(self.sent.values())

    def line(self) -> str:
        """One line: the file, what was sent where, and what happened to the file."""
        if self.busy:
            return f"{self.path.name}: skipped (another process is replaying it)"
        sent = _counts(self.sent) or "nothing"
        text = f"{self.path.name}: sent {sent} to {self.uri}"
        if rejected := _counts(self.rejected):
            text += f"; rejected {rejected}"
        if self.unreadable:
            text += f"; {self.unreadable} unreadable line(s) skipped"
        if self.error:
            return text + f"; {self.left} record(s) still pending ({self.error})"
        return text + (f" (done, moved to {REPLAYED_DIR}/)" if self.moved_to else "")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v)


def pending_files(directory: str | Path) -> list[Path]:
    """The pending files in ``directory`` (not in ``replayed/``), oldest first."""
    directory = Path(directory)
    return sorted(directory.glob(PENDING_GLOB)) if directory.is_dir() else []


def recorded_uri(path: Path) -> str | None:
    """The (redacted) tracking URI the file's first record names, if any."""
    try:
        with path.open() as f:
            first = f.readline()
        return json.loads(first).get("tracking_uri") or None
    except (OSError, ValueError, AttributeError):
        return None


def destination(recorded: str | None, uri: str | None = None, fallback_uri: str | None = None) -> str | None:
    """Where a file's records go: ``uri`` if given; else the URI the file recorded (a redacted one is
    taken from ``fallback_uri`` when that names the same store, else sent without its credentials,
    which then come from ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``); else ``fallback_uri``."""
    if uri:
        return uri
    if recorded:
        if fallback_uri and _redact(fallback_uri) == recorded:
            return fallback_uri
        return recorded.replace("://***@", "://")
    return fallback_uri


def replay_dir(directory: str | Path, uri: str | None = None, fallback_uri: str | None = None,
               files: Iterable[Path] | None = None) -> list[ReplayReport]:
    """Replay the pending files of ``directory`` (or ``files``), oldest first. A store found unreachable
    is not tried again for the later files of this call."""
    reports: list[ReplayReport] = []
    runs: dict[str, str] = {}  # local id -> MLflow run id, across the files of this call
    down: dict[str, str] = {}  # destination -> why it was unreachable
    for path in (pending_files(directory) if files is None else files):
        target = destination(recorded_uri(path), uri, fallback_uri)
        if target is None:
            report = ReplayReport(path, "?", error="no tracking URI recorded: pass --uri")
            report.left = _count_lines(path)
        elif target in down:
            report = ReplayReport(path, _redact(target), error=down[target], left=_count_lines(path))
        else:
            report = replay_file(path, target, runs)
            if report is None:
                continue  # replayed meanwhile by another process
            if report.error:
                down[target] = report.error
        reports.append(report)
    return reports


def replay_pending(directory: str | Path, tracking_uri: str) -> list[ReplayReport]:
    """Quietly replay the pending files recorded for ``tracking_uri`` (what a starting stage does):
    never raises; what could not be sent stays; one info line when something was sent."""
    try:
        files = [p for p in pending_files(directory) if recorded_uri(p) == _redact(tracking_uri)]
        if not files:
            return []
        reports = replay_dir(directory, uri=tracking_uri, files=files)
    except Exception as e:  # noqa: BLE001 - a stage must not fail for its predecessors' records
        logger.debug("replay of pending tracking records in %s failed: %s: %s", directory, type(e).__name__,
                     _redact(str(e))[:300])
        return []
    sent = sum(r.sent_total for r in reports)
    left = sum(r.left for r in reports)
    if sent:
        logger.info("MLflow tracking at %s: replayed %d pending record item(s) from %d file(s)%s",
                    _redact(tracking_uri), sent, len(reports), f"; {left} record(s) still pending" if left else "")
    elif left:
        logger.debug("MLflow tracking at %s still unreachable: %d pending record(s) kept",
                     _redact(tracking_uri), left)
    return reports


def replay_file(path: Path, uri: str, runs: dict[str, str] | None = None) -> ReplayReport | None:
    """Send one pending file to ``uri`` (see the module doc). None if the file is gone (replayed by
    another process meanwhile)."""
    runs = {} if runs is None else runs
    report = ReplayReport(path, _redact(uri))
    try:
        f = path.open()
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report.busy = True
            return report
        if not _same_file(f, path):  # moved to replayed/ between our open and our lock
            return None
        _Replay(path, f, uri, runs, report).run()
    return report


def _same_file(f: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
    except FileNotFoundError:
        return False


def _count_lines(path: Path) -> int:
    try:
        with path.open() as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _progress_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".progress.json")


class _Replay:
    """One file's replay (the caller holds its lock)."""

    def __init__(self, path: Path, f: IO[str], uri: str, runs: dict[str, str], report: ReplayReport):
        self.path, self.uri, self.runs, self.report = path, uri, runs, report
        self.records: list[dict[str, Any]] = []
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or record.get("op") not in _OP_SUMMARY_KEY:
                    raise ValueError("not a tracking record")
            except ValueError:
                report.unreadable += 1
                continue
            self.records.append(record)
        progress: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            progress = json.loads(_progress_path(path).read_text())
        self.done = int(progress.get("done", 0))
        self.mine: dict[str, str] = dict(progress.get("runs", {}))  # run ids created from this file
        self.runs.update(self.mine)
        self.handles: dict[str, RunHandle] = {}
        self.trackers: dict[str, Tracker] = {}

    def run(self) -> None:
        try:
            self._probe()
            for i in range(self.done, len(self.records)):
                self._send(self.records[i])
                self.done = i + 1
                self._save_progress()
        except Unreachable as e:
            self.report.error = str(e)
            self.report.left = len(self.records) - self.done
            return
        self._finish()

    # ------------------------------------------------------------------ sending
    def _tracker(self, experiment: str) -> Tracker:
        if experiment not in self.trackers:
            self.trackers[experiment] = Tracker(self.uri, experiment, pending_dir=None)
        return self.trackers[experiment]

    def _probe(self) -> None:
        """Fail with Unreachable unless the store answers a cheap request."""
        try:
            self._tracker(DEFAULT_EXPERIMENT)._get_client().search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001
            raise Unreachable(f"MLflow at {_redact(self.uri)} unreachable: {type(e).__name__}: "
                              f"{' '.join(_redact(str(e)).split())[:160]}") from e

    def _send(self, record: dict[str, Any]) -> None:
        op = _Op(record["op"], self._handle(record), record.get("data"))
        key = _OP_SUMMARY_KEY[op.kind]
        if op.kind == "create" and op.handle.run_id is not None:
            return  # created by an earlier replay (its progress says so): never twice
        tracker = self._tracker(record.get("experiment") or DEFAULT_EXPERIMENT)
        for attempt in (1, 2):
            try:
                tracker._execute(op)
                break
            except Exception as e:  # noqa: BLE001
                if not _is_permanent(e):
                    self._probe()  # the store is down: stop here, the record stays pending
                    if attempt == 1:
                        continue  # the store answers: one more try before calling the record bad
                self.report.rejected[key] += op.size()
                logger.warning("MLflow rejected replayed %s of run %s: %s: %s", op.kind, op.handle.name,
                               type(e).__name__, _redact(str(e))[:300])
                return
        self.report.sent[key] += op.size()
        if op.kind == "create" and op.handle.run_id:
            self.mine[op.handle.local_id] = self.runs[op.handle.local_id] = op.handle.run_id

    def _handle(self, record: dict[str, Any]) -> RunHandle:
        local = str(record.get("run") or "")
        handle = self.handles.get(local)
        if handle is None:
            handle = RunHandle(name=record.get("name") or local, local_id=local,
                               run_id=record.get("run_id") or self.runs.get(local))
            if record.get("start_ms"):
                handle.start_ms = int(record["start_ms"])
            self.handles[local] = handle
        elif handle.run_id is None and record.get("run_id"):
            handle.run_id = record["run_id"]
        if record["op"] == "create":
            handle.tags = dict(record.get("tags") or {})
            handle.parent = self._parent(record)
        return handle

    def _parent(self, record: dict[str, Any]) -> RunHandle | None:
        if "parent_run_id" in record or "parent_local" in record:  # explicit (current files)
            run_id, local = record.get("parent_run_id"), record.get("parent_local")
        else:  # older files: one field holding a run id or a local id
            value = record.get("parent")
            known = value in self.handles or value in self.runs
            run_id, local = (None, value) if known or not _RUN_ID.fullmatch(str(value)) else (value, None)
        if run_id:
            return RunHandle(name=run_id, run_id=run_id)
        if local:
            # created earlier in this replay, or never (then the run is created unnested, as the tracker does)
            return self.handles.get(local) or RunHandle(name=local, local_id=local, run_id=self.runs.get(local))
        return None

    # ----------------------------------------------------------------- bookkeeping
    def _save_progress(self) -> None:
        target = _progress_path(self.path)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(json.dumps({"done": self.done, "runs": self.mine}))
        os.replace(tmp, target)

    def _finish(self) -> None:
        """All records handled: move the file to replayed/ (kept for the record), drop its progress."""
        dest_dir = self.path.parent / REPLAYED_DIR
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / self.path.name
        n = 1
        while dest.exists():
            dest, n = dest_dir / f"{self.path.stem}.{n}.jsonl", n + 1
        os.replace(self.path, dest)
        self.report.moved_to = dest
        with contextlib.suppress(FileNotFoundError):
            _progress_path(self.path).unlink()
