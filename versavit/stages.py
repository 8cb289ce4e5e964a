"""The stages of a run as plain functions: `stage_<name>(cfg, ...) -> URL or manifest`.

The same function runs from the CLI, a KFP component (components/), a test, or a PyTorchJob's
entry point. Each opens its own MLflow run nested under the pipeline's parent run (its id comes
as an argument or `$VERSAVIT_PARENT_RUN_ID`) and is idempotent: finished work found at its
output URL with the same settings is reused, so a retried or re-run pipeline does not redo it.
"""

from __future__ import annotations

import json
from typing import Any

from versavit import layout, storage
from versavit.config import RunConfig, config_hash
from versavit.tracking import (
    identity_tags,
    make_tracker,
    parent_run_name,
    readable_params,
    replay_pending,
    run_tags,
    set_run_context,
    stage_run,
)


def open_pipeline_run(cfg: RunConfig, kfp_run_id: str | None = None) -> str:
    """Create the pipeline's MLflow parent run, named `<config>-<hash>-<time>` (or `$VERSAVIT_RUN_NAME`, made
    unique in the experiment), with its description and identity tags (`versavit.tracking.identity`) and the
    config as readable params; returns its id."""
    storage.configure(cfg.storage)
    storage.ensure_bucket(cfg.workdir)
    set_run_context(None, kfp_run_id)
    tracker = make_tracker(cfg)
    name = base = parent_run_name(cfg)
    for n in range(2, 100):  # a --run-name given twice, or two runs of one config in one second
        if tracker.find_run_id({"mlflow.runName": name}) is None:
            break
        name = f"{base}-{n}"
    parent = tracker.start_pipeline_run(name, tags={**run_tags(cfg), "versavit.workdir": cfg.workdir,
                                                    **identity_tags(cfg)})
    tracker.log_config(parent, readable_params(cfg))
    run_id = tracker.run_id(parent) or ""
    tracker.close()
    return run_id


def close_pipeline_run(cfg: RunConfig, parent_run_id: str = "", kfp_run_id: str = "",
                       status: str = "FINISHED") -> None:
    """End the parent run, named by id or found by its KFP run id tag (KFP exit handlers get only that);
    then send what the stages saved in the pending folder while the tracking server was away."""
    tracker = make_tracker(cfg, replay=False)  # replayed once, at the end, with this process's own records
    if not parent_run_id and kfp_run_id:
        parent_run_id = tracker.find_run_id({"versavit.kfp_run_id": kfp_run_id, "versavit.pipeline": "true"}) or ""
    if parent_run_id:
        tracker.end_run(tracker.attach_run(parent_run_id), status)
    tracker.close()
    if tracker.enabled:
        replay_pending(layout.tracking_pending_dir(cfg), tracker.tracking_uri)


def stage_data(cfg: RunConfig, parent_run_id: str | None = None, kfp_run_id: str | None = None) -> str:
    """Render the synthetic world (or reuse it); returns the dataset root URL (train/ and val/ below)."""
    from versavit.data.stage import run_data

    set_run_context(parent_run_id, kfp_run_id)
    with stage_run(cfg, "data") as (tracker, run):
        run_data(cfg, tracker, run)
    return layout.synthetic_root(cfg.workdir)


def stage_data_check(cfg: RunConfig, dataset_url: str, parent_run_id: str | None = None,
                     kfp_run_id: str | None = None) -> str:
    """Read every split back through the training reader; returns the stats JSON (a string)."""
    from versavit.data.shards import read_manifest
    from versavit.data.stage import SPLITS, run_data_check

    set_run_context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    manifests = {s: read_manifest(storage.join(dataset_url, s)) for s in SPLITS}
    with stage_run(cfg, "data_check") as (tracker, run):
        checks = run_data_check(cfg, tracker, run, manifests)
    return json.dumps(checks, default=str)


def label_kinds(cfg: RunConfig) -> list[str]:
    """The label steps of the run (`RunConfig.label_kinds`): for the synthetic world embeddings always (it has
    none), depth and masks only when the config asks to replace its exact ground truth by teacher labels."""
    return cfg.label_kinds()


def stage_label(cfg: RunConfig, dataset_url: str, parent_run_id: str | None = None,
                kfp_run_id: str | None = None) -> str:
    """Run the labelling steps over both splits of the synthetic world at `dataset_url`; returns the labelled
    dataset root URL."""
    from versavit import weights
    from versavit.labeling.jobs import label_dataset
    from versavit.progress import per_name, progress_bar

    set_run_context(parent_run_id, kfp_run_id)
    cfg = weights.resolve(cfg)  # models from their staged copies (weights.url); idempotent
    with stage_run(cfg, "label") as (tracker, run):
        tracker.log_config(run, {"labeling": cfg.labeling.model_dump(mode="json")})
        for kind, steps in dataset_label_chains(cfg, dataset_url).items():
            for name, source, target in steps:
                with progress_bar() as bar:
                    counts = label_dataset(kind, source, target, cfg.labeling, progress=per_name(bar, kind),
                                           tracker=tracker, run=run,
                                           max_corrupt_fraction=cfg.data.max_corrupt_fraction)
                _log_counts(tracker, run, f"label/{name.removeprefix('synthetic-')}_{kind}", counts)
        tracker.set_tags(run, {"versavit.output_url": layout.labelled_root(cfg.workdir)})
    return layout.labelled_root(cfg.workdir)


