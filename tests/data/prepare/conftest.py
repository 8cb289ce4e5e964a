"""Fixtures of the `data prepare` tests: every training source's stand-in, written once per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from versavit.data.prepare.training import TRAINING_SOURCES

SEED = 0


@pytest.fixture(scope="session")
def fixtures_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/<source>/ for every training source (seed 0). Read-only by convention: copy before corrupting."""
    root = tmp_path_factory.mktemp("prepare-fixtures")
    for src in TRAINING_SOURCES:
        (root / src.name).mkdir()
        src.write_fixture(root / src.name, SEED)
    return root


@pytest.fixture
def fixture_copy(fixtures_root: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A writable copy of one source's fixture."""

    def copy(name: str) -> Path:
        dest = tmp_path / "input" / name
        shutil.copytree(fixtures_root / name, dest)
        return dest

    return copy
