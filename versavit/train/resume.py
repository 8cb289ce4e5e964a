"""Whether a stage's checkpoint may be resumed under a config: the record it left (`latest.json`) and the
config hash it was made under. No torch here: the launcher checks before it starts torchrun."""

from __future__ import annotations

import json
from typing import Any

from versavit import storage
from versavit.config import ConfigError, RunConfig, config_hash

LATEST = "latest.json"
# settings that do not change what a checkpoint holds or how it resumes: they may differ on a rerun
_HASH_NEUTRAL = {"train": ("restart", "log_interval", "dist_timeout_s"), "tracking": None, "eval": None,
                 "storage": None}


class CheckpointMismatch(ConfigError):
    """A stage's checkpoint was made under another config: it is not resumed."""


def resume_hash(cfg: RunConfig) -> str:
    """The config hash a checkpoint records and a resume must match: `config_hash` of the config with the
    settings that cannot affect the checkpoint reset (train.restart, log_interval, dist_timeout_s;
    tracking, eval, storage)."""
    update: dict[str, Any] = {}
    for section, fields in _HASH_NEUTRAL.items():
        default = type(getattr(cfg, section))()
        if fields is None:
            update[section] = default
        else:
            update[section] = getattr(cfg, section).model_copy(update={f: getattr(default, f) for f in fields})
    return config_hash(cfg.model_copy(update=update))


def check_resumable(url: str, cfg: RunConfig) -> dict[str, Any] | None:
    """The latest checkpoint's record under `url` if it may be resumed under `cfg` (None if there is none);
    `CheckpointMismatch` (one line: both hashes and the fix) if it was made under another config."""
    record = latest(url)
    if record is None:
        return None
    want, got = resume_hash(cfg), record.get("config_hash")
    if got != want:
        made = f"config {got}" if got else "an unrecorded config (older version)"
        folder = url.rsplit("/", 1)[0]
        raise CheckpointMismatch(
            f"{folder}: its checkpoint (step {record.get('step')}) was made under {made}, this run's config is "
            f"{want}: not resumed. Start the stage over with train.restart=true (discards its checkpoints), or "
            f"delete {folder}, or rerun with the config it was made with")
    return record


def latest(url: str) -> dict[str, Any] | None:
    """The committed latest checkpoint's record ({"tag", "step", ...}) or None."""
    pointer = storage.join(url, LATEST)
    if not storage.exists(pointer):
        return None
    return json.loads(storage.read_text(pointer))
