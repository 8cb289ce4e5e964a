"""Helpers of the benchmark-source tests: prepare splits of a `versavit data prepare` benchmark source with the
runner (a uniquely named module: every test folder has its own conftest)."""

from __future__ import annotations

from typing import Any

from versavit import storage
from versavit.data.prepare import SOURCES
from versavit.data.prepare.runner import prepare_dataset
from versavit.data.shards import Manifest, read_manifest

# benchmark source -> eval.benchmarks name
BENCH_NAME = {"ade20k": "ade20k", "voc2012": "voc", "cityscapes": "cityscapes", "nyuv2": "nyu", "kitti": "kitti"}


def prepare_split(source: str, input_url: str, output_url: str, split: str, units_per_shard: int = 2
                  ) -> tuple[Manifest, dict[str, int]]:
    """One split into shards at `output_url` (`versavit data prepare SOURCE --split SPLIT`); returns the manifest
    and the counts per reason (samples, records, skips)."""
    summary = prepare_dataset(source, input_url, output_url, split, units_per_shard=units_per_shard)
    assert summary["manifest"], summary
    return read_manifest(output_url), summary["counts"]


def prepare_all(source: str, input_url: str, output_url: str, **kwargs: Any) -> dict[str, dict[str, int]]:
    """Every split of `source` into <output_url>/<split>/ (the layout eval.benchmarks reads)."""
    return {split: prepare_split(source, input_url, storage.join(output_url, split), split, **kwargs)[1]
            for split in SOURCES[source].splits if split != "trainval"}
