"""`versavit data prepare SOURCE`: published datasets -> versavit shards, sharded and resumable.

SOURCES maps each source name (versavit.config.schema.SOURCE_NAMES) to its `Source`: the training sets
(training.py), plain image folders (images.py) and the evaluation benchmarks (benchmarks.py, da2k.py,
correspondence.py, coco_karpathy.py, and vlmevalkit.py: the VQA benchmarks' TSVs).
"""

from __future__ import annotations

from versavit.data.prepare.base import Source
from versavit.data.prepare.benchmarks import DENSE_SOURCES
from versavit.data.prepare.coco_karpathy import COCO_KARPATHY_SOURCE
from versavit.data.prepare.correspondence import NAVI_SOURCE, SPAIR_SOURCE
from versavit.data.prepare.da2k import DA2K_SOURCE
from versavit.data.prepare.images import IMAGES
from versavit.data.prepare.training import TRAINING_SOURCES
from versavit.data.prepare.vlmevalkit import VLMEVALKIT_SOURCES

BENCHMARK_SOURCES: list[Source] = [*DENSE_SOURCES, DA2K_SOURCE, NAVI_SOURCE, SPAIR_SOURCE, COCO_KARPATHY_SOURCE,
                                   *VLMEVALKIT_SOURCES]
SOURCES: dict[str, Source] = {s.name: s for s in (*TRAINING_SOURCES, IMAGES, *BENCHMARK_SOURCES)}

__all__ = ["BENCHMARK_SOURCES", "SOURCES", "Source"]
