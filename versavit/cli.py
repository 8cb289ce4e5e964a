"""`versavit ...`: one subcommand per stage, plus config and pipeline commands.

Expected failures (a bad config or usage, storage, corrupt data, an unwritable output) print one
line (`error: ...`; a bad config adds one line per problem) and exit non-zero without a traceback:
2 for a bad config or usage, 1 for a failed stage or an unwritable output.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import typer
from rich.logging import RichHandler
from rich.markup import escape

from versavit import layout, storage
from versavit.config import ConfigError, RunConfig, dump_yaml, load_config
from versavit.progress import console, per_name, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="VersaViT: multi-task post-training of an MLLM's vision encoder, end to end.")
config_app = typer.Typer(no_args_is_help=True, help="Check and print run configurations.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect task shards.")
pipeline_app = typer.Typer(no_args_is_help=True, help="Run the whole workflow.")
train_app = typer.Typer(no_args_is_help=True, help="Training stages (launched with torchrun / on the cluster).")
tracking_app = typer.Typer(no_args_is_help=True, help="MLflow tracking: send what was saved while the server was away.")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(train_app, name="train")
app.add_typer(tracking_app, name="tracking")

DEFAULT_CONFIG = "configs/tiny.yaml"

ConfigOpt = typer.Option(None, "--config", "-c", help=f"run config YAML (default: {DEFAULT_CONFIG} if present)")
PIPELINE_HELP = "versavit | ablation (Table 4) | recipes (VersaViT vs. + synergy vs. SAILViT-style)"
OverridesArg = typer.Argument(None, help="dotted overrides, e.g. train.multitask.max_steps=50",
                              show_default=False)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"versavit {version('versavit')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _error(message: str) -> None:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False)


def _fail(message: str) -> None:
    """Stop a command with one line and exit status 1."""
    _error(message)
    raise typer.Exit(1)


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    path = config if config is not None else (Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else None)
    cfg = load_config(path, overrides or [])
    storage.configure(cfg.storage)
    return cfg


@config_app.command("validate")
def config_validate(config: Path = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Validate a config (and overrides); exit 2 with the offending dotted path if it is wrong."""
    cfg = _load(config, overrides)
    console.print(f"[green]ok[/green]: {config or 'defaults'} is a valid run config ({cfg.name})")