def dataset_label_chains(cfg: RunConfig, synthetic_url: str | None = None) -> dict[str, list[tuple[str, str, str]]]:
    """kind -> [(dataset, input URL, output URL)], kinds in the order they run: each reads what the previous one
    wrote, the last writes the labelled dataset. data.source shards: every `data.datasets` entry with labels
    (first input: its prepared shards; last output: its `labelled`); synthetic: both splits of the world
    (`synthetic_url`, default the run's) through `label_kinds(cfg)` into the run's labelled root."""
    from versavit.config.schema import LABEL_KINDS

    if cfg.data.source == "synthetic":
        root = synthetic_url or layout.synthetic_root(cfg.workdir)
        kinds = label_kinds(cfg)
        entries = [(f"synthetic-{split}", storage.join(root, split), kinds,
                    storage.join(layout.labelled_root(cfg.workdir), split),
                    lambda kind, split=split: layout.label_step_url(cfg.workdir, kind, split))
                   for split in ("train", "val")]
    else:
        entries = [(name, spec.url, spec.labels, str(spec.labelled),
                    lambda kind, name=name: layout.dataset_label_step_url(cfg.workdir, name, kind))
                   for name, spec in cfg.data.datasets.items() if spec.labels]
    chains: dict[str, list[tuple[str, str, str]]] = {k: [] for k in LABEL_KINDS}
    for name, source, kinds, labelled, step_url in entries:
        for i, kind in enumerate(kinds):
            target = labelled if i == len(kinds) - 1 else step_url(kind)
            chains[kind].append((name, source, target))
            source = target
    return {k: v for k, v in chains.items() if v}


def _log_counts(tracker: Any, run: Any, prefix: str, counts: dict[str, Any]) -> None:
    tracker.log_metrics(run, {f"{prefix}_{k}": v for k, v in counts.items()
                              if isinstance(v, int | float) and not isinstance(v, bool)}, step=0)


def stage_prepare(cfg: RunConfig, shard_index: int = 0, num_shards: int = 1, parent_run_id: str | None = None,
                  kfp_run_id: str | None = None) -> str:
    """Worker `shard_index` of `num_shards` of `versavit data prepare` over every `data.datasets` entry with a raw
    input (each split into <url>/<split> when it names splits); returns the summaries as JSON. Shards done with
    the same settings are skipped, so a rerun of a finished step costs a listing."""
    from versavit.data.prepare.runner import prepare_dataset
    from versavit.progress import per_name, progress_bar

    set_run_context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    summaries: dict[str, Any] = {}
    tags = {"versavit.shard_index": str(shard_index), "versavit.num_shards": str(num_shards)}
    with stage_run(cfg, "prepare", tags=tags) as (tracker, run):
        for name, spec in cfg.data.datasets.items():
            if not spec.input:
                continue
            for split in spec.splits or [None]:
                out = storage.join(spec.url, split) if spec.splits else spec.url
                with progress_bar() as bar:
                    summary = prepare_dataset(spec.source, spec.input, out, split, shard_index, num_shards,
                                              progress=per_name(bar, f"prepare {name}"),
                                              max_corrupt_fraction=cfg.data.max_corrupt_fraction)
                key = f"{name}/{split}" if split else name
                summaries[key] = summary
                _log_counts(tracker, run, f"prepare/{key.replace('/', '_')}", summary.get("counts", {}))
    return json.dumps(summaries, default=str)


def stage_label_datasets(cfg: RunConfig, kind: str, shard_index: int = 0, num_shards: int = 1,
                         parent_run_id: str | None = None, kfp_run_id: str | None = None) -> str:
    """Worker `shard_index` of `num_shards` of label step `kind` on every `data.datasets` entry that lists it
    (`dataset_label_chains`); the worker finishing a dataset's last shard writes its manifest. Returns the
    summaries as JSON."""
    from versavit import weights
    from versavit.labeling.jobs import label_dataset
    from versavit.progress import per_name, progress_bar

    set_run_context(parent_run_id, kfp_run_id)
    cfg = weights.resolve(cfg)  # models from their staged copies (weights.url); idempotent
    storage.configure(cfg.storage)
    summaries: dict[str, Any] = {}
    tags = {"versavit.shard_index": str(shard_index), "versavit.num_shards": str(num_shards)}
    with stage_run(cfg, f"label_{kind}", tags=tags) as (tracker, run):
        for name, source, target in dataset_label_chains(cfg).get(kind, []):
            with progress_bar() as bar:
                summary = label_dataset(kind, source, target, cfg.labeling, shard_index, num_shards,
                                        progress=per_name(bar, f"{kind} {name}"), tracker=tracker, run=run,
                                        max_corrupt_fraction=cfg.data.max_corrupt_fraction)
            summaries[name] = summary
            _log_counts(tracker, run, f"label/{name}_{kind}", summary.get("counts", {}))
    return json.dumps(summaries, default=str)


