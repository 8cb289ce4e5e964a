"""The run layout: every URL and local path a run reads or writes, in one place (no torch, no I/O
beyond creating local report folders).

    <workdir>/
      data/synthetic/{train,val}          the rendered synthetic world              synthetic_root
      data/labelled/{train,val}           the world with teacher outputs added      labelled_root
      data/labelled-<kind>/{train,val}    intermediate outputs of chained teachers  label_step_url
      data/label-steps/<dataset>/<kind>   the same for a data.datasets entry        dataset_label_step_url
      stages/<stage>[-<variant>]/         a training stage                          stage_url
        checkpoints/  export/  stage.json                                           stage_manifest_url, export_url
        lease.json                        which run writes the stage now            lease_url
      launch/<stage>/<job>.yaml           the config a cluster job's pods read      launch_config_url
        exports/<hash>-<step>/backbone    immutable copy of a registered version    version_export_url
      reports/<name>/                     figures, tables, logs, metrics.jsonl      reports_dir, metrics_log
      cache/eval/                         cached features, downloaded exports       eval_cache_dir
      staging/<host>/.staging-<pid>-...   a process's scratch (checkpoint saves)    staging_root
      mlflow.db, mlflow-pending/          the local MLflow store, unsent records    local_root
        mlflow-pending/replayed/          records sent later (tracking replay)      tracking_pending_dir
      kfp-local/                          KFP's local pipeline root

    <weights.url>/                        checkpoints staged once (`versavit weights stage`)
      <owner>/<name>/                     a hub model, as from_pretrained needs it     weights_url
      local/<name>-<hash>/                a local checkpoint folder
        .versavit-weights.json            the record: source, revision, files (last)   weights_record_url
    $VERSAVIT_MODEL_CACHE (~/.cache/versavit/models)  a node's copies of s3 checkpoints  model_cache_dir

A workdir may be an `s3://` URL; what must be a local folder (reports, caches, the default MLflow
store, pending records) then goes to `./runs/<config name>` (`local_root`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from versavit import storage
from versavit.config import RunConfig

EVAL_CACHE_ENV = "VERSAVIT_EVAL_CACHE"
MODEL_CACHE_ENV = "VERSAVIT_MODEL_CACHE"
WEIGHTS_RECORD = ".versavit-weights.json"  # written last: a staged copy without it is incomplete
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")


def local_root(cfg: RunConfig) -> Path:
    """The workdir when it is local; `./runs/<name>` for an `s3://` workdir."""
    return Path(cfg.workdir) if not storage.is_remote(cfg.workdir) else Path("runs") / cfg.name


def reports_dir(cfg: RunConfig, name: str) -> Path:
    """A local folder for one stage's figures, tables and logs (created)."""
    path = local_root(cfg) / "reports" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def metrics_log(cfg: RunConfig, name: str) -> Path:
    """A training run's per-step metrics (JSON lines), beside its other reports."""
    return reports_dir(cfg, name) / "metrics.jsonl"


def metrics_log_of_export(export: Path) -> Path | None:
    """The metrics log of the run that wrote a local export at `<workdir>/stages/<name>/export`, if it is one."""
    if export.name == "export" and export.parent.parent.name == "stages":
        return export.parents[2] / "reports" / export.parent.name / "metrics.jsonl"
    return None


def run_name(stage: str, variant: str = "") -> str:
    """A stage's folder and run name: `<stage>` or `<stage>-<variant>` (comparison branches)."""
    return f"{stage}-{variant}" if variant else stage


def stage_url(cfg: RunConfig, stage: str, variant: str = "") -> str:
    """`<workdir>/stages/<stage>[-<variant>]`: checkpoints/, export/, stage.json."""
    return storage.join(cfg.workdir, "stages", run_name(stage, variant))


def stage_manifest_url(cfg: RunConfig, stage: str, variant: str = "") -> str:
    """The small manifest a finished stage leaves for the next one."""
    return storage.join(stage_url(cfg, stage, variant), "stage.json")


def lease_url(cfg: RunConfig, stage: str, variant: str = "") -> str:
    """The lease of a stage folder: which run writes it now (`versavit.train.lease`)."""
    return storage.join(stage_url(cfg, stage, variant), "lease.json")


def launch_config_url(cfg: RunConfig, stage: str, job_name: str) -> str:
    """Where a cluster launch publishes the resolved config its pods read: `<workdir>/launch/<stage>/<job>.yaml`."""
    return storage.join(cfg.workdir, "launch", stage, f"{job_name}.yaml")


