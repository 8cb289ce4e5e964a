"""Fixture of the evaluation tests: a workdir with a tiny synthetic world and a multi-task export."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from eval_helpers import add_embeddings, eval_config, save_export

from versavit.config.schema import SyntheticConfig
from versavit.data.build import build_synthetic
from versavit.layout import synthetic_root


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: with a second intra-op thread, synchronisation costs more than the work (10x
    slower on a busy 2-core machine). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with the synthetic world (embeddings included) and a multi-task export."""
    workdir = tmp_path_factory.mktemp("eval-run")
    cfg = eval_config(workdir)
    root = synthetic_root(cfg.workdir)
    build_synthetic(root, SyntheticConfig(num_train=24, num_val=8, image_size=56, samples_per_shard=8))
    for split in ("train", "val"):
        add_embeddings(f"{root}/{split}")
    save_export(cfg, f"{workdir}/stages/multitask/export")
    return workdir
