"""What a pipeline run is called and says about itself in MLflow, and where the UI shows it.

- **Name**: `<config name>-<first 8 of the config hash>-<YYYYmmdd-HHMMSS>` (`parent_run_name`), or the name
  given with `versavit pipeline run --run-name` (`$VERSAVIT_RUN_NAME`).
- **Description** (`mlflow.note.content`, shown on the run page): the pipeline, its stages in order, and the
  overrides that differ from the base config file (`$VERSAVIT_RUN_OVERRIDES`, set by the CLI).
- **Tags**: `versavit.pipeline_kind` (versavit | ablation | recipes), `versavit.recipe` (the stages of the
  recipe, `>`-joined), `versavit.tasks` (`caption,depth,refseg`), `versavit.backbone`.
- **Params**: the config flattened readably (`tracker.flatten_config`: lists as `caption,depth`), without
  `tracking.uri` (it may hold credentials; the experiment is a tag of every run anyway).
- **The runs table's saved view** (`headline_view`): MLflow 3.x keeps the runs table's columns in the
  browser (local storage), per user; what it keeps on the server is a *shared view*, the experiment tag
  `mlflow.sharedViewState.<key>` holding the view as JSON, opened by `?viewStateShareKey=<key>`
  (`experiment_url`). The evaluation stage writes one (key `versavit-headline`): the git commit, the identity
  tags and the headline metric columns, newest runs first.
- **URLs** of the experiment (in the "Model training" layout: `?workflowType=machine_learning`; without it
  MLflow 3.x opens an experiment in the GenAI layout) and of MLflow's compare page.

The pipeline kind and the run name come by environment variables, set on the open-run step: the run's
config (and so its hash) stays the same whatever the run is called.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from versavit.config import RunConfig, config_hash, config_to_dict
from versavit.tracking.tracker import _clean_key, _redact, flatten_config

PIPELINE_ENV = "VERSAVIT_PIPELINE"  # the KFP pipeline's name, set on the open-run step
RUN_NAME_ENV = "VERSAVIT_RUN_NAME"  # `pipeline run --run-name`
OVERRIDES_ENV = "VERSAVIT_RUN_OVERRIDES"  # JSON: {"base": <config file>, "changes": {key: [base, value]}}
PIPELINE_KINDS = {"versavit": "versavit", "versavit-ablation-tasks": "ablation", "versavit-recipes": "recipes"}

PIPELINE_TAG = "versavit.pipeline"  # "true" on every parent run
KIND_TAG = "versavit.pipeline_kind"
RECIPE_TAG = "versavit.recipe"
TASKS_TAG = "versavit.tasks"
BACKBONE_TAG = "versavit.backbone"
DESCRIPTION_TAG = "mlflow.note.content"
IDENTITY_TAGS = (KIND_TAG, RECIPE_TAG, TASKS_TAG, BACKBONE_TAG)
HIDDEN_PARAMS = ("tracking.uri",)

VIEW_KEY = "versavit-headline"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
WORKFLOW = "machine_learning"  # MLflow 3.x UI: the "Model training" layout of an experiment


def pipeline_kind(pipeline: str | None) -> str:
    """versavit | ablation | recipes from the KFP pipeline's name (or the name itself if unknown)."""
    name = (pipeline or "versavit").strip()
    return PIPELINE_KINDS.get(name, name)


def parent_run_name(cfg: RunConfig, now: float | None = None) -> str:
    """`$VERSAVIT_RUN_NAME`, else `<config name>-<8 hex of the config hash>-<YYYYmmdd-HHMMSS>` (local time):
    unique per second for one config, and readable in the runs table."""
    if given := os.environ.get(RUN_NAME_ENV, "").strip():
        return given
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{cfg.name}-{config_hash(cfg)[:8]}-{stamp}"


def recipe_label(cfg: RunConfig) -> str:
    """The recipe's stages in order, `>`-joined (`warmup>multitask`; `+synergy` where a stage uses it)."""
    return ">".join(s.name + ("+synergy" if s.synergy.enabled else "") for s in cfg.train.stages())


