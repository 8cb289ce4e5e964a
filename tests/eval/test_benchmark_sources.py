"""Benchmark sources of `versavit data prepare`: each source's fixture (its published layout, rendered from the
synthetic world) -> prepared shards -> the shard reader yields exactly the fixture's labels, the same targets as
the published-layout reader, and corrupt inputs are skipped and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from benchmark_helpers import BENCH_NAME, prepare_all

from versavit.config.schema import BENCHMARK_SOURCES as SCHEMA_BENCHMARK_SOURCES
from versavit.data.errors import CorruptDataError
from versavit.data.prepare import BENCHMARK_SOURCES, SOURCES
from versavit.data.prepare.benchmarks import (
    FIXTURE_IMAGES,
    KITTI,
    NYU,
    fixture_truth,
)
from versavit.data.prepare.runner import prepare_dataset
from versavit.data.prepare.vlmevalkit import NAMES as VLMEVALKIT_NAMES
from versavit.data.shards import read_manifest
from versavit.eval.datasets import PreparedBenchmark, open_benchmark

SEED = 3
SCALE = {"nyuv2": NYU.scale, "kitti": KITTI.scale}
# the dense benchmarks (a train split for the probes, seg or depth labels); DA-2K, NAVI, SPair-71k, COCO Karpathy and
# the VLMEvalKit VQA benchmarks have tests of their own (tests/eval/test_da2k.py, test_correspondence.py,
# test_retrieval.py, test_vlmevalkit.py)
DENSE = [s.name for s in BENCHMARK_SOURCES
         if s.name not in ("da2k", "navi", "spair71k", "coco-karpathy", *VLMEVALKIT_NAMES)]


def test_the_sources_are_registered_and_documented() -> None:
    assert tuple(s.name for s in BENCHMARK_SOURCES) == SCHEMA_BENCHMARK_SOURCES
    assert DENSE == ["ade20k", "voc2012", "cityscapes", "nyuv2", "kitti"]
    for s in BENCHMARK_SOURCES:
        assert SOURCES[s.name] is s and s.kind == "benchmark"
        assert "--input" in s.about or "split file" in s.about or "_files_with_gt" in s.about
        assert any(unit in s.about for unit in (" GB", " MB")), s.name  # what it costs to download


def _truths(source: str, split: str) -> dict[str, dict]:
    return {t["key"]: t for t in (fixture_truth(source, SEED, split, i) for i in range(FIXTURE_IMAGES))}


@pytest.mark.parametrize("source", DENSE)
def test_fixture_prepared_and_read_back_exactly(source: str, tmp_path: Path) -> None:
    src = SOURCES[source]
    src.write_fixture(tmp_path / "raw", SEED)
    counts = prepare_all(source, str(tmp_path / "raw"), str(tmp_path / "bench"))
    assert all(c == {"records": FIXTURE_IMAGES, "samples": FIXTURE_IMAGES} for c in counts.values()), counts

    name = BENCH_NAME[source]
    prepared = open_benchmark(f"{name}={tmp_path / 'bench'}", str(tmp_path))
    published = open_benchmark(f"{name}={tmp_path / 'raw'}", str(tmp_path))
    assert isinstance(prepared.eval, PreparedBenchmark) and isinstance(prepared.train, PreparedBenchmark)
    for kind in ("eval", "train"):
        ours, theirs = getattr(prepared, kind), getattr(published, kind)
        assert (ours.name, ours.split, ours.num_classes, ours.tasks) == (theirs.name, theirs.split,
                                                                           theirs.num_classes, theirs.tasks)
        truths = _truths(source, ours.split)
        samples = list(ours)
        assert len(samples) == len(ours) == len(theirs) == FIXTURE_IMAGES
        for (image, target), (image2, target2) in zip(samples, theirs, strict=True):
            truth = truths[target["key"]]
            assert target["key"] == target2["key"]
            assert (image == image2).all() and image.shape == truth["image"].shape  # bytes as published
            if "seg" in truth:
                assert target["seg"].dtype == np.int64
                assert (target["seg"] == truth["seg"]).all(), "class map differs from the rendered truth"
                assert (target["seg"] == target2["seg"]).all()
                assert (truth["seg"] == 255).any() and (truth["seg"] != 255).any()  # ignore exercised
            else:
                valid = truth["valid"]
                err = np.abs(target["depth"] - truth["depth"])[valid]
                assert err.max() <= 0.5 / SCALE[source] + 1e-6, "depth beyond the 16-bit PNG quantisation"
                assert (target["depth"][~valid] == 0).all()
                assert (target["valid"] == target2["valid"]).all() and (target["depth"] == target2["depth"]).all()
                assert not (target["valid"] & ~valid).any()  # never valid where nothing was measured
                if ours.split == "test":  # the evaluation crop
                    assert target["valid"].sum() < valid.sum()
                    assert not target["valid"][:, :1].any()
                else:
                    assert (target["valid"] == valid).all()
    # the json meta says what each sample is and which convention its labels follow
    manifest = read_manifest(str(tmp_path / "bench" / src.splits[0]))
    assert manifest.num_samples == FIXTURE_IMAGES
    assert ("sem.png" in manifest.fields) == (src.tasks == ("seg",))
    assert ("depth.png" in manifest.fields) == (src.tasks == ("depth",))


def _corrupt(source: str, raw: Path, split: str) -> tuple[str, str]:
    """Truncate one image and delete one label of `split`; returns the reasons they should be counted under."""
    src = SOURCES[source]
    units = src.list_units(str(raw), split)
    files = sorted(p for p in raw.rglob("*") if p.is_file())
    if source in ("nyuv2", "kitti"):
        image = next(p for p in files if p.as_posix().endswith(units[0][0]))
        label = next(p for p in files if p.as_posix().endswith(units[1][1]))
        missing = "missing_depth"
    else:
        stem = {"ade20k": lambda u: u, "voc2012": lambda u: u, "cityscapes": lambda u: u.rsplit("/", 1)[-1]}[source]
        image = next(p for p in files if p.name.startswith(stem(units[0])) and p.suffix in (".jpg", ".png")
                     and ("images" in p.parts or "JPEGImages" in p.parts or "leftImg8bit" in p.parts))
        label = [p for p in files if p.name.startswith(stem(units[1])) and ("annotations" in p.parts or
                 "SegmentationClass" in p.parts or "gtFine" in p.parts)]
        missing = "missing_label"
        for p in label[1:]:
            p.unlink()
        label = label[0]
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 3])
    label.unlink()
    return "bad_image", missing


@pytest.mark.parametrize("source", DENSE)
def test_corrupt_inputs_are_skipped_and_counted(source: str, tmp_path: Path) -> None:
    src = SOURCES[source]
    raw = tmp_path / "raw"
    src.write_fixture(raw, SEED)
    split = src.splits[0]
    bad_image, missing = _corrupt(source, raw, split)
    summary = prepare_dataset(source, str(raw), str(tmp_path / "out"), split, units_per_shard=2)
    expected = {"records": FIXTURE_IMAGES, "samples": FIXTURE_IMAGES - 2, bad_image: 1, missing: 1}
    assert summary["counts"] == expected and summary["corrupt"] == 2  # both count as corrupt input
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.num_samples == FIXTURE_IMAGES - 2 and manifest.meta["prepare"]["counts"] == expected
    # past data.max_corrupt_fraction the job stops instead
    with pytest.raises(CorruptDataError, match=missing):
        prepare_dataset(source, str(raw), str(tmp_path / "strict"), split, max_corrupt_fraction=0.5)
