"""Checkpoints staged once: every model a run loads, copied to `weights.url` before any pod needs it.

    stage_weights(cfg)        hub (or local folder) -> <weights.url>/<hub id>   (`versavit weights stage`)
    resolve(cfg)              a copy of cfg whose model refs are those staged URLs (what stages and pods use)
    local_model_path(ref)     what loaders call before from_pretrained: an s3:// staged URL -> a local folder,
                              copied once per node into $VERSAVIT_MODEL_CACHE; anything else unchanged

A staged copy is complete when its record (`.versavit-weights.json`: source, revision, file names and
sizes) is there; it is written last, so an interrupted upload is never taken for a checkpoint. With
`weights.url` set the launchers run the pods with `HF_HUB_OFFLINE=1` (`pod_env`): nothing is fetched from
the hub during training or labelling. A hub token (gated models) is read from `$<weights.hub_token_env>`
(on the cluster: the Secret named by `weights.hub_token_secret`) and never written anywhere.

Torch-free: huggingface_hub and versavit.storage only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from versavit import layout, storage
from versavit.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

# field path -> what loads it; every model a run can load
MODEL_FIELDS: tuple[str, ...] = (
    "model.backbone.pretrained",        # VisionBackbone.build / from_pretrained
    "model.heads.caption.llm",          # CaptionHead.build: AutoModelForCausalLM
    "model.heads.caption.tokenizer",    # CaptionHead.build: AutoTokenizer
    "labeling.teachers.depth",          # DepthTeacher
    "labeling.teachers.masks",          # MaskTeacher
    "labeling.teachers.describer",      # ImageTextDescriber
    "labeling.teachers.embedder",       # TextEmbedder (labelling, and eval on RefCOCO)
    "eval.baseline_backbone",           # eval's baseline candidate
    "eval.refseg_finetune.text_encoder",  # the LoRA fine-tune's text encoder (default: the embedder)
    "eval.retrieval.text_encoder",      # retrieval's SigLIP2 text tower
    "eval.vqa.llm",                     # the VQA protocol's LLM (default: the caption head's)
)
# teachers only a label step of this kind loads (the embedder also serves evaluation on RefCOCO)
TEACHER_KINDS = {"labeling.teachers.depth": "depth", "labeling.teachers.masks": "masks",
                 "labeling.teachers.describer": "describe"}
NOT_A_MODEL = ("class-label",)  # labeling.describe.CLASS_LABEL: the describer without a model

# what from_pretrained / AutoTokenizer / AutoProcessor / SentenceTransformer read from a hub repo
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja", "*.bpe",
                  "tokenizer*", "vocab*", "merges*", "*.bin"]
IGNORE_PATTERNS = ["onnx/*", "openvino/*", "coreml/*", "*.onnx", "*.onnx_data", "*.gguf", "*.h5", "*.msgpack",
                   "*.ot", "*.pth", "*.tflite", "*.mlmodel", "*.pt", "original/*"]
PARTIAL = ".versavit-weights.partial.json"  # an upload in progress: which source and revision it copies
COMPLETE = ".complete"  # a node-local copy is whole (cached_copy)
_SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__"}


class WeightsError(storage.StorageError):
    """A checkpoint that cannot be staged or found, stated in one line with what to do."""


ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------
# which models, and where they are staged


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def is_staged_ref(cfg: RunConfig, ref: str) -> bool:
    """Whether `ref` already points into `weights.url` (a resolved config)."""
    root = (cfg.weights.url or "").rstrip("/")
    return bool(root) and (ref == root or ref.startswith(root + "/"))


def model_refs(cfg: RunConfig) -> dict[str, str]:
    """Field path -> ref of every model the run loads (hub ids and local folders).

    Skipped: unset fields, teachers of label steps the run does not run, the class-label describer, refs already
    under `weights.url`, and other remote URLs (already in object storage: loaders copy them with
    `local_model_path`)."""
    out = {}
    kinds = cfg.label_kinds()
    for field in MODEL_FIELDS:
        ref = _get(cfg, field)
        if field in TEACHER_KINDS and TEACHER_KINDS[field] not in kinds:
            continue  # a teacher of a label step this run does not run
        if not ref or ref in NOT_A_MODEL or is_staged_ref(cfg, ref) or layout.model_ref_kind(ref) == "url":
            continue
        out[field] = ref
    return out


def staged_url(cfg: RunConfig, ref: str) -> str:
    """`<weights.url>/<hub id>`, or `<weights.url>/local/<name>-<hash of the path>` for a local folder."""
    if not cfg.weights.url:
        raise ConfigError("weights.url is not set: set it to where checkpoints are staged (s3://bucket/weights or "
                          "a shared folder)")
    return layout.weights_url(cfg, ref)


def resolve(cfg: RunConfig) -> RunConfig:
    """A copy of `cfg` with every model ref replaced by its staged URL (`cfg` itself when weights.url is unset).

    Idempotent: a resolved config resolves to itself, so every stage and pod may call it."""
    refs = model_refs(cfg) if cfg.weights.url else {}
    if not refs:
        return cfg
    out = cfg.model_copy(deep=True)
    for field, ref in refs.items():
        parent, _, name = field.rpartition(".")
        setattr(_get(out, parent), name, staged_url(cfg, ref))
    return out


def pod_env(cfg: RunConfig) -> dict[str, str]:
    """Plain env of training and labelling pods: the hub offline once checkpoints are staged."""
    return {"HF_HUB_OFFLINE": "1"} if cfg.weights.url else {}


def token_secret(cfg: RunConfig) -> tuple[str, str, str] | None:
    """(env var, Secret name, key) that gives the weights step its hub token; None without `hub_token_secret`.
    For the pipeline's weights step (e.g. kfp-kubernetes `use_secret_as_env`); the value never enters a spec."""
    ref = cfg.weights.hub_token_secret
    if not ref:
        return None
    secret, sep, key = ref.partition("/")
    if not (sep and secret and key):
        raise ConfigError(f"weights.hub_token_secret = {ref!r}: expected 'secret-name/key'")
    return cfg.weights.hub_token_env, secret, key


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --------------------------------------------------------------------------------------------
# staging