@config_app.command("show")
def config_show(config: Path = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    cfg = _load(config, overrides)
    typer.echo(dump_yaml(cfg), nl=False)


@data_app.command("synth")
def data_synth(
    out: str | None = typer.Option(None, "--out", help="dataset URL: a folder or s3://bucket/prefix (default: the "
                                   "run's <workdir>/data/synthetic, where training reads it)"),
    num_samples: int | None = typer.Option(None, "--num-samples", "-n", min=1,
                                           help="training samples (default: data.synthetic.num_train)"),
    num_val: int | None = typer.Option(None, "--num-val", min=1,
                                       help="val samples (default: n/8 with -n, else data.synthetic.num_val)"),
    seed: int | None = typer.Option(None, "--seed", help="default: data.synthetic.seed"),
    image_size: int | None = typer.Option(None, "--image-size", min=32, help="default: data.synthetic.image_size"),
    samples_per_shard: int | None = typer.Option(None, "--samples-per-shard", min=1,
                                                 help="default: data.synthetic.samples_per_shard"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0),
    config: Path | None = ConfigOpt,
    overrides: list[str] = OverridesArg,
) -> None:
    """Render the synthetic world of the config (data.synthetic, after overrides; options win) into train/val
    webdataset shards at --out."""
    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic

    cfg = _load(config, overrides)
    given = {"num_train": num_samples, "seed": seed, "image_size": image_size,
             "samples_per_shard": samples_per_shard,
             "num_val": num_val or (max(1, num_samples // 8) if num_samples else None)}
    syn = SyntheticConfig(**{**cfg.data.synthetic.model_dump(), **{k: v for k, v in given.items() if v is not None}})
    out = out or layout.synthetic_root(cfg.workdir)
    storage.ensure_bucket(out)  # an unwritable --out fails here, before the progress bar draws anything
    with progress_bar() as bar:
        manifests = build_synthetic(out, syn, workers=workers, progress=per_name(bar, "render"))
    for split, m in manifests.items():
        console.print(f"{split}: {m.num_samples} samples in {len(m.shards)} shard(s) at {m.url} "
                      f"(digest {m.digest[:12]})")


def _source_names(text: str | None) -> list[str]:
    """`a,b` -> ["a", "b"]; every name must be a `data prepare` source (exit 2 with the closest names)."""
    from versavit.data.prepare.runner import get_source

    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    for name in names:
        get_source(name)
    return names


def _prepare_datasets(cfg: RunConfig, shard_index: int, num_shards: int) -> None:
    """`data prepare` without SOURCE: the pipeline's prepare step, this worker's slice of every dataset."""
    from versavit.stages import stage_prepare

    if shard_index >= num_shards:
        raise ConfigError(f"--shard-index {shard_index} must be < --num-shards {num_shards}")
    if not any(d.input for d in cfg.data.datasets.values()):
        raise ConfigError("this config's data.datasets has no entry with an `input` to prepare; pass SOURCE "
                          "--input RAW --output URL")
    for name, summary in json.loads(stage_prepare(cfg, shard_index, num_shards)).items():
        state = (f"{summary['manifest']} ({summary['num_samples']} samples)" if summary["manifest"]
                 else f"not yet: {len(summary['shards_missing'])} shard(s) of other workers missing")
        console.print(f"{name}: {len(summary['shards_processed'])} shard(s) written, "
                      f"{summary['shards_already_done']} already done; {state}", highlight=False, markup=False)


@data_app.command("sources")
def data_sources(kind: str | None = typer.Option(None, "--kind", help="training or benchmark (default: both)")
                 ) -> None:
    """What each `data prepare` source reads: the dataset, what to download, the layout expected, its size."""
    from versavit.data.prepare import SOURCES

    for src in SOURCES.values():
        if kind in (None, src.kind):
            console.print(f"[bold]{src.name}[/bold] ({src.kind}; tasks {', '.join(src.tasks)}; splits "
                          f"{', '.join(src.splits)})", highlight=False)
            console.print(f"  {escape(src.about)}\n", highlight=False, soft_wrap=False)


@data_app.command("prepare")
def data_prepare(
    source: str | None = typer.Argument(None, help="the source: a training set (objects365, grit, sa1b, refcoco, "
                                        "refcoco+, refcocog, pixmo-cap, idl-wds, finevision, sa1b-internvl, images) or "
                                        "a benchmark (ade20k, voc2012, cityscapes, nyuv2, kitti); `versavit data "
                                        "sources` describes each. Omitted: every data.datasets entry of the config "
                                        "with an input", show_default=False),
    input_url: str | None = typer.Option(None, "--input", "-i", help="the source's published layout: a folder or "
                                         "URL"),
    output_url: str | None = typer.Option(None, "--output", "-o", help="dataset URL for the shards (with several "
                                          "--split: <output>/<split> each)"),
    split: str | None = typer.Option(None, "--split", help="split(s), comma-separated (default: the source's first)"),
    shard_index: int = typer.Option(0, "--shard-index", min=0, envvar="JOB_COMPLETION_INDEX",
                                    help="this worker's index: it takes output shards i, i+n, i+2n, ... "
                                    "(a Kubernetes Indexed Job sets it)"),
    num_shards: int = typer.Option(1, "--num-shards", min=1, help="number of workers sharing the job"),
    units_per_shard: int | None = typer.Option(None, "--units-per-shard", min=1,
                                               help="input units per output shard (default: the source's)"),
    relist: bool = typer.Option(False, "--relist", help="list the input again even when the output is complete "
                                "(redoes only shards whose input changed)"),
    config: Path | None = ConfigOpt,
    overrides: list[str] = OverridesArg,
) -> None:
    """Convert a published dataset into versavit shards + manifest.json; sharded across workers and resumable
    (done records per shard; a finished dataset with the same settings is a no-op)."""
    from rich.table import Table

    from versavit.data.prepare.runner import get_source, prepare_splits

    if source is not None and "=" in source:  # `data prepare key=value ...`: overrides, no SOURCE
        overrides, source = [source, *(overrides or [])], None
    if source is None:
        if input_url or output_url or split:
            raise ConfigError("--input/--output/--split need a SOURCE; without one, every data.datasets entry of "
                              "the config is prepared")
        _prepare_datasets(_load(config, overrides), shard_index, num_shards)
        return
    if not (input_url and output_url):
        raise ConfigError(f"data prepare {source} needs --input (the published layout) and --output (a URL)")
    src = get_source(source)  # an unknown name is a usage error before anything loads
    splits = [s.strip() for s in (split or "").split(",") if s.strip()] or None
    cfg = _load(config, overrides)
    if shard_index >= num_shards:
        raise ConfigError(f"--shard-index {shard_index} must be < --num-shards {num_shards}")
    with progress_bar() as bar:
        summaries = prepare_splits(src.name, input_url, output_url, splits, shard_index=shard_index,
                                   num_shards=num_shards, progress=per_name(bar, "prepare"),
                                   max_corrupt_fraction=cfg.data.max_corrupt_fraction,
                                   units_per_shard=units_per_shard, relist=relist)
    for name, summary in summaries.items():
        table = Table(title=f"prepare {src.name} {name}: worker {shard_index}/{num_shards}", show_header=False)
        table.add_row("output", summary["output"])
        for key in ("shards_total", "shards_mine", "shards_already_done"):
            table.add_row(key, str(summary[key]))
        table.add_row("shards_processed", str(len(summary["shards_processed"])))
        table.add_row("samples written", str(summary["samples"]))
        for key, value in summary["counts"].items():
            if key != "samples":
                table.add_row(key, str(value))
        if summary["noop"]:
            table.add_row("manifest", f"{summary['manifest']} (already complete: {summary['num_samples']} samples)")
        else:
            table.add_row("manifest", f"{summary['manifest']} ({summary['num_samples']} samples)" if summary["manifest"]
                          else f"not yet ({len(summary['shards_missing'])} shard(s) missing)")
        console.print(table)


@data_app.command("fixtures")
def data_fixtures(
    out: Path = typer.Option(Path("runs/fixtures"), "--out", help="folder: one <source>/ stand-in per source "
                             "(configs/rehearsal.yaml reads runs/fixtures)"),
    only: str | None = typer.Option(None, "--only", help="comma-separated sources (default: all)"),
    seed: int = typer.Option(0, "--seed", help="synthetic world seed"),
    weights: bool = typer.Option(True, "--weights/--no-weights", help="also write tiny random teachers (depth, "
                                 "SAM, a Qwen2-VL describer, a text embedder) to <out>/weights/"),
) -> None:
    """Write tiny stand-ins of every `data prepare` source in its published on-disk layout, rendered from the
    synthetic world (exact labels), for tests and rehearsals: `data prepare NAME --input DIR/NAME`."""
    from rich.table import Table

    from versavit.data.prepare import SOURCES

    names = _source_names(only) or list(SOURCES)
    if weights:
        from versavit.labeling.tiny import save_tiny_teachers

        for name, path in save_tiny_teachers(out / "weights", seed).items():
            console.print(f"teacher {name}: {path}", highlight=False)
    table = Table(title=f"fixtures in {out}")
    for column in ("source", "files", "bytes"):
        table.add_column(column, justify="left" if column == "source" else "right")
    with progress_bar() as bar:
        task = bar.add_task("fixtures", total=len(names))
        for name in names:
            folder = out / name
            folder.mkdir(parents=True, exist_ok=True)
            SOURCES[name].write_fixture(folder, seed)
            files = [p for p in folder.rglob("*") if p.is_file()]
            table.add_row(name, str(len(files)), str(sum(p.stat().st_size for p in files)))
            bar.advance(task)
    console.print(table)


@data_app.command("check")
def data_check(
    url: str = typer.Argument(..., help="dataset URL (a folder or s3://bucket/prefix with manifest.json)"),
    sample_fraction: float = typer.Option(1.0, "--sample-fraction", min=0.0, max=1.0,
                                          help="fraction of shards to hash and read (all: 1.0; 0: check the "
                                               "shards' presence and sizes only)"),
    tasks: list[str] = typer.Option(None, "--task", show_default=False,
                                    help="a task whose needs each sample must meet: caption, depth or refseg "
                                         "(repeatable; default: the tasks the samples carry data for)"),
) -> None:
    """Check a dataset against its manifest: missing shards, sha256 mismatches, lost samples per shard, and
    per task the samples it cannot use (a member it reads missing or undecodable)."""
    from versavit.data.check import TASKS, check_dataset

    if unknown := [t for t in tasks or [] if t not in TASKS]:
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))} is not a task: choose from {', '.join(TASKS)}",
                                 param_hint="'--task'")
    report = check_dataset(url, sample_fraction, tasks or None)
    for line in report.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command("ui")
