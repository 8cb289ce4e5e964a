"""Benchmark readers and the registry that turns `eval.benchmarks` entries into them.

An entry is `name` or `name=root`. The root is, preferably, a URL (s3:// or a local folder) of the benchmark as
`versavit data prepare SOURCE` writes it: one shard dataset per split, `<root>/<split>/manifest.json`
(versavit.eval.datasets.prepared). A local folder in the benchmark's published layout is read as well (users with
local copies). Without a root, file-layout benchmarks are looked up under $VERSAVIT_DATA_ROOT (default ./data) in
the folder named below (prepared or published, for local use only), and `synthetic` is the run's own world
(<workdir>/data/synthetic: exact ground truth), with the text embeddings of the label stage's copy
(<workdir>/data/labelled) when it exists.

    name        source       reader       probe train / eval split     folder under the data root
    synthetic   -            SyntheticWorld   train / val              -
    ade20k      ade20k       ADE20k       training / validation        ADEChallengeData2016
    voc         voc2012      PascalVOC    train / val                  VOCdevkit/VOC2012
    cityscapes  cityscapes   Cityscapes   train / val                  cityscapes
    nyu         nyuv2        NYUv2Depth   train / test (654)           nyu
    kitti       kitti        KITTIDepth   train / test (Eigen)         kitti
    refcoco, refcoco+, refcocog   (training sources' eval splits)   RefCOCO   - / val, testA, testB   refer
                                                                              (refcocog: val, test)
    da2k        da2k         DA2K         - / test (point pairs only)  DA-2K
    navi        navi         NAVI         - / test (Probe3D's pairs)   navi_v1
    spair       spair71k     SPair        - / test (keypoint pairs)    SPair-71k
    coco-karpathy  coco-karpathy  CocoKarpathy  - / test (5k images, captions)  coco
    mmbench, mmstar, mmmu, mathvista, hallusionbench, ai2d, ocrbench, mmvet   (sources of the same names)
                 VLMEvalKitTSV   - / test (VLMEvalKit's TSV: one question per row)   LMUData

The RefCOCO family is evaluated on every evaluation split the root holds (`open_benchmarks`): the val split
under the plain name (`refcoco`), the others as `refcoco-testA`, `refcoco-testB` (`refcocog-test`), each with
its own cIoU in the report.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from versavit import storage
from versavit.data.prepare.vlmevalkit import NAMES as VLMEVALKIT_NAMES
from versavit.eval.datasets.ade20k import ADE20k
from versavit.eval.datasets.base import BenchmarkReader, Sample
from versavit.eval.datasets.cityscapes import Cityscapes
from versavit.eval.datasets.coco_karpathy import CocoKarpathy, PreparedCocoKarpathy
from versavit.eval.datasets.correspondence import NAVI, PreparedPairs, SPair
from versavit.eval.datasets.da2k import DA2K, PreparedDA2K
from versavit.eval.datasets.depth_lists import KITTIDepth, NYUv2Depth
from versavit.eval.datasets.prepared import PreparedBenchmark, PreparedRefSeg, is_prepared
from versavit.eval.datasets.refcoco import RefCOCO, refer_splits
from versavit.eval.datasets.synthetic import SyntheticWorld
from versavit.eval.datasets.vlmevalkit import PreparedVLMEvalKit, VLMEvalKitTSV
from versavit.eval.datasets.voc import PascalVOC

__all__ = ["ADE20k", "BENCHMARKS", "NAVI", "Benchmark", "BenchmarkReader", "Cityscapes", "CocoKarpathy", "DA2K",
           "KITTIDepth", "NYUv2Depth", "PascalVOC", "PreparedBenchmark", "PreparedCocoKarpathy", "PreparedDA2K",
           "PreparedPairs", "PreparedRefSeg", "PreparedVLMEvalKit", "RefCOCO", "SPair", "Sample", "SyntheticWorld",
           "VLMEvalKitTSV", "open_benchmark", "open_benchmarks", "parse_benchmark"]

DATA_ROOT_ENV = "VERSAVIT_DATA_ROOT"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Entry:
    make: Callable[[str, str], BenchmarkReader]  # (published-layout root, split) -> reader
    train_split: str | None
    eval_split: str
    folder: str
    source: str = ""  # the `versavit data prepare` source that writes it
    prepared: Callable[[str, str], BenchmarkReader] | None = None  # (prepared split URL, split) -> reader
    eval_splits: tuple[str, ...] = ()  # every evaluation split (RefCOCO family); default (eval_split,)


def _prepared(like: type[BenchmarkReader]) -> Callable[[str, str], BenchmarkReader]:
    return lambda url, split: PreparedBenchmark(url, split, like)


BENCHMARKS: dict[str, _Entry] = {
    "synthetic": _Entry(lambda root, split: SyntheticWorld(f"{root.rstrip('/')}/{split}", split), "train", "val", ""),
    "ade20k": _Entry(lambda root, split: ADE20k(root, split), "training", "validation", "ADEChallengeData2016",
                     "ade20k", _prepared(ADE20k)),
    "voc": _Entry(lambda root, split: PascalVOC(root, split), "train", "val", "VOCdevkit/VOC2012", "voc2012",
                  _prepared(PascalVOC)),
    "cityscapes": _Entry(lambda root, split: Cityscapes(root, split), "train", "val", "cityscapes", "cityscapes",
                         _prepared(Cityscapes)),
    "nyu": _Entry(lambda root, split: NYUv2Depth(root, split), "train", "test", "nyu", "nyuv2", _prepared(NYUv2Depth)),
    "kitti": _Entry(lambda root, split: KITTIDepth(root, split), "train", "test", "kitti", "kitti",
                    _prepared(KITTIDepth)),
    **{name: _Entry(lambda root, split, n=name: RefCOCO(root, n, split), None, "val", "refer", name,
                    lambda url, split, n=name: PreparedRefSeg(url, n, split),
                    ("val", "test") if name == "refcocog" else ("val", "testA", "testB"))
       for name in ("refcoco", "refcoco+", "refcocog")},
    "da2k": _Entry(lambda root, split: DA2K(root, split), None, "test", "DA-2K", "da2k",
                   lambda url, split: PreparedDA2K(url, split)),
    "navi": _Entry(lambda root, split: NAVI(root, split), None, "test", "navi_v1", "navi",
                   lambda url, split: PreparedPairs(url, split, "navi")),
    "spair": _Entry(lambda root, split: SPair(root, split), None, "test", "SPair-71k", "spair71k",
                    lambda url, split: PreparedPairs(url, split, "spair")),
    # retrieval (Table 11) is zero-shot on COCO: trained on other image-text pairs, no COCO train split read
    "coco-karpathy": _Entry(lambda root, split: CocoKarpathy(root, split), None, "test", "coco", "coco-karpathy",
                            lambda url, split: PreparedCocoKarpathy(url, split)),
    # VQA (Table 2): the OpenCompass suite as VLMEvalKit distributes it, scored by the `vqa` evaluator (its MLLM
    # trained on the run's caption and VQA data, never on these)
    **{name: _Entry(lambda root, split, n=name: VLMEvalKitTSV(root, n, split), None, "test", "LMUData", name,
                    lambda url, split, n=name: PreparedVLMEvalKit(url, n, split))
       for name in VLMEVALKIT_NAMES},
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


def _split_url(root: str, split: str) -> str | None:
    """Where a prepared split lives: <root>/<split>, else None."""
    url = storage.join(root, split)
    return url if is_prepared(url) else None


def _resolve_root(name: str, root: str | None) -> str:
    if root is not None:
        return root
    return os.path.join(os.environ.get(DATA_ROOT_ENV, "data"), BENCHMARKS[name].folder)


def _prepared_or_none(name: str, root: str) -> str | None:
    """"splits" when root holds <split>/manifest.json for the eval split, "single" when it is one prepared split
    (a dataset prepared without --split: the source's default split, the evaluation split), None for a folder
    in the published layout. A remote root must be prepared."""
    entry = BENCHMARKS[name]
    if any(_split_url(root, s) for s in entry.eval_splits or (entry.eval_split,)):
        return "splits"
    if is_prepared(root):
        return "single"
    if storage.is_remote(root):
        raise storage.StorageError(
            f"{name}: no prepared benchmark at {root}: expected {root}/{entry.eval_split}/manifest.json; write it "
            f"with `versavit data prepare {entry.source} --input <published layout> --output {root}`", kind="missing")
    return None


def open_benchmark(spec: str, workdir: str, with_train: bool = True) -> Benchmark:
    """Readers of one `eval.benchmarks` entry (the training split only when with_train and it exists); for the
    RefCOCO family, its val split (`open_benchmarks` gives every evaluation split)."""
    name, root = parse_benchmark(spec)
    entry = BENCHMARKS[name]
    if root is None and name == "synthetic":
        from versavit.layout import labelled_root, synthetic_root

        root = synthetic_root(workdir)
        # ground truth from the rendered world; text embeddings from the label stage's copy once it exists
        labelled = storage.join(labelled_root(workdir), entry.eval_split)
        if storage.exists(storage.join(labelled, "manifest.json")):
            reader = SyntheticWorld(storage.join(root, entry.eval_split), entry.eval_split, labelled)
            return Benchmark(name, root, reader, entry.make(root, entry.train_split) if with_train else None,
                             reader.tasks)
    root = _resolve_root(name, root)
    if name != "synthetic" and entry.prepared is not None:
        kind = _prepared_or_none(name, root)
        if kind is not None:
            return _open_prepared(name, root, kind, entry.eval_split, with_train)
    reader = entry.make(root, entry.eval_split)
    train = entry.make(root, entry.train_split) if with_train and entry.train_split else None
    return Benchmark(name, root, reader, train, reader.tasks)


def _open_prepared(name: str, root: str, kind: str, split: str, with_train: bool) -> Benchmark:
    entry = BENCHMARKS[name]
    assert entry.prepared is not None
    if kind == "single":
        reader = entry.prepared(root, split)
        return Benchmark(name, root, reader, None, reader.tasks)
    url = _split_url(root, split)
    if url is None:
        raise storage.StorageError(f"{name}: {root} has no prepared {split!r} split ({root}/{split}/manifest.json); "
                                   f"prepare it with `versavit data prepare {entry.source} --split {split}`",
                                   kind="missing")
    reader = entry.prepared(url, split)
    train = None
    if with_train and entry.train_split:
        train_url = _split_url(root, entry.train_split)
        if train_url is None:
            log.warning("%s: %s has no prepared %r split: no linear probe on it (zero-shot evaluation only)", name,
                        root, entry.train_split)
        else:
            train = entry.prepared(train_url, entry.train_split)
    return Benchmark(name, root, reader, train, reader.tasks)


def open_benchmarks(spec: str, workdir: str, with_train: bool = True) -> list[Benchmark]:
    """Every benchmark one `eval.benchmarks` entry stands for: one, except for the RefCOCO family, which gives one
    per evaluation split the root holds (val as `refcoco`, the others as `refcoco-testA`, ...), each reported on
    its own."""
    name, root = parse_benchmark(spec)
    entry = BENCHMARKS[name]
    if not entry.eval_splits:
        return [open_benchmark(spec, workdir, with_train)]
    root = _resolve_root(name, root)
    kind = _prepared_or_none(name, root)
    if kind == "single":
        return [open_benchmark(spec, workdir, with_train)]
    if kind == "splits":
        present = [s for s in entry.eval_splits if _split_url(root, s)]
    else:
        named = refer_splits(root, name) if Path(root).is_dir() else set()
        present = [s for s in entry.eval_splits if s in named] or [entry.eval_split]
    out = []
    for split in present:
        if kind == "splits":
            assert entry.prepared is not None
            reader = entry.prepared(storage.join(root, split), split)
        else:
            reader = entry.make(root, split)
        out.append(Benchmark(name if split == entry.eval_split else f"{name}-{split}", root, reader, None,
                             reader.tasks))
    return out