def _read_json(url: str) -> dict | None:
    try:
        return json.loads(storage.read_text(url))
    except storage.StorageError as exc:
        if exc.kind == "missing":
            return None
        raise
    except ValueError:  # a damaged record: treated as absent (the copy is redone)
        return None


def _local_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of the files under `folder` (symlinks followed, tool folders and records skipped)."""
    out = {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if name in (layout.WEIGHTS_RECORD, PARTIAL, COMPLETE) or name.endswith(".lock"):
                continue
            out[rel] = path.stat().st_size
    return out


def _fingerprint(folder: Path, files: dict[str, int]) -> str:
    """Names, sizes and modification times of a local folder's files: a changed checkpoint is copied again."""
    h = hashlib.sha256()
    for rel, size in sorted(files.items()):
        h.update(f"{rel}\0{size}\0{(folder / rel).stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _remote_files(url: str) -> dict[str, int]:
    """Relative path -> size of what is staged at `url` (records included)."""
    fs, path = storage.get_fs(url)
    try:
        if not fs.exists(path):
            return {}
        found = fs.find(path, detail=True)
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc
    base = path.rstrip("/") + "/"
    return {p[len(base):]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(base) and info.get("type", "file") != "directory"}


def _put(src: Path, url: str) -> None:
    """Copy one file to `url` atomically (local: temp file + rename; S3: one upload)."""
    if not storage.is_remote(url):
        dest = Path(url.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = storage.get_fs(url)
    try:
        fs.put_file(str(src), path)
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc


def _remove(url: str, names: list[str]) -> None:
    fs, path = storage.get_fs(url)
    for name in names:
        try:
            fs.rm_file(f"{path.rstrip('/')}/{name}")
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise storage.describe_error(storage.join(url, name), exc) from exc


def _same_content(record: dict | None, want: dict) -> bool:
    return bool(record) and all(record.get(k) == want.get(k) for k in ("source", "revision", "fingerprint")) \
        and record.get("files") == want["files"]


def _upload(ref: str, url: str, folder: Path, want: dict, progress: ProgressFn | None) -> None:
    """Make `url` hold exactly `want["files"]` from `folder`, then the record. Files go first, the record last;
    an interrupted upload of the same source and revision resumes (whole objects of the right size stay)."""
    partial = _read_json(storage.join(url, PARTIAL))
    same = {k: want.get(k) for k in ("source", "revision", "fingerprint")}
    resume = bool(partial) and all(partial.get(k) == v for k, v in same.items())
    if storage.exists(layout.weights_record_url(url)):
        _remove(url, [layout.WEIGHTS_RECORD])  # from here on the old copy is incomplete
    storage.write_text(storage.join(url, PARTIAL), json.dumps(same))
    found = _remote_files(url)
    # another model staged below this one (hub ids `name` and `name/x`) is not ours to remove
    nested = tuple(k.rsplit("/", 1)[0] + "/" for k in found if "/" in k
                   and k.rsplit("/", 1)[1] in (PARTIAL, layout.WEIGHTS_RECORD))
    present = {k: v for k, v in found.items() if k not in (PARTIAL, layout.WEIGHTS_RECORD)
               and not k.startswith(nested)}
    keep = {k for k, v in present.items() if resume and want["files"].get(k) == v}
    _remove(url, sorted(set(present) - keep))
    total, done = sum(want["files"].values()), sum(want["files"][k] for k in keep)
    if progress:
        progress(ref, done, total)
    for rel, size in want["files"].items():
        if rel in keep:
            continue
        _put(folder / rel, storage.join(url, rel))
        done += size
        if progress:
            progress(ref, done, total)
    storage.write_text(layout.weights_record_url(url), json.dumps(want, indent=1))
    _remove(url, [PARTIAL])


def _hub_error(cfg: RunConfig, ref: str, revision: str, exc: BaseException) -> WeightsError | None:
    """The hub's exception as one line naming the repo and the fix; None when the hub is only unreachable."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    env, secret = cfg.weights.hub_token_env, cfg.weights.hub_token_secret or "secret-name/key"
    token_hint = f"set ${env} (on the cluster: weights.hub_token_secret={secret}, a Secret holding the token)"
    chain, seen = [], exc
    while seen is not None and len(chain) < 5:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, HFValidationError):
            return WeightsError(f"{ref!r} is neither an existing folder nor a valid hub id (owner/name)",
                                kind="missing")
        if isinstance(e, GatedRepoError):
            return WeightsError(f"{ref} is gated on the hub and this token may not read it: accept its licence on "
                                f"huggingface.co/{ref} and {token_hint}", kind="auth")
        if isinstance(e, RevisionNotFoundError):
            return WeightsError(f"{ref} has no revision {revision!r} on the hub: fix weights.revisions['{ref}']",
                                kind="missing")
        if isinstance(e, RepositoryNotFoundError):
            return WeightsError(f"{ref} was not found on the hub (a typo, or a private repo: {token_hint})",
                                kind="missing")
        if isinstance(e, HfHubHTTPError) and getattr(e.response, "status_code", None) in (401, 403):
            return WeightsError(f"the hub refused access to {ref}: {token_hint}", kind="auth")
        if isinstance(e, LocalEntryNotFoundError | OfflineModeIsEnabled | ConnectionError | TimeoutError):
            return None
    if any(type(e).__module__.startswith(("httpx", "huggingface_hub", "requests", "urllib3")) for e in chain):
        return None  # a connection problem, the hub being down, a dry run that could not list the repo
    return WeightsError(f"cannot stage {ref} from the hub: {type(exc).__name__}: {exc}")


def _unreachable(ref: str) -> WeightsError:
    return WeightsError(f"cannot reach the hub for {ref} (no network, or HF_HUB_OFFLINE=1) and it is not in this "
                        f"machine's hub cache: stage it from a local folder (set the model's field to the folder "
                        f"holding its checkpoint) or run `versavit weights stage` where the hub is reachable",
                        kind="unreachable")


def _drop_unused(files: dict[str, Any]) -> dict[str, Any]:
    """PyTorch .bin weights only where a repo has no safetensors (from_pretrained prefers those)."""
    if any(f.endswith(".safetensors") for f in files):
        return {f: s for f, s in files.items() if not f.endswith(".bin")}
    return files


class _Listing:
    """What a hub revision holds that from_pretrained needs: its commit sha, file -> size (-1: unknown), and
    whether this machine's hub cache already has all of it."""

    def __init__(self, sha: str, files: dict[str, int], cached: bool) -> None:
        self.sha, self.files, self.cached = sha, files, cached


def _hub_listing(cfg: RunConfig, ref: str, revision: str, token: str | None) -> _Listing | None:
    """The files a download would fetch (snapshot_download's dry run: nothing is downloaded); None when the hub
    is unreachable."""
    try:
        infos = snapshot_download(ref, revision=revision, token=token, allow_patterns=ALLOW_PATTERNS,
                                  ignore_patterns=IGNORE_PATTERNS, dry_run=True)
    except Exception as exc:
        err = _hub_error(cfg, ref, revision, exc)
        if err is None:
            return None
        raise err from None
    if not infos:
        raise WeightsError(f"{ref} (revision {revision}) holds no checkpoint files (none of {ALLOW_PATTERNS})",
                           kind="missing")
    files = _drop_unused({i.filename: int(i.file_size if i.file_size is not None else -1) for i in infos})
    cached = all(i.is_cached for i in infos if i.filename in files)
    return _Listing(infos[0].commit_hash, dict(sorted(files.items())), cached)


def _hub_download(cfg: RunConfig, ref: str, revision: str, token: str | None, files: list[str] | None,
                  local_dir: Path | None) -> Path:
    """A folder holding `files` of `ref` at `revision`: downloaded into `local_dir` (scratch, removed after the
    upload: the step's disk holds one model at a time), or this machine's hub cache when `local_dir` is None
    (files already there, or the hub unreachable)."""
    try:
        folder = snapshot_download(ref, revision=revision, token=token, allow_patterns=files or ALLOW_PATTERNS,
                                   ignore_patterns=IGNORE_PATTERNS, local_dir=local_dir)
    except Exception as exc:
        raise (_hub_error(cfg, ref, revision, exc) or _unreachable(ref)) from None
    return Path(folder)


def _stage_hub(cfg: RunConfig, ref: str, url: str, progress: ProgressFn | None) -> dict[str, Any]:
    revision = cfg.weights.revisions.get(ref, "main")
    token = os.environ.get(cfg.weights.hub_token_env) or None
    record = _read_json(layout.weights_record_url(url))
    listing = _hub_listing(cfg, ref, revision, token)
    if listing is None:  # offline: a finished copy of the same request stands; else try the local hub cache
        if record and record.get("source") == ref and record.get("requested_revision") == revision:
            log.warning("hub unreachable: keeping the staged %s at revision %s", ref, record.get("revision"))
            return {**record, "status": "skipped"}
    elif record and record.get("source") == ref and record.get("revision") == listing.sha \
            and set(record.get("files", {})) == set(listing.files) \
            and all(s < 0 or record["files"][f] == s for f, s in listing.files.items()):
        return {**record, "status": "skipped"}
    with contextlib.ExitStack() as scratch:
        local_dir = None
        if listing is not None and not listing.cached:
            local_dir = scratch.enter_context(storage.local_staging("weights")) / "snapshot"
        folder = _hub_download(cfg, ref, listing.sha if listing else revision, token,
                               list(listing.files) if listing else None, local_dir)
        local = _local_files(folder)
        if listing is None:  # files from the cache: the same selection a download would make
            local = _drop_unused({f: s for f, s in local.items()
                                  if any(fnmatch.fnmatch(f, p) for p in ALLOW_PATTERNS)
                                  and not any(fnmatch.fnmatch(f, p) for p in IGNORE_PATTERNS)})
        else:
            if missing := sorted(set(listing.files) - set(local)):
                raise WeightsError(f"the download of {ref} at {listing.sha} misses {missing[:3]}: run again")
            local = {f: local[f] for f in listing.files}
        sha = listing.sha if listing else folder.name  # hub cache: .../snapshots/<commit sha>
        want = {"source": ref, "kind": "hub", "requested_revision": revision, "revision": sha, "files": local}
        return _finish(ref, url, folder, want, record, progress)


def _stage_local(field: str, ref: str, url: str, progress: ProgressFn | None) -> dict[str, Any]:
    folder = Path(os.path.expanduser(ref.removeprefix("file://"))).resolve()
    if not folder.is_dir():
        raise WeightsError(f"{field} = {ref}: no such folder (a local checkpoint is a folder in from_pretrained "
                           "layout)", kind="missing")
    files = _local_files(folder)
    if not files:
        raise WeightsError(f"{field} = {ref}: the folder is empty", kind="missing")
    want = {"source": str(folder), "kind": "local", "requested_revision": "local", "revision": "local",
            "fingerprint": _fingerprint(folder, files), "files": files}
    record = _read_json(layout.weights_record_url(url))
    if _same_content(record, want):
        return {**record, "status": "skipped"}
    return _finish(ref, url, folder, want, record, progress)


def _finish(ref: str, url: str, folder: Path, want: dict, record: dict | None,
            progress: ProgressFn | None) -> dict[str, Any]:
    want["bytes"] = sum(want["files"].values())
    if _same_content(record, want):
        return {**record, "status": "skipped"}
    started = time.monotonic()
    _upload(ref, url, folder, {**want, "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, progress)
    log.info("staged %s (revision %s): %d files, %s to %s in %.0f s", ref, want["revision"], len(want["files"]),
             human_size(want["bytes"]), url, time.monotonic() - started)
    return {**want, "status": "copied"}


def stage_weights(cfg: RunConfig, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Copy every model the run loads to `weights.url`, once: a complete staged copy with the same source,
    revision and files is skipped. Returns one row per model: fields, ref, url, revision (the hub's commit
    sha, or "local"), bytes, files (count), status ("copied" or "skipped"). `progress(ref, bytes, total)`."""
    if not cfg.weights.url:
        staged_url(cfg, "")  # raises the ConfigError that says what to set
    storage.configure(cfg.storage)
    storage.ensure_bucket(cfg.weights.url)
    by_ref: dict[str, list[str]] = {}
    for field, ref in model_refs(cfg).items():
        by_ref.setdefault(ref, []).append(field)
    rows = []
    for ref, fields in by_ref.items():
        url = staged_url(cfg, ref)
        if layout.model_ref_kind(ref) == "hub":
            done = _stage_hub(cfg, ref, url, progress)
        else:
            done = _stage_local(fields[0], ref, url, progress)
        rows.append({"fields": fields, "ref": ref, "url": url, "revision": done["revision"],
                     "bytes": int(done.get("bytes", sum(done["files"].values()))), "files": len(done["files"]),
                     "status": done["status"]})
    return rows


def list_staged(cfg: RunConfig) -> list[dict[str, Any]]:
    """What is staged under `weights.url` (from the records), plus the run's models that are not (status
    "missing") or whose upload did not finish ("incomplete")."""
    if not cfg.weights.url:
        staged_url(cfg, "")
    storage.configure(cfg.storage)
    found = _remote_files(cfg.weights.url)
    fields_of: dict[str, list[str]] = {}
    for field, ref in model_refs(cfg).items():
        fields_of.setdefault(staged_url(cfg, ref), []).append(field)
    rows: dict[str, dict[str, Any]] = {}
    for rel in sorted(found):
        name = rel.rsplit("/", 1)[-1]
        if name not in (layout.WEIGHTS_RECORD, PARTIAL):
            continue
        url = storage.join(cfg.weights.url, rel.rsplit("/", 1)[0]) if "/" in rel else cfg.weights.url
        rec = _read_json(storage.join(cfg.weights.url, rel)) or {}
        if name == PARTIAL and url in rows:
            continue
        rows[url] = {"fields": fields_of.get(url, []), "ref": rec.get("source", "?"), "url": url,
                     "revision": rec.get("revision", "?"), "bytes": int(rec.get("bytes", 0)),
                     "files": len(rec.get("files", {})), "staged_at": rec.get("staged_at", ""),
                     "status": "staged" if name == layout.WEIGHTS_RECORD else "incomplete"}
    for url, fields in fields_of.items():
        if url not in rows:
            rows[url] = {"fields": fields, "ref": _get(cfg, fields[0]), "url": url, "revision": "", "bytes": 0,
                         "files": 0, "staged_at": "", "status": "missing"}
    return list(rows.values())


# --------------------------------------------------------------------------------------------
# loading: a node-local copy of a staged checkpoint


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes of one machine (released by the kernel if the holder dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_folder(url: str, dest: Path) -> None:
    """Copy the remote folder `url` (recursively) into the new local folder `dest`."""
    fs, path = storage.get_fs(url)
    try:
        fs.get(path.rstrip("/") + "/", str(dest) + "/", recursive=True)
    except Exception as exc:
        raise storage.describe_error(url, exc) from exc


def _is_complete(dest: Path, stamp: str) -> bool:
    try:
        return (dest / COMPLETE).read_text() == stamp
    except OSError:
        return False


def cached_copy(url: str, dest: Path, version: str = "") -> Path:
    """A local copy of the remote folder `url` at `dest`, made once and shared by concurrent processes.

    `dest/.complete` holds `url` (and `version`, e.g. the digest of a staged record: a re-staged checkpoint is
    copied again). One process copies into a temp folder beside `dest` under a lock file and renames it into
    place; the others wait for the lock and then find the copy complete."""
    stamp = f"{url}\n{version}" if version else url
    if _is_complete(dest, stamp):
        return dest
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if _is_complete(dest, stamp):
            return dest
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by a killed copy (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
            _download_folder(url, tmp)
            (tmp / COMPLETE).write_text(stamp)
            if dest.exists():  # an older copy: readers that opened its files keep them
                old = dest.parent / f".{dest.name}.tmp-old-{uuid.uuid4().hex[:6]}"
                os.rename(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_model_path(ref: str) -> str:
    """What to pass to from_pretrained for `ref`: a staged s3:// (remote) checkpoint is copied once into this
    node's model cache (`layout.model_cache_dir()`) and that folder returned; a local path or hub id is
    returned unchanged."""
    ref = os.fspath(ref)
    if not storage.is_remote(ref):
        return ref
    record = None
    try:
        record = storage.read_text(layout.weights_record_url(ref))
    except storage.StorageError as exc:
        if exc.kind != "missing":
            raise
    if record is None:
        if storage.exists(storage.join(ref, PARTIAL)):
            raise WeightsError(f"the staging of {ref} did not finish: run `versavit weights stage` again",
                               kind="missing")
        if not storage.exists(ref):
            raise WeightsError(f"no checkpoint at {ref}: stage the run's models first (`versavit weights stage`, "
                               "or the pipeline's weights step)", kind="missing")
    name = ref.rstrip("/").rsplit("/", 1)[-1] or "model"
    dest = layout.model_cache_dir() / f"{name}-{hashlib.sha256(ref.encode()).hexdigest()[:12]}"
    version = hashlib.sha256(record.encode()).hexdigest()[:16] if record else ""
    return str(cached_copy(ref, dest, version))