def ui(config: Path = ConfigOpt, port: int = typer.Option(5000, "--port", min=1, max=65535),
       overrides: list[str] = OverridesArg) -> None:
    """Open the MLflow UI of the run's tracking store (bound to 127.0.0.1) and print the URL of its experiment in
    the "Model training" view with the saved headline columns. With an http(s) tracking.uri the server is the UI:
    only its URL is printed."""
    import subprocess

    from versavit.tracking import tracking_uri
    from versavit.tracking.identity import experiment_id, experiment_url, ui_base

    cfg = _load(config, overrides)
    root = layout.local_root(cfg)
    # tracking_uri() creates the store's folder: a store that is not there yet is only named, not made
    uri = tracking_uri(cfg) if cfg.tracking.uri or root.is_dir() else f"sqlite:///{root.resolve() / 'mlflow.db'}"
    if uri.startswith(("http://", "https://")):
        url = experiment_url(ui_base(uri), experiment_id(uri, cfg.tracking.experiment))
        console.print(f"MLflow UI of the tracking server: {url}", highlight=False, soft_wrap=True)
        return
    db = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(db).is_file():  # mlflow would create an empty store
        _fail(f"no MLflow store at {db}: run a pipeline first, or pass tracking.uri=...")
    with socket.socket() as sock:  # mlflow only logs a busy port, and exits 0
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            _fail(f"port {port} on 127.0.0.1 is in use: pass --port N")
    url = experiment_url(ui_base(uri, port), experiment_id(uri, cfg.tracking.experiment))
    console.print(f"MLflow UI for {uri} at {url} (Ctrl-C to stop)", highlight=False, soft_wrap=True)
    # no GenAI job runner: it triples the UI's start-up (46 s against 17 s measured) and the runs table needs none
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    code = subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                            "--host", "127.0.0.1", "--port", str(port)], env=env)
    raise typer.Exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell says


@app.command("compare")
def compare(
    refs: list[str] = typer.Argument(..., metavar="RUN... [KEY=VALUE...]", help="two or more runs: ids, or names "
                                     "in the config's experiment (a unique prefix will do); KEY=VALUE arguments are "
                                     "config overrides (e.g. workdir=...)", show_default=False),
    config: Path = ConfigOpt,
    port: int = typer.Option(5000, "--port", min=1, max=65535, help="the port `versavit ui` serves a local store "
                             "on (for the compare page's URL)"),
) -> None:
    """Runs side by side: the params that differ, identity tags and the metrics (a pipeline run's headline
    figures: each benchmark's trained, baseline and delta, in % and metres), and MLflow's compare page URL."""
    from rich.table import Table

    from versavit.tracking.compare import RunNotFound, compare_runs, fmt

    names = [r for r in refs if "=" not in r]
    cfg = _load(config, [r for r in refs if "=" in r])
    if len(names) < 2:
        raise ConfigError("versavit compare needs two or more runs (ids or names)")
    uri = cfg.tracking.uri or f"sqlite:///{layout.local_root(cfg).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        _fail(f"no MLflow store at {uri.removeprefix('sqlite:///')}: pass the run's workdir=... or tracking.uri=...")
    try:
        cmp = compare_runs(uri, cfg.tracking.experiment, names, ui_port=port)
    except RunNotFound as exc:
        _fail(str(exc))

    def table(title: str, rows: dict, numeric: bool = False, delta: bool = False) -> Table:
        t = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
        t.add_column("", overflow="fold")
        for name in cmp.names:
            t.add_column(escape(name), overflow="fold", justify="right" if numeric else "left")
        if delta:
            t.add_column("Δ (2nd − 1st)", justify="right")
        for key, values in rows.items():
            cells = [fmt(v) if not isinstance(v, str) else v for v in values]
            if delta:
                a, b = values
                cells.append(fmt(b - a) if a is not None and b is not None else "-")
            t.add_row(escape(key), *(escape(c) for c in cells))
        return t

    console.print(table("runs", cmp.about))
    if cmp.params:
        console.print(table(f"params that differ ({len(cmp.params)}; {cmp.same_params} the same)", cmp.params))
    else:
        console.print(f"params: all {cmp.same_params} the same", highlight=False)
    if cmp.metrics:
        console.print(table("metrics (mIoU, pixel acc., cIoU, AbsRel, δ1 in %; RMSE in metres)", cmp.metrics,
                            numeric=True, delta=len(cmp.names) == 2))
    console.print(f"MLflow compare page: {cmp.url}", highlight=False, soft_wrap=True)


