"""Fixtures of the training tests: a workdir whose data stage is done, an in-process process group
(helpers in train_helpers.py)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_helpers import ROOT, TRAINED_STEPS, add_embeddings, tiny_overrides, train_cmd

from versavit.config import load_config
from versavit.config.schema import SyntheticConfig
from versavit.data.build import build_synthetic
from versavit.layout import synthetic_root


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: with a second intra-op thread, synchronisation costs more than the work (several
    times slower on a busy 2-core machine). Restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir whose data stage is done: 48 + 8 synthetic scenes at 56 px with embeddings."""
    workdir = tmp_path_factory.mktemp("tiny-run")
    cfg = load_config(ROOT / "configs/tiny.yaml", tiny_overrides(workdir))
    root = synthetic_root(cfg.workdir)
    build_synthetic(root, SyntheticConfig(**cfg.data.synthetic.model_dump()), workers=0)
    for split in ("train", "val"):
        add_embeddings(f"{root}/{split}")
    return workdir


@pytest.fixture(scope="session")
def trained_run(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real multi-task run, shared by the training, export, registry and evaluation tests: 2 processes
    under torchrun, DeepSpeed ZeRO-2, bf16, 40 steps on the tiny world (trained once per test session)."""
    workdir = tmp_path_factory.mktemp("trained-run")
    shutil.copytree(tiny_world / "data", workdir / "data")
    res = subprocess.run(train_cmd(workdir, "multitask", f"train.multitask.max_steps={TRAINED_STEPS}",
                                   f"train.multitask.checkpoint_interval={TRAINED_STEPS}", "train.precision=bf16",
                                   "train.zero_stage=2"),
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def world_of_one():
    """Env for an in-process process group (world 1, gloo, a free port); restored afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
