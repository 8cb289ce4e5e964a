"""Checkpoints at any URL, committed atomically, and the state that makes resume exact.

Every rank saves its DeepSpeed checkpoint files (model states on rank 0, each rank's ZeRO
optimizer shard) plus its RNG states into a rank-local staging folder (`storage.local_staging` under
`staging_root`: removed when the save ends, even by SIGTERM; one left by a SIGKILL goes with the next
save) and uploads them to `<url>/<tag>/`. After a barrier, rank 0 writes `<url>/latest.json` last: a
checkpoint exists only once that pointer names it, so a crash mid-save leaves the previous checkpoint as
the latest.

`latest.json` also records the config hash the checkpoint was made under (`resume_hash`): a run under
another config never resumes it silently (`check_resumable`: one line naming both hashes and the fix,
`train.restart=true` or deleting the stage folder).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from versavit import storage
from versavit.config import RunConfig
from versavit.train.resume import LATEST, CheckpointMismatch, check_resumable, latest, resume_hash  # noqa: F401


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine: Any, url: str, step: int, client_state: dict[str, Any], rank: int,
         staging_root: str | Path | None = None, meta: dict[str, Any] | None = None) -> str:
    """Save and commit checkpoint `step-<step>` under `url` (collective: every rank calls it); the files are
    staged under `staging_root` (default: the temp dir); `meta` (e.g. the config hash) goes into latest.json."""
    tag = f"step-{step:08d}"
    with storage.local_staging(f"ckpt-r{rank}", staging_root) as staging:
        engine.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), staging / tag / f"rng_rank{rank}.pt")
        for path in sorted((staging / tag).rglob("*")):
            if path.is_file():
                with storage.atomic_local_file(storage.join(url, tag, str(path.relative_to(staging / tag)))) as tmp:
                    shutil.copyfile(path, tmp)
        _barrier()  # every rank's files are in place before the pointer moves
        if rank == 0:
            storage.write_text(storage.join(url, LATEST), json.dumps({**(meta or {}), "tag": tag, "step": step}))
        _barrier()
    return tag


def remove(url: str, rank: int) -> None:
    """Delete every checkpoint under `url` (rank 0; collective: the others wait), the pointer first."""
    if rank == 0:
        fs, root = storage.get_fs(url)
        try:
            if fs.exists(storage.get_fs(storage.join(url, LATEST))[1]):
                fs.rm_file(storage.get_fs(storage.join(url, LATEST))[1])
            if fs.exists(root):
                fs.rm(root, recursive=True)
        except Exception as exc:
            raise storage.describe_error(url, exc) from exc
    _barrier()


def load(engine: Any, url: str, rank: int, staging_root: str | Path | None = None,
         cfg: RunConfig | None = None) -> dict[str, Any] | None:
    """Load the latest committed checkpoint into `engine`; returns its client state (or None). With `cfg`,
    a checkpoint made under another config raises `CheckpointMismatch` instead (`check_resumable`)."""
    record = check_resumable(url, cfg) if cfg is not None else latest(url)
    if record is None:
        return None
    tag = record["tag"]
    with storage.local_staging(f"load-r{rank}", staging_root) as staging:
        fs, root = storage.get_fs(storage.join(url, tag))
        for remote in fs.find(root):
            rel = remote[len(root):].lstrip("/")
            (staging / tag / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(staging / tag / rel))
        _, client_state = engine.load_checkpoint(str(staging), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        rng_file = staging / tag / f"rng_rank{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
    if client_state is None:
        raise RuntimeError(f"checkpoint {url}/{tag} could not be loaded by DeepSpeed")
    return client_state