@tracking_app.command("replay")
def tracking_replay(
    directory: str | None = typer.Argument(None, metavar="DIR", show_default=False,
                                           help="folder of pending-*.jsonl files (default: the run's mlflow-pending/)"),
    config: Path = ConfigOpt,
    uri: str | None = typer.Option(None, "--uri", help="send to this tracking URI instead of the one each file "
                                   "recorded"),
    overrides: list[str] = OverridesArg,
) -> None:
    """Send the tracking records saved while MLflow was away, each once; exit 1 if it still is (they stay)."""
    from versavit.tracking.replay import pending_files, replay_dir

    if directory is not None and "=" in directory and not Path(directory).exists():
        overrides, directory = [directory, *(overrides or [])], None  # `replay key=value`: an override, not DIR
    cfg = _load(config, overrides)
    folder = Path(directory) if directory is not None else layout.tracking_pending_dir(cfg)
    if directory is not None and not folder.is_dir():
        _fail(f"no such folder: {folder}")
    # the config's store (credentials included) when a file recorded the same one; never created here
    fallback = cfg.tracking.uri or f"sqlite:///{layout.local_root(cfg).resolve() / 'mlflow.db'}"
    if not pending_files(folder):
        console.print(f"nothing to replay: no pending tracking records in {folder}", highlight=False, markup=False)
        return
    reports = replay_dir(folder, uri=uri, fallback_uri=fallback)
    for report in reports:
        if not report.error:
            console.print(report.line(), highlight=False, markup=False)
    if failed := [r for r in reports if r.error]:
        sent = sum(r.sent_total for r in reports)
        _fail(f"{failed[0].error}; {sum(r.left for r in failed)} record(s) in {len(failed)} file(s) kept in "
              f"{folder}{f' ({sent} sent before)' if sent else ''}: run `versavit tracking replay` again later")


def _dry_run(cfg: RunConfig, stage: str) -> None:
    """Print the PyTorchJob / TrainJob a cluster launch of `stage` would create, as YAML (nothing is created)."""
    import yaml

    from versavit.launch.base import make_job_name

    if cfg.launch.backend == "local":
        raise ConfigError("--dry-run prints the cluster job: set launch.backend=pytorchjob or trainjob")
    name = make_job_name(cfg, stage)
    config_ref = layout.launch_config_url(cfg, stage, name)
    if cfg.launch.backend == "pytorchjob":
        from versavit.launch.pytorchjob import build_pytorchjob

        job = build_pytorchjob(cfg, stage, config_ref, name)
    else:
        from versavit.launch.trainjob import build_trainjob

        job = build_trainjob(cfg, stage, config_ref, name)
    typer.echo(f"# {cfg.launch.backend} for stage {stage!r}; its pods read the config at {config_ref}, which a "
               "real launch writes first")
    typer.echo(yaml.safe_dump(job, sort_keys=False), nl=False)