def label_shards(cfg: RunConfig, kind: str, input_url: str, output_url: str, shard_index: int = 0,
                 num_shards: int = 1) -> dict[str, Any]:
    """One worker's slice of a labelling job (`versavit label <kind>`), as a tracked stage run; returns
    the job's summary. The worker that finishes the last shard writes the output manifest."""
    from versavit import weights
    from versavit.data.shards import read_manifest
    from versavit.labeling.jobs import label_dataset
    from versavit.progress import progress_bar

    cfg = weights.resolve(cfg)  # models from their staged copies (weights.url); idempotent

    tags = {"versavit.shard_index": str(shard_index), "versavit.num_shards": str(num_shards),
            "versavit.label.input": input_url, "versavit.label.output": output_url}
    with stage_run(cfg, f"label_{kind}", tags=tags) as (tracker, run), progress_bar() as bar:
        task = bar.add_task(f"label {kind}", total=None)

        def report(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = label_dataset(kind, input_url, output_url, cfg.labeling, shard_index, num_shards,
                                progress=report, tracker=tracker, run=run,
                                max_corrupt_fraction=cfg.data.max_corrupt_fraction)
        if summary["manifest"]:  # lineage: the finished dataset
            out = read_manifest(output_url)
            tracker.log_dataset(run, out.name, output_url, out.digest, context="labelled",
                                num_samples=out.num_samples)
    return summary


def stage_train(cfg: RunConfig, stage: str, variant: str = "", parent_run_id: str | None = None,
                kfp_run_id: str | None = None) -> str:
    """Train recipe stage `stage` (e.g. warmup | multitask, or a `train.recipe` stage) where launch.backend
    says; returns the URL of its stage.json.

    A finished stage with the same config is reused; an interrupted one resumes from its checkpoint.
    """
    from versavit import weights
    from versavit.data.inputs import missing_stage_inputs
    from versavit.launch import get_launcher

    cfg.train.stage(stage)  # an unknown name fails here, before anything is launched
    set_run_context(parent_run_id, kfp_run_id)
    cfg = weights.resolve(cfg)  # as the ranks resolve it (train.entry): the same config hash
    storage.configure(cfg.storage)
    manifest_url = layout.stage_manifest_url(cfg, stage, variant)
    if storage.exists(manifest_url):
        done = json.loads(storage.read_text(manifest_url))
        if done.get("config_hash") == config_hash(cfg):
            return manifest_url
    if missing := missing_stage_inputs(cfg, stage):  # before any job or process starts
        raise storage.StorageError(f"{layout.run_name(stage, variant)}: {missing[0]}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), kind="missing")
    # GPU runs: the capacity plan (memory per micro-step, time, storage) to MLflow as run plan_<stage>. It traces the
    # model with transformers, which the driver image of cluster backends leaves out: imported only where present
    plan = _optional_module("versavit.train.plan")
    if plan is not None and plan.should_plan(cfg):
        plan.log_plan(cfg, stage, variant)
    get_launcher(cfg).launch(cfg, stage, variant=variant)  # local torchrun, PyTorchJob or TrainJob
    return manifest_url


def _optional_module(name: str) -> Any:
    """`name` imported, or None where its dependencies are not installed (an optional step, never a failure)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def stage_eval(cfg: RunConfig, exports: dict[str, str], parent_run_id: str | None = None,
               kfp_run_id: str | None = None) -> str:
    """Evaluate the named backbone exports against the baseline; returns the report folder URL."""
    from versavit.eval import run_eval

    set_run_context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    result: dict[str, Any] = run_eval(cfg, exports=exports)
    _publish_evaluation(cfg, result, exports)
    return str(result.get("report_dir", ""))


def _publish_evaluation(cfg: RunConfig, result: dict[str, Any], exports: dict[str, str]) -> None:
    """The headline figures onto the parent run, and each trained export's onto the model versions of the run
    that trained it (its stage.json beside export/ names that run)."""
    from versavit.eval.report import backbone_figures, headline_metrics
    from versavit.tracking import publish_evaluation

    table = result.get("table", {})
    trained = {}
    for variant, url in exports.items():
        name, export = variant or "trained", url.rstrip("/")
        try:
            done = json.loads(storage.read_text(storage.join(export.removesuffix("/export"), "stage.json")))
        except (storage.StorageError, ValueError):
            continue
        if export.endswith("/export") and done.get("mlflow_run_id"):
            trained[name] = (done["mlflow_run_id"], backbone_figures(table, name))
    publish_evaluation(cfg, headline_metrics(table), result.get("mlflow_run_id"), trained)


def _exports_of(cfg: RunConfig, manifests: list[str]) -> dict[str, str]:
    """variant -> export URL of the training stages whose stage.json URLs are given."""
    storage.configure(cfg.storage)
    exports = {}
    for url in manifests:
        stage = json.loads(storage.read_text(url))
        exports[stage["variant"]] = stage["export_url"]
    return exports


def stage_eval_manifests(cfg: RunConfig, manifests: list[str], parent_run_id: str | None = None,
                         kfp_run_id: str | None = None) -> str:
    """`stage_eval` (every evaluator in this process) on the exports named by stage.json URLs."""
    return stage_eval(cfg, _exports_of(cfg, manifests), parent_run_id, kfp_run_id)


def stage_evaluator(cfg: RunConfig, manifests: list[str], evaluator: str, parent_run_id: str | None = None,
                    kfp_run_id: str | None = None) -> str:
    """One evaluator of the pipeline's fan-out on the baseline and the exports named by stage.json URLs; returns
    its results URL. An inference evaluator runs here; a training one (fine-tunes) runs as a job of its own through
    the launcher of `launch.backend` (torchrun here, a PyTorchJob / TrainJob on a cluster; one process on
    `eval.gpus` GPUs: versavit.eval.jobs)."""
    from versavit.config.schema import TRAINING_EVALUATORS
    from versavit.eval.jobs import job_config, prepare_job, results_url

    set_run_context(parent_run_id, kfp_run_id)
    exports = _exports_of(cfg, manifests)
    if evaluator not in TRAINING_EVALUATORS:
        from versavit.eval.run import evaluate_one

        return evaluate_one(cfg, exports, evaluator)
    from versavit.launch import get_launcher

    job_cfg = job_config(cfg, evaluator)
    get_launcher(job_cfg).launch(job_cfg, prepare_job(job_cfg, exports, evaluator))
    return results_url(cfg, evaluator)


def stage_eval_report(cfg: RunConfig, manifests: list[str], parent_run_id: str | None = None,
                      kfp_run_id: str | None = None) -> str:
    """The report step of the fan-out: every evaluator's results (eval.evaluators) in one comparison, tracked as
    the `eval` stage run; the headline figures onto the parent run and the model versions. Returns the report
    folder."""
    from versavit.eval.jobs import results_url
    from versavit.eval.run import report_from_results

    set_run_context(parent_run_id, kfp_run_id)
    exports = _exports_of(cfg, manifests)
    result = report_from_results(cfg, exports, [results_url(cfg, name) for name in cfg.eval.evaluators])
    _publish_evaluation(cfg, result, exports)
    return str(result.get("report_dir", ""))


def stage_weights(cfg: RunConfig, parent_run_id: str | None = None, kfp_run_id: str | None = None) -> str:
    """Stage every checkpoint the run loads to `weights.url` once (`versavit.weights.stage_weights`: copies that
    are complete with the same source and revision are skipped); logs each model's revision and staged URL
    (params) and size (metric, bytes). Returns `weights.url` ("" when unset: models load as configured)."""
    from versavit import weights
    from versavit.progress import per_name, progress_bar

    set_run_context(parent_run_id, kfp_run_id)
    storage.configure(cfg.storage)
    if not cfg.weights.url:
        return ""
    with stage_run(cfg, "weights", tags={"versavit.weights.url": cfg.weights.url}) as (tracker, run):
        with progress_bar() as bar:
            rows = weights.stage_weights(cfg, progress=per_name(bar, "stage"))
        tracker.log_config(run, {"weights": {row["ref"]: {"revision": row["revision"], "url": row["url"],
                                                          "fields": ",".join(row["fields"])} for row in rows}})
        metrics: dict[str, float] = {}
        for row in rows:
            key = row["ref"].strip("/").replace("/", "_")
            metrics[f"weights/{key}_bytes"] = row["bytes"]
            metrics[f"weights/{key}_files"] = row["files"]
            metrics[f"weights/{key}_copied"] = float(row["status"] == "copied")
        metrics["weights/total_bytes"] = sum(r["bytes"] for r in rows)
        metrics["weights/copied"] = sum(r["status"] == "copied" for r in rows)
        tracker.log_metrics(run, metrics, step=0)
    return cfg.weights.url
