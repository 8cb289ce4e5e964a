"""A lease on a stage's output folder: one run at a time writes `<workdir>/stages/<stage>[-<variant>]`.

`<stage url>/lease.json` names its holder ({host, pid, since, renewed, expires_s, token}). It is created
atomically: a local file by `os.link` of a finished temp file (fails with EEXIST if one exists, and a
reader never sees half a record); an `s3://` object by a conditional put (`If-None-Match: *`, s3fs
`mode="create"`), so of two runs starting together exactly one gets it. The holder rewrites it every
`renew_s` from a daemon thread; a lease not renewed for `ttl_s` (its holder crashed, or hangs) is expired
and the next run takes it over, as it does at once a lease left by a dead process of this host. Released
(deleted, if still ours) when the holder's block ends, however it ends.

Residual race: taking over an *expired* lease is check-then-delete-then-create; two runs taking over the
same expired lease in the same instant are still told apart by the atomic create, but a run whose read
predates another's takeover may delete that fresh lease (a window of one round trip, only on leases
already expired). On a store without conditional puts (S3 services older than 2024 / some MinIO builds)
the create falls back to check-then-put, racy by one round trip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from versavit import storage

log = logging.getLogger(__name__)
TTL_S = 600.0  # a lease not renewed for this long is expired (its holder crashed or hangs)
RENEW_S = 60.0


class LeaseHeldError(storage.StorageError):
    """Another live run holds the stage's lease (one line naming it)."""


def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def read(url: str) -> dict[str, Any] | None:
    """The lease record at `url` (lease.json), or None if there is none (an unreadable one: a dummy record)."""
    try:
        if not storage.exists(url):
            return None
        text = storage.read_text(url)
    except storage.StorageError as exc:
        if exc.kind == "missing":
            return None
        raise
    try:
        return json.loads(text)
    except ValueError:  # cannot be ours (we write whole records): treat as held since its write, by nobody known
        return {"host": "?", "pid": 0, "since": 0.0, "renewed": 0.0, "expires_s": 0.0, "token": "?"}


def _stale(rec: dict[str, Any], now: float) -> str | None:
    """Why a lease record no longer binds anyone (expired / holder dead on this host), or None."""
    age = now - float(rec.get("renewed", 0))
    if age > float(rec.get("expires_s", TTL_S)):
        return f"expired ({age:.0f} s since its last renewal)"
    here = rec.get("host") == socket.gethostname() and int(rec.get("pid", 0)) > 0
    if here and not storage._owner_runs(int(rec["pid"]), str(rec.get("pid_start", "0"))):
        return f"its holder (pid {rec['pid']} on this host) is gone"
    return None


def describe(rec: dict[str, Any], url: str, now: float | None = None) -> str:
    now = _now() if now is None else now
    left = float(rec.get("expires_s", TTL_S)) - (now - float(rec.get("renewed", 0)))
    return (f"{url.rsplit('/', 1)[0]} is in use by another run: host {rec.get('host')}, pid {rec.get('pid')}, "
            f"since {_iso(float(rec.get('since', 0)))} (lease renewed {now - float(rec.get('renewed', 0)):.0f} s ago,"
            f" expires in {max(0.0, left):.0f} s); wait for it to end or stop it (a lease of a crashed run expires;"
            f" delete {url} only if that run is surely gone)")


def _remove(url: str) -> None:
    fs, path = storage.get_fs(url)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc


class Lease:
    """The lease of one stage folder, held by this process (`acquire`, `renew`, `release`; or `hold`)."""

    def __init__(self, url: str, ttl_s: float = TTL_S, renew_s: float = RENEW_S):
        self.url, self.ttl_s, self.renew_s = url, ttl_s, renew_s
        self.token = uuid.uuid4().hex
        self.since = _now()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": storage._process_start(os.getpid()) or "0", "since": self.since,
                           "since_iso": _iso(self.since), "renewed": _now(), "expires_s": self.ttl_s,
                           "token": self.token})

    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeldError` naming its live holder; an expired one is taken over."""
        for _ in range(3):
            if storage.create_exclusive(self.url, self._record().encode()):
                return
            rec = read(self.url)
            if rec is None:
                continue  # released meanwhile
            why = _stale(rec, _now())
            if why is None:
                raise LeaseHeldError(describe(rec, self.url))
            again = read(self.url)  # still the same stale record? then it may go
            if again is not None and again.get("token") == rec.get("token"):
                log.warning("taking over the lease %s of host %s pid %s: %s", self.url, rec.get("host"),
                            rec.get("pid"), why)
                _remove(self.url)
        rec = read(self.url) or {}
        raise LeaseHeldError(describe(rec, self.url))

    def renew(self) -> bool:
        """Rewrite the record's renewal time if the lease is still ours; False (and `lost`) if it is not."""
        rec = read(self.url)
        if rec is None or rec.get("token") != self.token:
            if not self.lost:
                log.error("lease %s is no longer held by this run (%s)", self.url,
                          "removed" if rec is None else f"taken by host {rec.get('host')} pid {rec.get('pid')}")
            self.lost = True
            return False
        storage.write_text(self.url, self._record())
        return True

    def release(self) -> None:
        """Delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            rec = read(self.url)
            if rec is not None and rec.get("token") == self.token:
                _remove(self.url)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except Exception as exc:  # a storage blip: the next renewal may succeed before expiry
                log.warning("could not renew lease %s: %s", self.url, exc)

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="versavit-lease", daemon=True)
        self._thread.start()


@contextlib.contextmanager
def hold(url: str, ttl_s: float = TTL_S, renew_s: float = RENEW_S) -> Iterator[Lease]:
    """Hold the lease at `url` for the block (renewed from a daemon thread, released at the end)."""
    lease = Lease(url, ttl_s, renew_s)
    lease.acquire()
    lease.start_renewing()
    try:
        yield lease
    finally:
        lease.release()