def _train(stage: str, config: Path | None, overrides: list[str] | None, dry_run: bool = False) -> None:
    from versavit.data.inputs import missing_stage_inputs
    from versavit.launch import launch_local

    cfg = _load(config, overrides)
    if dry_run:
        _dry_run(cfg, stage)
        return
    if cfg.launch.backend != "local":
        raise ConfigError(f"launch.backend={cfg.launch.backend!r} runs through the pipeline's cluster path; "
                          "use launch.backend=local to train on this machine")
    if missing := missing_stage_inputs(cfg, stage, f"--config {config}" if config else ""):
        _fail(f"{stage}: {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    result = launch_local(cfg, stage)
    console.print(f"{stage}: {result['steps']} steps done; export at {result['export_url']}")


DryRunOpt = typer.Option(False, "--dry-run", help="print the PyTorchJob / TrainJob (launch.backend) this stage "
                         "would create, as YAML, and exit: for review or `kubectl apply --dry-run=server -f -`")


@train_app.command("warmup")
def train_warmup(config: Path = ConfigOpt, overrides: list[str] = OverridesArg, dry_run: bool = DryRunOpt) -> None:
    """Caption warm-up: the projector alone learns to feed the frozen ViT's features to the LLM."""
    _train("warmup", config, overrides, dry_run)


@train_app.command("multitask")
def train_multitask(config: Path = ConfigOpt, overrides: list[str] = OverridesArg, dry_run: bool = DryRunOpt) -> None:
    """Multi-task training: ViT + caption/VQA, depth and referring-segmentation heads (DeepSpeed ZeRO-2)."""
    _train("multitask", config, overrides, dry_run)


@train_app.command("stage")
def train_stage(name: str = typer.Argument(..., help="a stage of the config's recipe (train.recipe)"),
                config: Path = ConfigOpt, overrides: list[str] = OverridesArg, dry_run: bool = DryRunOpt) -> None:
    """Any stage of the config's recipe by name, e.g. `train stage coarse --config configs/recipes/sailvit.yaml`."""
    cfg = _load(config, overrides)
    try:
        cfg.train.stage(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _train(name, config, overrides, dry_run)


@pipeline_app.command("run")
def pipeline_run(
    local: bool = typer.Option(False, "--local", help="run on this machine with KFP's local runner"),
    pipeline: str = typer.Option("versavit", "--pipeline", "-p", help=PIPELINE_HELP),
    run_name: str | None = typer.Option(None, "--run-name", help="name of the MLflow parent run (default: "
                                        "<config name>-<config hash>-<time>)"),
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
) -> None:
    """Run the whole workflow: data, labels, warm-up, multi-task training, evaluation (one MLflow parent run)."""
    from versavit.kfp.local import run_local

    cfg = _load(config, overrides)
    if not local:
        raise ConfigError("`pipeline run` runs locally (--local); on a cluster use `versavit pipeline submit`")
    if cfg.launch.backend != "local":
        cfg = cfg.model_copy(update={"launch": cfg.launch.model_copy(update={"backend": "local"})})
    run_local(cfg, pipeline, console=console, run_name=run_name, base=_base_config(config))


def _base_config(config: Path | None) -> tuple[str, RunConfig]:
    """(name, config) of the config file as written, without overrides: what a run's description diffs against."""
    path = config if config is not None else (Path(DEFAULT_CONFIG) if Path(DEFAULT_CONFIG).is_file() else None)
    return (str(path) if path else "the defaults"), load_config(path, [])


@pipeline_app.command("compile")
def pipeline_compile(
    output: Path = typer.Option(Path("pipeline.yaml"), "--output", "-o", help="KFP IR YAML to write"),
    pipeline: str = typer.Option("versavit", "--pipeline", "-p", help=PIPELINE_HELP),
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
) -> None:
    """Compile the pipeline for a KFP server (KFP IR YAML); the config is embedded, credentials are not."""
    from versavit.kfp.cluster import compile_pipeline

    cfg = _load(config, overrides)
    compile_pipeline(cfg, pipeline, str(output))
    console.print(f"wrote {output} ({pipeline} pipeline, image {cfg.launch.image})")


@pipeline_app.command("submit")
def pipeline_submit(
    host: str = typer.Option(..., "--host", help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80"),
    pipeline: str = typer.Option("versavit", "--pipeline", "-p", help=PIPELINE_HELP),
    experiment: str = typer.Option("versavit", "--experiment", help="KFP experiment name"),
    namespace: str | None = typer.Option(None, "--namespace", help="KFP namespace (multi-user installs)"),
    token_env: str = typer.Option("KFP_TOKEN", "--token-env", help="env variable holding a bearer token, if any"),
    service_account: str | None = typer.Option(
        None, "--service-account", help="the run's service account (default: launch.pipeline_service_account, "
        "else KFP's); it needs manifests/components/profile-namespace's Role in the run's namespace"),
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
) -> None:
    """Compile and submit to a KFP server; prints the run id and its URL."""
    from versavit.kfp.cluster import submit_pipeline

    cfg = _load(config, overrides)
    run_id, url = submit_pipeline(cfg, pipeline, host=host, experiment=experiment, namespace=namespace,
                                  token=os.environ.get(token_env), service_account=service_account)
    account = service_account or cfg.launch.pipeline_service_account or "KFP's default service account"
    console.print(f"submitted run {run_id} (as {account})\n  {url}")


# --------------------------------------------------------------------------------------------
# label: stage 0, pseudo-labelling (versavit.labeling)

label_app = typer.Typer(no_args_is_help=True, help="Pseudo-label shard datasets with teacher models (stage 0).")
app.add_typer(label_app, name="label")

LabelInputOpt = typer.Option(None, "--input", "-i", help="input dataset URL (folder with manifest.json); default: "
                             "every dataset of the config this step labels (its place in each label chain)")
LabelOutputOpt = typer.Option(None, "--output", "-o", help="output dataset URL (same shards, fields added); with "
                              "--input only")
ShardIndexOpt = typer.Option(0, "--shard-index", min=0, envvar="JOB_COMPLETION_INDEX",
                             help="this worker's index: it takes shards i, i+n, i+2n, ... "
                             "(a Kubernetes Indexed Job sets it)")
NumShardsOpt = typer.Option(1, "--num-shards", min=1, help="number of workers sharing the job")
FinalizeOpt = typer.Option(False, "--finalize", help="only write the output manifest (all shards must be done)")


def _label(kind: str, config: Path | None, input_url: str | None, output_url: str | None, shard_index: int,
           num_shards: int, finalize: bool, overrides: list[str] | None) -> None:
    """Run one worker's slice of a labelling job, tracked in MLflow, and print its counts. Without --input: this
    kind's step on every dataset of the config (the synthetic world's splits, or data.datasets)."""
    from rich.table import Table

    from versavit.labeling import finalize_dataset
    from versavit.stages import dataset_label_chains, label_shards, stage_label_datasets

    cfg = _load(config, overrides)
    if shard_index >= num_shards:
        raise ConfigError(f"--shard-index {shard_index} must be < --num-shards {num_shards}")
    if (input_url is None) != (output_url is None):
        raise ConfigError("give --input and --output together, or neither (every dataset of the config)")
    if input_url is None:
        steps = dataset_label_chains(cfg).get(kind, [])
        if not steps:
            raise ConfigError(f"this config has no `{kind}` label step (labeling.use_ground_truth / "
                              "data.datasets.*.labels); pass --input and --output to label a dataset of your own")
        if finalize:
            raise ConfigError("--finalize needs --input and --output")
        summaries = json.loads(stage_label_datasets(cfg, kind, shard_index, num_shards))
        for name, summary in summaries.items():
            console.print(f"{kind} {name}: {summary['samples']} samples labelled, "
                          f"{summary['shards_already_done']} shard(s) already done; "
                          f"{summary['manifest'] or 'manifest: not yet (other workers)'}", highlight=False)
        return
    if finalize:
        manifest, missing = finalize_dataset(kind, input_url, output_url, cfg.labeling)
        if manifest is None:  # a ClickException: main() turns it into exit status 1 with this message
            import click

            raise click.ClickException(f"not finalized: {len(missing)} shard(s) not done yet: {missing[:20]}")
        console.print(f"{kind}: manifest written, {manifest.num_samples} samples in {len(manifest.shards)} shard(s)"
                      f" at {output_url}")
        return
    summary = label_shards(cfg, kind, input_url, output_url, shard_index, num_shards)
    table = Table(title=f"label {kind}: worker {shard_index}/{num_shards}", show_header=False)
    for key in ("shards_total", "shards_mine", "shards_already_done"):
        table.add_row(key, str(summary[key]))
    table.add_row("shards_processed", str(len(summary["shards_processed"])))
    for key, value in summary["counts"].items():
        table.add_row(key, str(value))
    table.add_row("images/s", f"{summary['images_per_s']:.2f} (teacher loading: {summary['teacher_load_s']:.1f} s)")
    table.add_row("manifest", summary["manifest"] or f"not yet ({len(summary['shards_missing'])} shard(s) missing)")
    console.print(table)


@label_app.command("depth")
def label_depth(config: Path = ConfigOpt, input_url: str = LabelInputOpt, output_url: str = LabelOutputOpt,
                shard_index: int = ShardIndexOpt, num_shards: int = NumShardsOpt, finalize: bool = FinalizeOpt,
                overrides: list[str] = OverridesArg) -> None:
    """Depth-Anything disparity maps (depth.png + json depth {scale, kind: disparity})."""
    _label("depth", config, input_url, output_url, shard_index, num_shards, finalize, overrides)


@label_app.command("masks")
def label_masks(config: Path = ConfigOpt, input_url: str = LabelInputOpt, output_url: str = LabelOutputOpt,
                shard_index: int = ShardIndexOpt, num_shards: int = NumShardsOpt, finalize: bool = FinalizeOpt,
                overrides: list[str] = OverridesArg) -> None:
    """SAM masks from the objects' boxes (RLE in json objects, inst.png / mask.png)."""
    _label("masks", config, input_url, output_url, shard_index, num_shards, finalize, overrides)


@label_app.command("describe")
def label_describe(config: Path = ConfigOpt, input_url: str = LabelInputOpt, output_url: str = LabelOutputOpt,
                   shard_index: int = ShardIndexOpt, num_shards: int = NumShardsOpt, finalize: bool = FinalizeOpt,
                   overrides: list[str] = OverridesArg) -> None:
    """Referring expressions for objects (describer model, or the class label)."""
    _label("describe", config, input_url, output_url, shard_index, num_shards, finalize, overrides)


@label_app.command("embed")
def label_embed(config: Path = ConfigOpt, input_url: str = LabelInputOpt, output_url: str = LabelOutputOpt,
                shard_index: int = ShardIndexOpt, num_shards: int = NumShardsOpt, finalize: bool = FinalizeOpt,
                overrides: list[str] = OverridesArg) -> None:
    """Text embeddings of every referring expression (emb.npy: one row per object)."""
    _label("embed", config, input_url, output_url, shard_index, num_shards, finalize, overrides)


# --------------------------------------------------------------------------------------------
# eval: linear probes, zero-shot depth, referring segmentation, comparison report (versavit.eval)


@app.command("eval")
def eval_command(
    config: Path = ConfigOpt,
    trained: str | None = typer.Option(None, "--trained", help="trained export or backbone URL "
                                       "(default: <workdir>/stages/multitask/export)"),
    baseline: str | None = typer.Option(None, "--baseline", help="baseline backbone URL or hub id (default: "
                                        "eval.baseline_backbone, else what the multi-task stage started from)"),
    export: list[str] = typer.Option(None, "--export", help="NAME=URL, repeatable: compare these named exports "
                                     "(Table 4 ablation) instead of the trained one; the baseline stays the reference "
                                     "unless --no-baseline"),
    with_baseline: bool = typer.Option(True, "--with-baseline/--no-baseline", help="include the baseline row"),
    out: Path | None = typer.Option(None, "--out", help="report folder (default: <workdir>/reports/eval)"),
    evaluator: list[str] = typer.Option(None, "--evaluator", "-e", help="run only this evaluator (repeatable; "
                                        "default: eval.evaluators); `--list` shows them"),
    list_evaluators: bool = typer.Option(False, "--list", help="list the evaluators and their benchmarks, and exit"),
    overrides: list[str] = OverridesArg,
) -> None:
    """Evaluate backbones with the configured evaluators (linear probes, zero-shot depth, DA-2K, referring
    segmentation, fine-tuned depth and referring segmentation, 3D correspondence) on eval.benchmarks; write the
    comparison report (markdown + JSON + figures) and log every metric to MLflow."""
    if list_evaluators:
        _list_evaluators(config, overrides)
        return
    from versavit.eval.run import baseline_candidate, compare_backbones, resolve_candidate, run_eval
    from versavit.layout import eval_cache_dir

    cfg = _load(config, overrides)
    if evaluator:
        _load_check_evaluators(list(evaluator))
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"evaluators": list(evaluator)})})
    if export:
        named: dict = {}
        for item in export:
            name, sep, url = item.partition("=")
            if not sep or not name.strip() or not url.strip():
                raise ConfigError(f"--export {item!r} is not of the form NAME=URL")
            named[name.strip()] = url.strip()
        backbones: dict = {}
        if with_baseline:
            backbones["baseline"] = (resolve_candidate("baseline", baseline, eval_cache_dir(cfg)) if baseline
                                     else baseline_candidate(cfg))
        backbones.update(named)
        result = compare_backbones(backbones, cfg, out_dir=out)
    else:
        if not with_baseline:
            raise ConfigError("--no-baseline applies to --export comparisons (baseline vs trained needs the baseline)")
        result = run_eval(cfg, trained=trained, baseline=baseline, out_dir=out)
    console.print(Path(result["out_dir"], "comparison.md").read_text(), markup=False, highlight=False)
    console.print(f"report: {result['out_dir']} ({len(result['files'])} files); MLflow run {result['mlflow_run_id']}")


