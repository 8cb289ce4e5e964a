"""Fixture of the training tests: a workdir whose data stage is done (helpers in train_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import ROOT, add_embeddings, tiny_overrides

from versavit.config import load_config
from versavit.config.schema import SyntheticConfig
from versavit.data.build import build_synthetic, synthetic_root


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