def tasks_label(cfg: RunConfig) -> str:
    """Every task the recipe trains, in first-use order: `caption,depth,refseg`."""
    return ",".join(dict.fromkeys(t for s in cfg.train.stages() for t in s.tasks))


def backbone_label(cfg: RunConfig) -> str:
    """The backbone the run starts from: its checkpoint, or the size of the tower built at random."""
    b = cfg.model.backbone
    return b.pretrained or f"{b.kind} random init {b.embed_dim}d x{b.depth}"


def pipeline_stages(cfg: RunConfig, kind: str) -> list[str]:
    """The stages of a pipeline of `kind` over `cfg`, in the order they run (for the description)."""
    if cfg.data.source == "synthetic":
        data = ["data", "data_check", "label"] if kind == "versavit" else ["data", "label"]
    else:
        data = (["weights"] if cfg.weights.url else []) + (
            ["prepare"] if any(d.input for d in cfg.data.datasets.values()) else []) + [
            f"label_{k}" for k in cfg.label_kinds()]
    names = [s.name for s in cfg.train.stages()]
    if kind == "ablation":
        train = ["warmup", "multitask-{caption, caption-depth, all}"]
    elif kind == "recipes":
        train = [f"{'>'.join(names)} (versavit)", f"{'>'.join(names)} (versavit-synergy)", "sailvit recipe"]
    else:
        train = names
    return ["open-run", *data, *train, "eval", "close-run"]


