"""`versavit data prepare SOURCE`: published datasets -> versavit shards, sharded and resumable.

SOURCES maps each source name (versavit.config.schema.SOURCE_NAMES) to its `Source`: the training sets
(training.py), plain image folders (images.py) and the evaluation benchmarks (benchmarks.py).
"""

from __future__ import annotations

from versavit.data.prepare.base import Source
from versavit.data.prepare.benchmarks import BENCHMARK_SOURCES
from versavit.data.prepare.images import IMAGES
from versavit.data.prepare.training import TRAINING_SOURCES

SOURCES: dict[str, Source] = {s.name: s for s in (*TRAINING_SOURCES, IMAGES, *BENCHMARK_SOURCES)}

__all__ = ["SOURCES", "Source"]
