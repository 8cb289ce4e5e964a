"""Benchmark readers and the registry that turns `eval.benchmarks` entries into them.

An entry is `name` or `name=root` (a local folder; for `synthetic` a shard dataset URL prefix holding
train/ and val/). Without a root, file-layout benchmarks are looked up under $VERSAVIT_DATA_ROOT (default
./data) in the folder named below, and `synthetic` is the run's own world (<workdir>/data/synthetic: exact
ground truth), with the text embeddings of the label stage's copy (<workdir>/data/labelled) when it exists.

    name        reader       probe train / eval split     folder under the data root
    synthetic   SyntheticWorld   train / val              -
    ade20k      ADE20k       training / validation        ADEChallengeData2016
    voc         PascalVOC    train / val                  VOCdevkit/VOC2012
    cityscapes  Cityscapes   train / val                  cityscapes
    nyu         NYUv2Depth   train / test (654)           nyu
    kitti       KITTIDepth   train / test (Eigen)         kitti
    refcoco, refcoco+, refcocog   RefCOCO   - / val        refer
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from versavit.eval.datasets.ade20k import ADE20k
from versavit.eval.datasets.base import BenchmarkReader, Sample
from versavit.eval.datasets.cityscapes import Cityscapes
from versavit.eval.datasets.depth_lists import KITTIDepth, NYUv2Depth
from versavit.eval.datasets.refcoco import RefCOCO
from versavit.eval.datasets.synthetic import SyntheticWorld
from versavit.eval.datasets.voc import PascalVOC

__all__ = ["ADE20k", "BENCHMARKS", "Benchmark", "BenchmarkReader", "Cityscapes", "KITTIDepth", "NYUv2Depth",
           "PascalVOC", "RefCOCO", "Sample", "SyntheticWorld", "open_benchmark", "parse_benchmark"]

DATA_ROOT_ENV = "VERSAVIT_DATA_ROOT"


@dataclass(frozen=True)
class _Entry:
    make: Callable[[str, str], BenchmarkReader]
    train_split: str | None
    eval_split: str
    folder: str


BENCHMARKS: dict[str, _Entry] = {
    "synthetic": _Entry(lambda root, split: SyntheticWorld(f"{root.rstrip('/')}/{split}", split), "train", "val", ""),
    "ade20k": _Entry(lambda root, split: ADE20k(root, split), "training", "validation", "ADEChallengeData2016"),
    "voc": _Entry(lambda root, split: PascalVOC(root, split), "train", "val", "VOCdevkit/VOC2012"),
    "cityscapes": _Entry(lambda root, split: Cityscapes(root, split), "train", "val", "cityscapes"),
    "nyu": _Entry(lambda root, split: NYUv2Depth(root, split), "train", "test", "nyu"),
    "kitti": _Entry(lambda root, split: KITTIDepth(root, split), "train", "test", "kitti"),
    **{name: _Entry(lambda root, split, n=name: RefCOCO(root, n, split), None, "val", "refer")
       for name in ("refcoco", "refcoco+", "refcocog")},
}


@dataclass
class Benchmark:
    """One benchmark of an evaluation: its eval reader and, for linear probes, its training reader."""

    name: str
    root: str
    eval: BenchmarkReader
    train: BenchmarkReader | None
    tasks: tuple[str, ...] = field(default=())


def parse_benchmark(spec: str) -> tuple[str, str | None]:
    """`name` or `name=root` -> (name, root or None), name checked against the registry."""
    name, _, root = spec.partition("=")
    name = name.strip().lower()
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} in eval.benchmarks; expected one of {sorted(BENCHMARKS)} "
                         "(optionally as name=/path/to/root)")
    return name, root.strip() or None


def open_benchmark(spec: str, workdir: str, with_train: bool = True) -> Benchmark:
    """Readers of one `eval.benchmarks` entry (the training split only when with_train and it exists)."""
    name, root = parse_benchmark(spec)
    entry = BENCHMARKS[name]
    if root is None:
        if name == "synthetic":
            from versavit import storage
            from versavit.layout import labelled_root, synthetic_root

            root = synthetic_root(workdir)
            # ground truth from the rendered world; text embeddings from the label stage's copy once it exists
            labelled = storage.join(labelled_root(workdir), entry.eval_split)
            if storage.exists(storage.join(labelled, "manifest.json")):
                reader = SyntheticWorld(storage.join(root, entry.eval_split), entry.eval_split, labelled)
                return Benchmark(name, root, reader, entry.make(root, entry.train_split) if with_train else None,
                                 reader.tasks)
        else:
            root = os.path.join(os.environ.get(DATA_ROOT_ENV, "data"), entry.folder)
    reader = entry.make(root, entry.eval_split)
    train = entry.make(root, entry.train_split) if with_train and entry.train_split else None
    return Benchmark(name, root, reader, train, reader.tasks)
