"""Writing webdataset shards to any URL, and the small manifest that stages meet at.

A dataset is a folder (local or s3://) of `shard-NNNNNN.tar` files plus `manifest.json`, which
lists every shard with its sample count and sha256. Each shard is committed atomically and the
manifest last, so a reader that goes by the manifest never sees a half-written dataset. A writer
holds `.writer.lock` in the folder (created exclusively; holder host/pid/start, expiry) while it
writes, so a second writer of the same dataset fails at once instead of mixing its shards in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from versavit import storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "versavit-shards/1"


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """What a dataset folder holds. `url` is where it was read from (not stored)."""

    name: str
    num_samples: int
    shards: list[ShardInfo]
    fields: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    created: float = 0.0
    url: str = ""

    @property
    def digest(self) -> str:
        """Content digest of the whole dataset (sha256 over the shard digests)."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.sha256.encode())
        return h.hexdigest()[:32]

    def shard_urls(self) -> list[str]:
        return [storage.join(self.url, s.name) for s in self.shards]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("url")
        return json.dumps(data, indent=1)


def read_manifest(dataset_url: str) -> Manifest:
    url = storage.join(dataset_url, MANIFEST)
    try:
        data = json.loads(storage.read_text(url))
    except storage.StorageError as exc:
        if exc.kind != "missing":
            raise
        raise storage.StorageError(
            f"no dataset at {dataset_url}: {MANIFEST} is missing (was the dataset written to completion?)",
            kind="missing",
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{url} is not valid JSON ({exc}); rewrite the dataset") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{url} has format {data.get('format')!r}, expected {FORMAT!r}")
    shards = [ShardInfo(**s) for s in data.pop("shards")]
    return Manifest(shards=shards, url=dataset_url.rstrip("/"), **data)


def shard_infos(shard_urls: list[str]) -> list[ShardInfo | None]:
    """Each shard URL's manifest entry (None where its folder has no manifest or does not list it)."""
    manifests: dict[str, dict[str, ShardInfo]] = {}
    out: list[ShardInfo | None] = []
    for url in shard_urls:
        folder, _, name = url.rstrip("/").rpartition("/")
        if folder not in manifests:
            try:
                manifests[folder] = {s.name: s for s in read_manifest(folder).shards}
            except storage.StorageError as exc:
                if exc.fatal:
                    raise
                manifests[folder] = {}
            except ValueError:
                manifests[folder] = {}
        out.append(manifests[folder].get(name))
    return out


def resolve_shards(urls: list[str]) -> list[str]:
    """Dataset folders (with manifest.json), shard URLs and brace patterns -> shard URLs."""
    out: list[str] = []
    for url in urls:
        if url.endswith(".tar") or "{" in url:
            out.extend(wds.shardlists.expand_urls(url))
        else:
            out.extend(read_manifest(url).shard_urls())
    if not out:
        raise ValueError(f"no shards found in {urls}")
    return out


LOCK = ".writer.lock"
LOCK_TTL_S = 12 * 3600


class DatasetLockedError(storage.StorageError):
    """Another writer is writing the same dataset URL."""


def _lock_holder() -> dict[str, Any]:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "thread": threading.get_ident(),
            "process_start": storage._process_start(os.getpid()), "started": now, "expires": now + LOCK_TTL_S,
            "token": uuid.uuid4().hex}


def _lock_is_stale(holder: dict[str, Any]) -> bool:
    if time.time() > float(holder.get("expires", 0)):
        return True
    if holder.get("host") == socket.gethostname():
        return not storage._owner_runs(int(holder.get("pid", 0)), str(holder.get("process_start") or "0"))
    return False


def acquire_writer_lock(dataset_url: str) -> dict[str, Any]:
    """Take `<dataset>/.writer.lock` (holder's host, pid, start time, expiry) or fail at once naming the holder.

    Local: O_CREAT | O_EXCL; S3: a conditional put. A lock whose holder is gone (same host, process no
    longer running) or whose expiry has passed is broken once and taken.
    """
    url = storage.join(dataset_url, LOCK)
    holder = _lock_holder()
    data = json.dumps(holder).encode()
    for _ in range(2):
        if storage.create_exclusive(url, data):
            return holder
        try:
            current = json.loads(storage.read_text(url))
        except (storage.StorageError, json.JSONDecodeError):
            current = {}
        if current and not _lock_is_stale(current):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(current.get("started", 0))))
            raise DatasetLockedError(
                f"{dataset_url} is being written by another writer (host {current.get('host')}, pid "
                f"{current.get('pid')}, started {started}, lock expires in "
                f"{max(0, float(current.get('expires', 0)) - time.time()) / 60:.0f} min; {url}); wait for it "
                "or write to another --out", kind="locked")
        if not current:  # a lock being written right now, or unreadable: treat as held
            time.sleep(0.05)
            try:
                current = json.loads(storage.read_text(url))
                continue
            except (storage.StorageError, json.JSONDecodeError):
                pass
        log.warning("breaking the stale writer lock %s (holder %s)", url, current)
        release_writer_lock(dataset_url, None)
    raise DatasetLockedError(f"could not take the writer lock {url}", kind="locked")


