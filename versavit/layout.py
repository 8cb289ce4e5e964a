"""The run layout: every URL and local path a run reads or writes, in one place (no torch, no I/O
beyond creating local report folders).

    <workdir>/
      data/synthetic/{train,val}          the rendered synthetic world              synthetic_root
      data/labelled/{train,val}           the world with teacher outputs added      labelled_root
      data/labelled-<kind>/{train,val}    intermediate outputs of chained teachers  label_step_url
      stages/<stage>[-<variant>]/         a training stage                          stage_url
        checkpoints/  export/  stage.json                                           stage_manifest_url, export_url
        lease.json                        which run writes the stage now            lease_url
        exports/<hash>-<step>/backbone    immutable copy of a registered version    version_export_url
      reports/<name>/                     figures, tables, logs, metrics.jsonl      reports_dir, metrics_log
      cache/eval/                         cached features, downloaded exports       eval_cache_dir
      staging/<host>/.staging-<pid>-...   a process's scratch (checkpoint saves)    staging_root
      mlflow.db, mlflow-pending/          the local MLflow store, unsent records    local_root
        mlflow-pending/replayed/          records sent later (tracking replay)      tracking_pending_dir
      kfp-local/                          KFP's local pipeline root

A workdir may be an `s3://` URL; what must be a local folder (reports, caches, the default MLflow
store, pending records) then goes to `./runs/<config name>` (`local_root`).
"""

from __future__ import annotations

import os
from pathlib import Path

from versavit import storage
from versavit.config import RunConfig

EVAL_CACHE_ENV = "VERSAVIT_EVAL_CACHE"


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
