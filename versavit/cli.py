"""`versavit ...`: one subcommand per stage, plus config and pipeline commands.

Expected failures (a bad config, storage, corrupt data) print one message and exit non-zero
without a traceback: 2 for a bad config or usage, 1 for a failed stage.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.logging import RichHandler
from rich.markup import escape

from versavit import storage
from versavit.config import ConfigError, RunConfig, dump_yaml, load_config
from versavit.progress import console, per_name, progress_bar

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="VersaViT: multi-task post-training of an MLLM's vision encoder, end to end.")
config_app = typer.Typer(no_args_is_help=True, help="Check and print run configurations.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect task shards.")
pipeline_app = typer.Typer(no_args_is_help=True, help="Run the whole workflow.")
train_app = typer.Typer(no_args_is_help=True, help="Training stages (launched with torchrun / on the cluster).")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(train_app, name="train")

DEFAULT_CONFIG = "configs/tiny.yaml"

ConfigOpt = typer.Option(None, "--config", "-c", help=f"run config YAML (default: {DEFAULT_CONFIG} if present)")
OverridesArg = typer.Argument(None, help="dotted overrides, e.g. train.multitask.max_steps=50",
                              show_default=False)


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
    out: str = typer.Option(..., "--out", help="dataset URL: a folder or s3://bucket/prefix"),
    num_samples: int = typer.Option(256, "--num-samples", "-n", min=1, help="training samples"),
    num_val: int | None = typer.Option(None, "--num-val", min=1, help="val samples (default: n/8)"),
    seed: int = typer.Option(0, "--seed"),
    image_size: int = typer.Option(224, "--image-size", min=32),
    samples_per_shard: int = typer.Option(128, "--samples-per-shard", min=1),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0),
    config: Path | None = ConfigOpt,
) -> None:
    """Render the synthetic world into train/val webdataset shards at --out."""
    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic

    cfg = _load(config, [])
    syn = SyntheticConfig(**{**cfg.data.synthetic.model_dump(), "num_train": num_samples,
                             "num_val": num_val or max(1, num_samples // 8), "seed": seed,
                             "image_size": image_size, "samples_per_shard": samples_per_shard})
    with progress_bar() as bar:
        manifests = build_synthetic(out, syn, workers=workers, progress=per_name(bar, "render"))
    for split, m in manifests.items():
        console.print(f"{split}: {m.num_samples} samples in {len(m.shards)} shard(s) at {m.url} "
                      f"(digest {m.digest[:12]})")


@app.command("ui")
def ui(config: Path = ConfigOpt, port: int = typer.Option(5000, "--port"),
       overrides: list[str] = OverridesArg) -> None:
    """Open the MLflow UI on the run's local store, bound to 127.0.0.1."""
    import subprocess

    from versavit.tracking import default_tracking_uri

    cfg = _load(config, overrides)
    uri = cfg.tracking.uri or default_tracking_uri(cfg.workdir)
    console.print(f"MLflow UI for {uri} at http://127.0.0.1:{port} (Ctrl-C to stop)")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    raise typer.Exit(subprocess.call([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                      "--host", "127.0.0.1", "--port", str(port)], env=env))


def _train(stage: str, config: Path | None, overrides: list[str] | None) -> None:
    from versavit.launch import launch_local

    cfg = _load(config, overrides)
    if cfg.launch.backend != "local":
        raise ConfigError(f"launch.backend={cfg.launch.backend!r} runs through the pipeline's cluster path; "
                          "use launch.backend=local to train on this machine")
    result = launch_local(cfg, stage)
    console.print(f"{stage}: {result['steps']} steps done; export at {result['export_url']}")


@train_app.command("warmup")
def train_warmup(config: Path = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Caption warm-up: the projector alone learns to feed the frozen ViT's features to the LLM."""
    _train("warmup", config, overrides)


@train_app.command("multitask")
def train_multitask(config: Path = ConfigOpt, overrides: list[str] = OverridesArg) -> None:
    """Multi-task training: ViT + caption/VQA, depth and referring-segmentation heads (DeepSpeed ZeRO-2)."""
    _train("multitask", config, overrides)


@pipeline_app.command("run")
def pipeline_run(
    local: bool = typer.Option(False, "--local", help="run on this machine (the only mode so far)"),
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
) -> None:
    """Run the workflow's stages in order with MLflow tracking (parent run + a run per stage)."""
    from versavit.pipeline import run_local

    cfg = _load(config, overrides)
    if not local:
        raise ConfigError("only --local runs exist so far; pass --local")
    run_local(cfg, console=console)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False)])
    for noisy in ("alembic", "botocore", "urllib3", "s3fs", "aiobotocore", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from versavit.data.loader import CorruptDataError
    from versavit.launch import LaunchError

    try:
        app(standalone_mode=False)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except (storage.StorageError, CorruptDataError, LaunchError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