def version_export_url(cfg: RunConfig, stage: str, variant: str, key: str) -> str:
    """An immutable copy of a stage's backbone export, `<stage url>/exports/<key>/` (key: `<config hash>-<step>`):
    what a registered model version points at (export/ is overwritten by the next run)."""
    return storage.join(stage_url(cfg, stage, variant), "exports", key)


def export_url(cfg: RunConfig, stage: str, variant: str = "") -> str:
    """A stage's export: the backbone in Hugging Face format plus each head."""
    return storage.join(stage_url(cfg, stage, variant), "export")


def synthetic_root(workdir: str) -> str:
    """Where a run's synthetic world lives: `<workdir>/data/synthetic/{train,val}`."""
    return storage.join(workdir, "data", "synthetic")


def labelled_root(workdir: str) -> str:
    """Where the labelling stage writes the world with teacher outputs added (text embeddings, ...)."""
    return storage.join(workdir, "data", "labelled")


def label_step_url(workdir: str, kind: str, split: str) -> str:
    """An intermediate dataset of chained teachers (each adds its fields; the last writes labelled_root)."""
    return storage.join(workdir, "data", f"labelled-{kind}", split)


def dataset_label_step_url(workdir: str, dataset: str, kind: str) -> str:
    """An intermediate output of a `data.datasets` entry's label chain (the last kind writes its `labelled`)."""
    return storage.join(workdir, "data", "label-steps", dataset, kind)


def eval_cache_dir(cfg: RunConfig) -> Path:
    """Cached features and downloaded exports: `$VERSAVIT_EVAL_CACHE`, else `<local root>/cache/eval`."""
    if os.environ.get(EVAL_CACHE_ENV):
        return Path(os.environ[EVAL_CACHE_ENV])
    return local_root(cfg) / "cache" / "eval"


def staging_root(cfg: RunConfig) -> Path:
    """Local scratch of checkpoint saves/loads and exports: `<local root>/staging` (`storage.local_staging`
    makes one folder per use in `<host>/`, named after its process, and removes those of dead processes)."""
    return local_root(cfg) / "staging"


def tracking_pending_dir(cfg: RunConfig) -> Path:
    """Where tracking records that could not be sent are saved."""
    return local_root(cfg) / "mlflow-pending"


def kfp_local_root(workdir: str | Path) -> Path:
    """KFP's pipeline root for local runs (it cannot be s3:// there)."""
    return Path(workdir) / "kfp-local"


def model_ref_kind(ref: str) -> str:
    """What a model ref is: "url" (s3:// and other remote URLs), "local" (a folder path) or "hub" (a hub id,
    `owner/name` or `name`, that is not an existing folder; from_pretrained checks folders first, too)."""
    if storage.is_remote(ref):
        return "url"
    path = ref.removeprefix("file://")
    if ref.startswith(("file://", "/", ".", "~")) or os.path.isdir(os.path.expanduser(path)):
        return "local"
    return "hub" if _HUB_ID.match(ref) and "--" not in ref and ".." not in ref else "local"


def weights_url(cfg: RunConfig, ref: str) -> str:
    """Where `ref` is staged: `<weights.url>/<hub id>`, or `<weights.url>/local/<folder name>-<8 hex of the path
    as configured>` for a local folder (a function of the config alone: every process resolves it alike).
    Requires `weights.url`."""
    if not cfg.weights.url:
        raise ValueError("weights.url is not set: there is no staged copy of any model")
    if model_ref_kind(ref) == "hub":
        return storage.join(cfg.weights.url, ref)
    path = ref.removeprefix("file://").rstrip("/")
    digest = hashlib.sha256(path.encode()).hexdigest()[:8]
    return storage.join(cfg.weights.url, "local", f"{Path(path).name or 'model'}-{digest}")


def weights_record_url(staged_url: str) -> str:
    """The record of a staged checkpoint (source, revision, files and sizes); present only once it is complete."""
    return storage.join(staged_url, WEIGHTS_RECORD)


def model_cache_dir() -> Path:
    """Where a node keeps its copies of staged s3:// checkpoints: `$VERSAVIT_MODEL_CACHE`, else
    `~/.cache/versavit/models` (one copy per node, shared by its ranks)."""
    if os.environ.get(MODEL_CACHE_ENV):
        return Path(os.environ[MODEL_CACHE_ENV])
    return Path.home() / ".cache" / "versavit" / "models"
