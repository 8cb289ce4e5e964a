"""`versavit compare RUN ...`: runs side by side, from MLflow (read only).

A run is named by its id (32 hex) or its name (a parent run's `<config>-<hash>-<time>`; an unambiguous prefix
will do) in the config's experiment. What differs is what matters: the params whose values are not the same in
every run, the identity tags (pipeline kind, recipe, tasks, backbone, git commit), and the metrics (a parent run
carries the headline figures: each benchmark's trained, baseline and delta, in % and metres), with the
difference to the first run when there are two. The URL of MLflow's own compare page for the same runs ends it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from versavit.tracking.identity import IDENTITY_TAGS, compare_url, ui_base

_RUN_ID = re.compile(r"[0-9a-f]{32}")
HIDDEN_METRICS = re.compile(r"/seg_iou/\d+$")  # per-class IoU: hundreds of columns, in the eval run's report


class RunNotFound(LookupError):
    """A run reference that names no run, or several."""


@dataclass
class Comparison:
    """What `compare_runs` found: one column per run."""

    names: list[str]
    run_ids: list[str]
    experiment_ids: list[str]
    about: dict[str, list[str]] = field(default_factory=dict)  # status, start, duration, identity tags
    params: dict[str, list[str]] = field(default_factory=dict)  # only those that differ
    same_params: int = 0
    metrics: dict[str, list[float | None]] = field(default_factory=dict)
    url: str = ""


def resolve_run(client: Any, experiment_id: str | None, ref: str) -> Any:
    """The run `ref` names: an id, else a run name (exact, else a unique prefix) in the experiment."""
    if _RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref)
        except Exception as exc:  # noqa: BLE001 - MLflow's RESOURCE_DOES_NOT_EXIST and friends
            raise RunNotFound(f"no run with id {ref}") from exc
    if experiment_id is None:
        raise RunNotFound(f"no run named {ref!r}: the experiment does not exist")
    quoted = ref.replace("'", "\\'")
    for query in (f"attributes.run_name = '{quoted}'", f"attributes.run_name LIKE '{quoted}%'"):
        runs = client.search_runs([experiment_id], filter_string=query, max_results=20,
                                  order_by=["attributes.start_time DESC"])
        if len(runs) == 1:
            return runs[0]
        if len(runs) > 1:
            names = ", ".join(f"{r.info.run_name} ({r.info.run_id[:8]})" for r in runs[:6])
            raise RunNotFound(f"{ref!r} names {len(runs)} runs: {names}; pass a run id or a longer name")
    raise RunNotFound(f"no run named {ref!r} in this experiment")


def _duration(run: Any) -> str:
    if not run.info.end_time or not run.info.start_time:
        return "-"
    s = (run.info.end_time - run.info.start_time) / 1000
    return f"{s:.0f} s" if s < 100 else f"{s / 60:.1f} min"


def compare_runs(tracking_uri: str, experiment: str, refs: list[str], ui_port: int = 5000) -> Comparison:
    """Fetch the runs `refs` name and what differs between them (see the module docstring)."""
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [resolve_run(client, exp.experiment_id if exp else None, ref) for ref in refs]
    out = Comparison([r.info.run_name or r.info.run_id for r in runs], [r.info.run_id for r in runs],
                     [r.info.experiment_id for r in runs])
    out.about["run id"] = [r.info.run_id for r in runs]
    out.about["status"] = [r.info.status for r in runs]
    out.about["started"] = [time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)) for r in runs]
    out.about["duration"] = [_duration(r) for r in runs]
    for tag in (*IDENTITY_TAGS, "versavit.config_hash", "mlflow.source.git.commit"):
        values = [r.data.tags.get(tag, "-") for r in runs]
        if any(v != "-" for v in values):
            out.about[tag.removeprefix("versavit.").removeprefix("mlflow.source.")] = [
                v[:12] if tag.endswith("git.commit") else v for v in values]
    keys = sorted({k for r in runs for k in r.data.params})
    for key in keys:
        values = [r.data.params.get(key, "-") for r in runs]
        if len(set(values)) > 1:
            out.params[key] = values
        else:
            out.same_params += 1
    metric_keys = sorted({k for r in runs for k in r.data.metrics if not HIDDEN_METRICS.search(k)})
    out.metrics = {k: [r.data.metrics.get(k) for r in runs] for k in metric_keys}
    out.url = compare_url(ui_base(tracking_uri, ui_port), out.run_ids, out.experiment_ids)
    return out


def fmt(value: float | None) -> str:
    """A metric for the table (already in display units)."""
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