def _load_check_evaluators(names: list[str]) -> None:
    from versavit.config.schema import EvalConfig

    try:
        EvalConfig(evaluators=names)
    except ValueError as exc:
        raise ConfigError(f"--evaluator: {exc}") from exc


def _list_evaluators(config: Path | None, overrides: list[str] | None) -> None:
    """The registry as a table: name, kind, paper table, benchmarks, metrics, and whether the config runs it."""
    from rich.table import Table

    from versavit.eval.evaluators import all_evaluators

    picked: list[str] = []
    with contextlib.suppress(ConfigError, FileNotFoundError):  # no config here: list the registry alone
        picked = list(_load(config, overrides).eval.evaluators)
    table = Table(title="evaluators (eval.evaluators picks them; --evaluator NAME runs one)")
    for col in ("evaluator", "kind", "paper", "benchmarks", "metrics", "in config"):
        table.add_column(col, overflow="fold", no_wrap=col == "evaluator")  # names whole, to copy into a config
    for name, cls in all_evaluators().items():
        metrics = ", ".join(f"{k} ({v.label})" for k, v in cls.metric_specs.items())
        table.add_row(name, cls.kind, cls.paper_table, cls.benchmarks_help, metrics, "yes" if name in picked else "")
    console.print(table)


# --------------------------------------------------------------------------------------------
# weights: every checkpoint the run loads, staged once to weights.url (versavit.weights)