def config_changes(base: RunConfig | Mapping[str, Any], cfg: RunConfig | Mapping[str, Any]) -> dict[str, list[str]]:
    """Dotted key -> [base value, this value] for every readable param that differs (or exists in one only)."""
    def flat(c: RunConfig | Mapping[str, Any]) -> dict[str, str]:
        return flatten_config(config_to_dict(c) if isinstance(c, RunConfig) else c)

    a, b = flat(base), flat(cfg)
    return {k: [a.get(k, "-"), b.get(k, "-")] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def overrides_env(base_name: str, changes: Mapping[str, Sequence[str]]) -> str:
    """The value of `$VERSAVIT_RUN_OVERRIDES` for `describe`."""
    return json.dumps({"base": base_name, "changes": {k: list(v) for k, v in changes.items()}})


def _overrides_from_env() -> tuple[str, dict[str, list[str]]] | None:
    try:
        data = json.loads(os.environ.get(OVERRIDES_ENV, ""))
        return str(data["base"]), {str(k): [str(x) for x in v] for k, v in data["changes"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def describe(cfg: RunConfig, kind: str, overrides: tuple[str, Mapping[str, Sequence[str]]] | None = None,
             max_changes: int = 60) -> str:
    """The parent run's description (markdown): pipeline, stages, overrides of the base config."""
    overrides = overrides if overrides is not None else _overrides_from_env()
    lines = [f"**{kind}** pipeline on config `{cfg.name}` (hash `{config_hash(cfg)}`)", "",
             "Stages: " + " → ".join(pipeline_stages(cfg, kind)), "",
             f"Recipe `{recipe_label(cfg)}`, tasks `{tasks_label(cfg)}`, backbone `{backbone_label(cfg)}`.", ""]
    if overrides is None:
        lines.append("Overrides: not recorded (the run was not started by `versavit pipeline run`).")
    else:
        base, changes = overrides
        shown = [(k, v) for k, v in changes.items() if k not in HIDDEN_PARAMS]
        if not shown:
            lines.append(f"Overrides: none (the config is `{base}` as written).")
        else:
            lines.append(f"Overrides of `{base}` ({len(shown)}):")
            lines += [f"- `{k}`: {old} → **{new}**" for k, (old, new) in shown[:max_changes]]
            if len(shown) > max_changes:
                lines.append(f"- ... and {len(shown) - max_changes} more (see the params)")
    return _redact("\n".join(lines))


def identity_tags(cfg: RunConfig, pipeline: str | None = None) -> dict[str, str]:
    """Tags of a parent run: kind, recipe, tasks, backbone, and its description."""
    kind = pipeline_kind(pipeline if pipeline is not None else os.environ.get(PIPELINE_ENV))
    return {PIPELINE_TAG: "true", KIND_TAG: kind, RECIPE_TAG: recipe_label(cfg), TASKS_TAG: tasks_label(cfg),
            BACKBONE_TAG: backbone_label(cfg), DESCRIPTION_TAG: describe(cfg, kind)}


def readable_params(cfg: RunConfig) -> dict[str, Any]:
    """The config as the parent's params (nested; `Tracker.log_config` flattens it), without `tracking.uri`."""
    data = config_to_dict(cfg)
    data.get("tracking", {}).pop("uri", None)
    return data


# -------------------------------------------------------------------------------------------------
# the runs table's saved view, and the UI's URLs


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # MLflow UI's canonical column id (makeCanonicalSortKey)


def headline_view(metric_keys: Iterable[str]) -> dict[str, Any]:
    """The shared view of the runs table: the git commit ("Version"), the identity tags, then the headline metrics
    (`eval.report.headline_metrics`: each metric's trained value, `/baseline` and `/delta` side by side, as MLflow
    orders columns by name), each column wide enough for its whole name; newest first; parents collapsed."""
    tags = [_column("tags", t) for t in IDENTITY_TAGS]
    metrics = [_column("metrics", _clean_key(k)) for k in sorted(metric_keys)]
    columns = [_column("attributes", "Version"), *tags, *metrics]
    widths = {c: 8 * len(c.split("`")[1]) + 28 for c in tags + metrics}
    return {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
            "selectedColumns": columns, "columnOrder": columns, "columnWidths": widths, "runsExpanded": {},
            "runsPinned": [], "runsHidden": [], "viewMaximized": False, "runListHidden": False}


def experiment_id(tracking_uri: str, experiment: str) -> str | None:
    """The experiment's id in the store at `tracking_uri`, None if it is not there or the store does not answer. A
    local SQLite store is read directly, read-only (MLflow would first create or migrate its tables)."""
    if tracking_uri.startswith("sqlite:///"):
        try:
            db = f"file:{tracking_uri[len('sqlite:///'):]}?mode=ro"
            with contextlib.closing(sqlite3.connect(db, uri=True)) as con:
                row = con.execute("select experiment_id from experiments where name = ?", (experiment,)).fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]) if row else None
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # noqa: BLE001 - the UI's address without the experiment still opens it
        return None
    return exp.experiment_id if exp else None


def ui_base(tracking_uri: str, local_port: int = 5000) -> str:
    """The UI's address for a tracking URI: the server itself for http(s) (credentials removed), else the
    local `versavit ui` on 127.0.0.1:`local_port`."""
    if tracking_uri.startswith(("http://", "https://")):
        return _redact(tracking_uri).replace("://***@", "://").rstrip("/")
    return f"http://127.0.0.1:{local_port}"


def experiment_url(base: str, experiment_id: str | None, view: bool = True) -> str:
    """The experiment's runs table in the "Model training" layout (with the saved headline view)."""
    if not experiment_id:
        return f"{base}/#/experiments?workflowType={WORKFLOW}"
    query = f"workflowType={WORKFLOW}" + (f"&viewStateShareKey={VIEW_KEY}" if view else "")
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def compare_url(base: str, run_ids: Sequence[str], experiment_ids: Sequence[str]) -> str:
    """MLflow's compare page for `run_ids`."""
    def arr(values: Sequence[str]) -> str:
        return urllib.parse.quote(json.dumps(list(values), separators=(",", ":")), safe="")

    experiments = [str(e) for e in dict.fromkeys(experiment_ids)]  # the UI matches ids as strings
    return f"{base}/#/compare-runs?runs={arr(run_ids)}&experiments={arr(experiments)}&workflowType={WORKFLOW}"
