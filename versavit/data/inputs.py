"""What a training stage reads, and whether it is there: checked before any process starts, so a missing
dataset costs a second and one line naming it and the command that makes it, not a torchrun start-up.
Torch-free: the launcher and the CLI import it."""

from __future__ import annotations

from versavit import layout, storage
from versavit.config import RunConfig


def task_urls(cfg: RunConfig, task: str, split: str = "train", stage: str | None = None) -> list[str]:
    """The shard URLs `task` reads in `stage` (its own `data`, else `data.tasks`; the synthetic world when
    data.source is synthetic: its labelled copy once the label stage wrote it)."""
    if cfg.data.source == "synthetic":
        labelled = f"{layout.labelled_root(cfg.workdir)}/{split}"
        if storage.exists(f"{labelled}/manifest.json"):
            return [labelled]
        return [f"{layout.synthetic_root(cfg.workdir)}/{split}"]
    source = cfg.stage_source(stage, task) if stage else cfg.data.tasks.get(task)  # type: ignore[call-overload]
    urls = (source.urls if split == "train" else source.val_urls) if source else []
    if not urls:
        where = f"{cfg.train.stage_path(stage)}.data.{task} or data.tasks.{task}" if stage else f"data.tasks.{task}"
        raise ValueError(f"{where}: no {'urls' if split == 'train' else 'val_urls'} configured")
    return urls


def _exists(url: str) -> bool:
    """A dataset folder with its manifest, or a single .tar shard."""
    return storage.exists(url) if url.endswith(".tar") else storage.exists(storage.join(url, "manifest.json"))


def _maker(cfg: RunConfig, url: str, config_arg: str) -> str:
    """The command that writes `url` in this config, in backquotes."""
    def cmd(text: str) -> str:
        return f"`{' '.join(f'{text} {config_arg}'.split())}`"

    if cfg.data.source == "synthetic":
        return cmd("versavit data synth")
    for name, spec in cfg.data.datasets.items():
        if spec.labelled == url:
            return " then ".join(cmd(f"versavit label {k}") for k in spec.labels) + f" (data.datasets.{name})"
        if spec.url == url:
            return cmd("versavit data prepare") + f" (data.datasets.{name})"
    return "`versavit data prepare SOURCE --input RAW --output URL`"


def missing_stage_inputs(cfg: RunConfig, stage: str, config_arg: str = "") -> list[str]:
    """One line per dataset `stage` reads that is not there: its URL and the command that makes it."""
    missing: list[str] = []
    for task in cfg.train.stage(stage).tasks:
        for url in task_urls(cfg, task, stage=stage):
            if not _exists(url):
                missing.append(f"{task} data {url} does not exist (no manifest.json): make it with "
                               f"{_maker(cfg, url, config_arg)}")
    return missing