weights_app = typer.Typer(no_args_is_help=True, help="Checkpoints staged once to weights.url; pods load them "
                          "from there with the hub offline.")
app.add_typer(weights_app, name="weights")


def _weights_table(title: str, rows: list[dict], columns: tuple[str, ...]) -> None:
    from rich.table import Table

    from versavit.weights import human_size

    table = Table(title=title)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        cells = {"model": ", ".join(f.rsplit(".", 1)[-1] if f.startswith("labeling.") else f
                                    for f in row["fields"]) or "-",
                 "ref": row["ref"], "revision": str(row["revision"])[:12], "size": human_size(row["bytes"]),
                 "files": str(row["files"]), "staged URL": row["url"], "status": row["status"],
                 "staged at": row.get("staged_at", "")}
        table.add_row(*(escape(cells[c]) for c in columns))
    console.print(table)


@weights_app.command("stage")
def weights_stage(config: Path = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Copy every model the run loads (backbone, LLM, tokenizer, teachers, baseline) from the hub or a local
    folder to weights.url, once: complete copies of the same revision are skipped. A gated model needs a hub
    token in $HF_TOKEN (weights.hub_token_env)."""
    from versavit import weights

    cfg = _load(config, overrides)
    with progress_bar() as bar:
        rows = weights.stage_weights(cfg, progress=per_name(bar, "stage"))
    _weights_table(f"weights staged at {cfg.weights.url}", rows,
                   ("model", "ref", "revision", "size", "staged URL", "status"))
    copied = sum(r["status"] == "copied" for r in rows)
    console.print(f"{len(rows)} model(s): {copied} copied, {len(rows) - copied} already staged; "
                  f"{weights.human_size(sum(r['bytes'] for r in rows))} at {cfg.weights.url}", highlight=False)


@weights_app.command("list")
def weights_list(config: Path = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """What is staged under weights.url (from the records), and which of the run's models are not yet;
    exit 1 if one is missing."""
    from versavit import weights

    cfg = _load(config, overrides)
    rows = weights.list_staged(cfg)
    _weights_table(f"weights at {cfg.weights.url}", rows,
                   ("model", "ref", "revision", "size", "files", "staged at", "status"))
    if missing := [r for r in rows if r["status"] != "staged" and r["fields"]]:
        _fail(f"{len(missing)} model(s) of this run not staged ({', '.join(r['ref'] for r in missing)}): run "
              "`versavit weights stage`")


# --------------------------------------------------------------------------------------------
# cluster: the preflight of a cluster run (versavit.launch.preflight)

cluster_app = typer.Typer(no_args_is_help=True, help="The cluster a run goes to: check it before submitting.")
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("check")
def cluster_check(
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
    context: str | None = typer.Option(None, "--context", help="kubeconfig context (default: the current one; in a "
                                       "pod: its service account)"),
    as_user: str | None = typer.Option(None, "--as", help="check the permissions of this user instead, e.g. "
                                       "system:serviceaccount:kubeflow:pipeline-runner (impersonation)"),
    namespace: str | None = typer.Option(None, "--namespace", "-n", help="where the jobs go (default: this pod's "
                                         "namespace in a pod, else launch.namespace); from outside the cluster, "
                                         "the KFP run's namespace"),
    stage: str | None = typer.Option(None, "--stage", help="the stage whose job is compared with the CRD schema "
                                     "(default: the recipe's first)"),
) -> None:
    """Will a cluster run of this config start? CRDs and their versions (and the TrainJob runtime, the gang
    scheduler), the launcher's permissions in the jobs' namespace, the secrets its pods read, nodes for
    launch.nnodes pods, the default StorageClass, the S3 buckets and MLflow, from where this runs. A table of
    ✓ / ✗ / ? (could not be checked with this identity), one fix line per ✗; exit 1 if any check failed. Reads
    only; never prints a credential."""
    from versavit.launch.preflight import print_report, run_checks

    cfg = _load(config, overrides)
    checks = run_checks(cfg, context=context, impersonate=as_user, stage=stage, namespace=namespace)
    print_report(checks, console)
    if any(c.failed for c in checks):
        raise typer.Exit(1)


# an OSError with one of these on a path: the output cannot go there (not a bug, no traceback)
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS,
              errno.ENOSPC}


# --------------------------------------------------------------------------------------------
# export: a trained tower back where it is used

export_app = typer.Typer(no_args_is_help=True, help="Put a trained vision tower back where it is used.")
app.add_typer(export_app, name="export")


@export_app.command("mllm")
def export_mllm_command(
    base: str = typer.Option(..., "--base", help="full Qwen2-VL / Qwen2.5-VL checkpoint: folder, s3:// or hub id"),
    backbone: str = typer.Option(..., "--backbone", help="a stage's export folder (or its backbone/ folder)"),
    out: Path = typer.Option(..., "--out", help="new folder for the full checkpoint"),
    max_shard_gb: float = typer.Option(4.0, "--max-shard-gb", min=0.001, help="largest safetensors shard, GB"),
    config: Path = typer.Option(None, "--config", "-c", help="a run config: its storage section reaches s3:// URLs"),
) -> None:
    """Write BASE with its vision tower replaced by the trained one (config, tokenizer, processor files and LLM
    weights copied from BASE): what transformers' Qwen2VLForConditionalGeneration loads and generates with."""
    from versavit.models.mllm import export_mllm

    if config is not None:
        _load(config, [])
    try:
        record = export_mllm(base, backbone, out, max_shard_bytes=int(max_shard_gb * 10**9))
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"{out}: {record['kind']} from {base} with the tower of {backbone} "
                  f"({record['visual_tensors_changed']} of {record['visual_tensors']} visual tensors changed), "
                  f"{len(record['shards'])} shard(s), {record['total_bytes'] / 1e9:.2f} GB", highlight=False)


