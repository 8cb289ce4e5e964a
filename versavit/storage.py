"""URLs for everything a run reads and writes: local paths or s3:// (MinIO), through fsspec.

Endpoint and credentials come from `StorageConfig` and the environment, never from the URL, so
they do not end up in logs, manifests or MLflow params. Writes are atomic: a reader sees a whole
object or none (local: temp file + rename in the same folder; S3: one upload on success only).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fsspec

from versavit.config.schema import StorageConfig


class StorageError(RuntimeError):
    """A storage problem stated once, with the URL and what to do about it.

    `kind` is "auth" or "unreachable" (fatal: retrying or skipping cannot help), "missing" or "other".
    """

    def __init__(self, message: str, kind: str = "other"):
        super().__init__(message)
        self.kind = kind

    @property
    def fatal(self) -> bool:
        return self.kind in ("auth", "unreachable")


_config = StorageConfig()


# The storage section of the config (endpoint, region, env var names; never values) travels in this
# variable so a training pod can read its config from S3 before it has loaded that config.
STORAGE_ENV = "VERSAVIT_STORAGE"


def configure(cfg: StorageConfig) -> None:
    """Set the process-wide storage settings (called once by the CLI / stage entry points)."""
    global _config
    _config = cfg


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def _scheme(url: str) -> str:
    return urlparse(url).scheme if "://" in url else "file"


def s3_endpoint(cfg: StorageConfig | None = None) -> str | None:
    cfg = cfg or _config
    return cfg.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_credentials(cfg: StorageConfig) -> tuple[str | None, str | None]:
    return os.environ.get(cfg.access_key_env), os.environ.get(cfg.secret_key_env)


def storage_options(url: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """fsspec options for `url` (for s3: endpoint, region, credentials from the environment)."""
    cfg = cfg or _config
    if _scheme(url) != "s3":
        return {}
    key, secret = _s3_credentials(cfg)
    # Listings are not cached: several workers write to the same prefix.
    opts: dict[str, Any] = {"client_kwargs": {"region_name": cfg.s3_region}, "use_listings_cache": False}
    endpoint = s3_endpoint(cfg)
    if endpoint:
        opts["client_kwargs"]["endpoint_url"] = endpoint
    if key and secret:
        opts.update(key=key, secret=secret)
    # No retries on a dead endpoint: one clear error beats minutes of silent back-off.
    opts["config_kwargs"] = {"retries": {"max_attempts": 2}, "connect_timeout": 5, "read_timeout": 60}
    return opts


def get_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `url` and the path within it."""
    scheme = _scheme(url)
    fs = fsspec.filesystem(scheme, **storage_options(url))
    path = fs._strip_protocol(url) if scheme != "file" else str(Path(url.removeprefix("file://")).resolve())
    return fs, path


def join(url: str, *parts: str) -> str:
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def describe_error(url: str, exc: BaseException) -> StorageError:
    """Turn the many ways S3/fsspec fail into one message that names the problem and the fix."""
    text = f"{exc.__class__.__name__}: {exc}"
    endpoint = s3_endpoint() if _scheme(url) == "s3" else None
    low = text.lower()
    if any(s in low for s in ("signaturedoesnotmatch", "invalidaccesskeyid", "accessdenied", "forbidden",
                              "invalid access key", "403")):
        return StorageError(
            f"access to {url} was refused (wrong or missing credentials for endpoint {endpoint}): check the "
            f"{_config.access_key_env}/{_config.secret_key_env} environment variables",
            kind="auth",
        )
    if any(s in low for s in ("could not connect", "connection refused", "endpointconnectionerror",
                              "name or service not known", "max retries exceeded", "connect timeout",
                              "cannot connect")):
        return StorageError(
            f"cannot reach the S3 endpoint {endpoint} for {url}: check storage.s3_endpoint_url (or "
            "AWS_ENDPOINT_URL) and that the server is up",
            kind="unreachable",
        )
    if isinstance(exc, FileNotFoundError) or "nosuchbucket" in low or "nosuchkey" in low:
        return StorageError(f"{url} does not exist: check the URL (and that the previous stage finished)",
                            kind="missing")
    return StorageError(f"storage error on {url}: {text}")


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    try:
        return fs.exists(path)
    except Exception as exc:  # a dead endpoint must not read as "missing"
        raise describe_error(url, exc) from exc


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    try:
        return fs.cat_file(path)
    except Exception as exc:
        raise describe_error(url, exc) from exc


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def open_url(url: str, mode: str = "rb") -> Any:
    """An open file object for reading (streamed for s3)."""
    fs, path = get_fs(url)
    try:
        return fs.open(path, mode)
    except Exception as exc:
        raise describe_error(url, exc) from exc


def list_files(url: str, suffix: str = "") -> list[str]:
    """Full URLs of the files directly under `url` ending in `suffix`, sorted."""
    fs, path = get_fs(url)
    try:
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    except Exception as exc:
        raise describe_error(url, exc) from exc
    base = url.rstrip("/")
    return sorted(f"{base}/{n.rstrip('/').rsplit('/', 1)[-1]}" for n in names if n.endswith(suffix))