def release_writer_lock(dataset_url: str, holder: dict[str, Any] | None) -> None:
    """Remove the lock (only our own when `holder` is given)."""
    url = storage.join(dataset_url, LOCK)
    try:
        if holder is not None and json.loads(storage.read_text(url)).get("token") != holder["token"]:
            return
        fs, path = storage.get_fs(url)
        fs.rm_file(path)
    except (storage.StorageError, json.JSONDecodeError, FileNotFoundError, OSError):
        pass


class ShardWriter:
    """Write samples (dicts of field name -> bytes, plus `__key__`) into size-bounded shards.

    >>> with ShardWriter("s3://bucket/ds/train", samples_per_shard=256, name="synthetic") as w:
    ...     w.write({"__key__": "000001", "rgb.jpg": jpeg_bytes, "json": b"{}"})
    """

    def __init__(self, dataset_url: str, samples_per_shard: int = 256, name: str = "",
                 meta: dict[str, Any] | None = None, start_index: int = 0, write_manifest: bool = True):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be >= 1")
        self.url = dataset_url.rstrip("/")
        self.samples_per_shard = samples_per_shard
        self.name = name or self.url.rsplit("/", 1)[-1]
        self.meta = dict(meta or {})
        self.write_manifest = write_manifest
        self.shards: list[ShardInfo] = []
        self.fields: set[str] = set()
        self._index = start_index
        self._ctx: Any = None
        self._tar: wds.TarWriter | None = None
        self._local = ""
        self._count = 0
        self.manifest: Manifest | None = None
        # A dataset writer (one that writes the manifest) holds the dataset's writer lock: a second one
        # fails at once instead of mixing its shards with ours. An old manifest goes first, so readers
        # see "no dataset" rather than old manifest + new shards while the rewrite runs.
        self._lock = acquire_writer_lock(self.url) if write_manifest else None
        if self._lock is not None:
            release_manifest = storage.join(self.url, MANIFEST)
            if storage.exists(release_manifest):
                fs, path = storage.get_fs(release_manifest)
                fs.rm_file(path)

    def _open(self) -> None:
        name = f"shard-{self._index:06d}.tar"
        self._ctx = storage.atomic_local_file(storage.join(self.url, name), suffix=".tar")
        self._local = self._ctx.__enter__()
        # a fixed mtime makes shards byte-reproducible, so equal data gives equal digests; an int one
        # keeps plain ustar headers (a float adds a PAX header per member, ~15% of the reading time)
        self._tar = wds.TarWriter(self._local, encoder=False, mtime=0)
        self._count = 0

    def _close_shard(self, error: BaseException | None = None) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        if error is not None:  # drop the partial shard: nothing half-written becomes visible
            self._ctx.__exit__(type(error), error, error.__traceback__)
            return
        data = Path(self._local).read_bytes()
        info = ShardInfo(f"shard-{self._index:06d}.tar", self._count, hashlib.sha256(data).hexdigest(),
                         len(data))
        self._ctx.__exit__(None, None, None)
        self.shards.append(info)
        self._index += 1

    def write(self, sample: dict[str, Any]) -> None:
        if "__key__" not in sample:
            raise ValueError("a sample needs a __key__")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write(sample)
        self.fields.update(k for k in sample if not k.startswith("__"))
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._close_shard()

    def close(self) -> Manifest:
        if self.manifest is not None:
            return self.manifest
        self._close_shard()
        manifest = Manifest(name=self.name, num_samples=sum(s.num_samples for s in self.shards),
                            shards=self.shards, fields=sorted(self.fields), meta=self.meta,
                            created=time.time(), url=self.url)
        try:
            if self.write_manifest:
                storage.write_text(storage.join(self.url, MANIFEST), manifest.to_json())
        finally:
            self._release()
        self.manifest = manifest
        return manifest

    def _release(self) -> None:
        if self._lock is not None:
            release_writer_lock(self.url, self._lock)
            self._lock = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            try:
                self._close_shard(error=exc)  # finished shards stay; no manifest for a failed write
            finally:
                self._release()
            return
        self.close()
