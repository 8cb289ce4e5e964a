"""Tiny random teachers saved once per session, and small synthetic datasets to label."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: teachers load from tmp dirs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from versavit.config.schema import SyntheticConfig  # noqa: E402
from versavit.data.build import build_synthetic  # noqa: E402
from versavit.labeling import tiny  # noqa: E402


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
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("teachers")
    return {
        "depth": tiny.save_tiny_depth(root / "depth"),
        "masks": tiny.save_tiny_sam(root / "sam"),
        "describer": tiny.save_tiny_describer(root / "describer"),
        "embedder": tiny.save_tiny_embedder(root / "embedder"),
    }


@pytest.fixture
def world(tmp_path: Path) -> str:
    """A synthetic train split: 8 samples of 64 px in 4 shards of 2."""
    url = str(tmp_path / "world")
    build_synthetic(url, SyntheticConfig(num_train=8, num_val=1, image_size=64, samples_per_shard=2, max_objects=4),
                    splits=("train",))
    return f"{url}/train"