@contextlib.contextmanager
def atomic_local_file(url: str, suffix: str = "") -> Iterator[str]:
    """Yield a local path to write; on success it becomes `url` in one step, on error nothing does.

    Local: the temp file sits in the destination folder so `os.replace` is an atomic rename.
    S3: an object only exists once its upload completes, so uploading the finished file is atomic; the
    file is written in a `local_staging` folder (one left by a killed upload goes with the next upload).
    """
    if not is_remote(url):
        dest = Path(url.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
        try:
            yield str(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with local_staging("upload") as folder:  # a killed upload's file goes with the next one
        name = Path(urlparse(url).path).name or "object"
        tmp_name = str(folder / (name if name.endswith(suffix) else name + suffix))
        yield tmp_name
        fs, path = get_fs(url)
        try:
            fs.put_file(tmp_name, path)
        except Exception as exc:
            raise describe_error(url, exc) from exc


STAGING_PREFIX = ".staging-"


def _default_staging_root() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"versavit-staging-{user}"


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22); "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_runs(pid: int, start: str) -> bool:
    """Whether the process that made a staging folder still runs (not merely a later one with its pid)."""
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # it exists (another user's)
    now = _process_start(pid)
    return start == "0" or not now or now == start


def _staging_dir(root: str | Path | None) -> Path:
    """This host's folder of staging folders under `root` (pids are only meaningful on one host)."""
    return (Path(root) if root is not None else _default_staging_root()) / socket.gethostname()


def remove_stale_staging(root: str | Path | None = None) -> list[Path]:
    """Remove this host's staging folders under `root` whose process no longer runs; returns them."""
    removed = []
    folder = _staging_dir(root)
    for path in sorted(folder.glob(f"{STAGING_PREFIX}*")) if folder.is_dir() else []:
        pid, start, _ = (path.name[len(STAGING_PREFIX):].split("-", 2) + ["", ""])[:3]
        if pid.isdigit() and start.isdigit() and not _owner_runs(int(pid), start):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def local_staging(purpose: str, root: str | Path | None = None) -> Iterator[Path]:
    """A fresh local scratch folder, removed when the block ends (normally, by an exception, SystemExit).

    It lives in `<root>/<host>/` (default root: `<temp dir>/versavit-staging-<uid>`; a run passes
    `layout.staging_root`), named after this process: `.staging-<pid>-<start time>-<purpose>-<random>`.
    A folder whose process was killed (SIGKILL mid-save) is removed by the next call under the same root.
    """
    folder = _staging_dir(root)
    remove_stale_staging(root)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{STAGING_PREFIX}{os.getpid()}-{_process_start(os.getpid()) or 0}-{purpose}-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_bytes(url: str, data: bytes) -> None:
    """Atomically write `data` to `url`."""
    with atomic_local_file(url) as tmp:
        Path(tmp).write_bytes(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def _minio_client(cfg: StorageConfig) -> Any:
    import urllib3
    from minio import Minio

    endpoint = s3_endpoint(cfg)
    if not endpoint:
        raise StorageError("no S3 endpoint configured: set storage.s3_endpoint_url or AWS_ENDPOINT_URL")
    parsed = urlparse(endpoint)
    key, secret = _s3_credentials(cfg)
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=30), retries=urllib3.Retry(total=1, backoff_factor=0.2)
    )
    return Minio(parsed.netloc, access_key=key, secret_key=secret, secure=parsed.scheme == "https",
                 region=cfg.s3_region, http_client=http)


def ensure_bucket(url: str, cfg: StorageConfig | None = None) -> None:
    """Create the bucket of an s3:// URL if missing (minio SDK); no-op for local paths.

    Also proves the endpoint and credentials work, so a wrong secret fails here, at the start.
    """
    cfg = cfg or _config
    if _scheme(url) != "s3":
        Path(url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        return
    bucket = urlparse(url).netloc
    client = _minio_client(cfg)
    try:
        if not client.bucket_exists(bucket):
            if not cfg.create_buckets:
                raise StorageError(f"bucket {bucket!r} does not exist and storage.create_buckets is false")
            client.make_bucket(bucket)
    except StorageError:
        raise
    except Exception as exc:
        raise describe_error(url, exc) from exc


def localize_config(ref: str) -> str:
    """A local path for `--config`: an URL (s3://...) is fetched once per pod into a temp file.

    Called by the training entry point before it loads the config; storage settings come from
    `$VERSAVIT_STORAGE` (set by the launchers), credentials from the env as always.
    """
    import hashlib

    if not is_remote(ref):
        return ref
    raw = os.environ.get(STORAGE_ENV)
    configure(StorageConfig.model_validate_json(raw) if raw else StorageConfig())
    dest = Path(tempfile.gettempdir()) / f"versavit-config-{hashlib.sha256(ref.encode()).hexdigest()[:12]}.yaml"
    if not dest.is_file():  # the ranks of a node share one download (written atomically)
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(read_text(ref))
        os.replace(tmp, dest)
    return str(dest)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create `url` holding `data` unless it exists, atomically; False if it exists (locks and leases).

    Local: the data is written to a temp file, then hard-linked into place (fails if `url` exists; a
    reader never sees a partial record). S3: a conditional put (If-None-Match: *); an s3fs without it
    falls back to check-then-put, racy by one round trip.
    """
    if not is_remote(url):
        dest = Path(url.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(data)
        try:
            os.link(tmp, dest)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    fs, path = get_fs(url)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (TypeError, ValueError, NotImplementedError):  # no exclusive create in this s3fs / store
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True
    except Exception as exc:
        if "PreconditionFailed" in repr(exc) or "412" in str(exc):
            return False
        raise describe_error(url, exc) from exc