# --------------------------------------------------------------------------------------------
# plan: what a run needs before it is submitted (versavit.train.plan)


@app.command("plan")
def plan_command(
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON instead of Markdown tables"),
    gpu: str | None = typer.Option(None, "--gpu", help="GPU model (H20, H100, H200, A100; default: the one "
                                   "launch.node_selector names, else H100)"),
    mfu: float = typer.Option(0.35, "--mfu", min=0.01, max=1.0, help="model FLOPs utilisation the times assume"),
    peak_tflops: float | None = typer.Option(None, "--peak-tflops", min=1.0, help="dense bf16 TFLOP/s of one GPU "
                                             "(default: the GPU's spec sheet)"),
    stages: list[str] = typer.Option(None, "--stage", help="plan only this stage (repeatable; default: all)"),
    no_manifests: bool = typer.Option(False, "--no-manifests", help="do not read dataset manifests (stage lengths "
                                      "from max_steps or the paper's dataset sizes)"),
) -> None:
    """Per-GPU memory of every stage and task micro-step (parameters, gradients and optimiser states by ZeRO
    stage, DeepSpeed buckets, activations with and without checkpointing, logits) against the GPU's memory, the
    largest batch that fits, FLOPs per sample, GPU-hours and wall time at an MFU, and the object-storage volume.
    Computed on the CPU from shape-level traces (no GPU, no weights downloaded); exit 1 if a micro-step does not
    fit."""
    from versavit.train.plan import markdown, plan_run

    cfg = _load(config, overrides)
    try:
        for name in stages or []:
            cfg.train.stage(name)  # an unknown name fails here
        result = plan_run(cfg, str(config) if config else DEFAULT_CONFIG, gpu=gpu, mfu=mfu, peak_tflops=peak_tflops,
                          stages=list(stages or []), use_manifests=not no_manifests)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1, default=str))
    else:
        typer.echo(markdown(result))
    if not result.fits:
        bad = [f"{m.stage}/{m.task}" for m in result.micro_steps if not m.fits]
        _fail(f"{', '.join(bad)} do(es) not fit in {result.gpu_memory_gib:g} GiB (see the advice above)")


def _click_message(exc: Exception) -> str:
    """A click error as one line; an unknown command gets the group's closest command names."""
    message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
    typo, ctx = re.match(r"No such command '(.+)'", message), getattr(exc, "ctx", None)
    if typo and "Did you mean" not in message and hasattr(getattr(ctx, "command", None), "list_commands"):
        close = difflib.get_close_matches(typo.group(1), ctx.command.list_commands(ctx))
        message += f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return message


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("alembic", "botocore", "urllib3", "s3fs", "aiobotocore", "mlflow.store", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from versavit.data.errors import CorruptDataError
    from versavit.launch import LaunchError

    try:
        code = app(standalone_mode=False)  # without standalone mode click returns Exit codes
        if isinstance(code, int) and code:
            sys.exit(code)
    except ConfigError as exc:
        _error(str(exc))
        sys.exit(2)
    except (storage.StorageError, CorruptDataError, LaunchError) as exc:
        _error(str(exc))
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except OSError as exc:
        if exc.filename is None or exc.errno not in UNWRITABLE:
            raise
        _error(f"cannot write {exc.filename}: {exc.strerror} (choose a writable --out / workdir)")
        sys.exit(1)
    except Exception as exc:
        # click's errors (typer's vendored click or click itself): usage errors exit 2, the rest 1
        if not isinstance(getattr(exc, "exit_code", None), int) or not hasattr(exc, "format_message"):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: typer's rich help is already printed
            if help_text := exc.format_message():
                typer.echo(help_text)
            sys.exit(0)
        _error(_click_message(exc))
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
