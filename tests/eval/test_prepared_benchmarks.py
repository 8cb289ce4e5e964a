"""Benchmarks read from prepared shards by URL (`eval.benchmarks: [name=s3://...]`): object storage, digests,
the RefCOCO family's evaluation splits, and the evaluation itself on prepared URLs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from benchmark_helpers import prepare_all, prepare_split
from eval_helpers import bag_of_words, eval_config

from versavit import storage
from versavit.data import codecs
from versavit.data.prepare import SOURCES
from versavit.data.prepare.runner import prepare_splits
from versavit.data.shards import ShardWriter, read_manifest
from versavit.eval.datasets import PreparedRefSeg, open_benchmark, open_benchmarks


def test_open_benchmark_from_s3(s3: str, tmp_path: Path) -> None:
    SOURCES["ade20k"].write_fixture(tmp_path / "raw", 0)
    prepare_split("ade20k", str(tmp_path / "raw"), "s3://bench/ade20k/validation", "validation")
    prepare_all("ade20k", str(tmp_path / "raw"), str(tmp_path / "local"))
    remote = open_benchmark("ade20k=s3://bench/ade20k", str(tmp_path))
    local = open_benchmark(f"ade20k={tmp_path / 'local'}", str(tmp_path))
    assert remote.eval.split == "validation" and remote.train is None  # no training split there: no probe
    assert remote.eval.describe()["root"] == "s3://bench/ade20k/validation" and remote.eval.describe()["prepared"]
    for (image, target), (image2, target2) in zip(remote.eval, local.eval, strict=True):
        assert target["key"] == target2["key"] and (target["seg"] == target2["seg"]).all() and (image == image2).all()
    # the digest is the shards' content (plus the reader's settings): a copy elsewhere shares the feature cache,
    # other data does not
    assert remote.eval.digest() == local.eval.digest() != local.train.digest()

    with pytest.raises(storage.StorageError, match="versavit data prepare kitti"):
        open_benchmark("kitti=s3://bench/nothing", str(tmp_path))


def test_one_split_prepared_without_split_folders(tmp_path: Path) -> None:
    """A dataset prepared without --split holds the default split (the evaluation split) at the URL itself."""
    SOURCES["voc2012"].write_fixture(tmp_path / "raw", 0)
    prepare_split("voc2012", str(tmp_path / "raw"), str(tmp_path / "voc"), "val")
    bench = open_benchmark(f"voc={tmp_path / 'voc'}", str(tmp_path))
    assert bench.train is None and len(bench.eval) == 3 and bench.eval.num_classes == 21


def _add_embeddings(url: str) -> None:
    """Rewrite a prepared refseg split with emb.npy (one row per sample's expression), as `versavit label embed`
    would."""
    import webdataset as wds

    manifest = read_manifest(url)
    raw = [r for shard in manifest.shard_urls() for r in wds.WebDataset(shard, shardshuffle=False, empty_check=False)]
    with ShardWriter(url, samples_per_shard=4, name=manifest.name, meta=manifest.meta) as writer:
        for r in raw:
            sample = {k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"}
            text = codecs.decode_json(sample["json"])["expression"]
            writer.write({**sample, "emb.npy": codecs.encode_npy(bag_of_words(text)[None])})


def _queries(reader) -> list[tuple[str, bytes]]:  # noqa: ANN001
    return sorted((s, m.tobytes()) for _, t in reader for s, m in zip(t["sentences"], t["masks"], strict=True))


def test_refcoco_family_evaluates_every_prepared_split(tmp_path: Path) -> None:
    """The RefCOCO training source's val/testA/testB shards (one sample per sentence) are three benchmarks."""
    SOURCES["refcoco"].write_fixture(tmp_path / "refer", 0)
    prepare_splits("refcoco", str(tmp_path / "refer"), str(tmp_path / "bench"), ["val", "testA", "testB"])
    benches = open_benchmarks(f"refcoco={tmp_path / 'bench'}", str(tmp_path))
    assert [(b.name, b.eval.split, b.train) for b in benches] == [
        ("refcoco", "val", None), ("refcoco-testA", "testA", None), ("refcoco-testB", "testB", None)]
    assert all(isinstance(b.eval, PreparedRefSeg) and b.tasks == ("refseg",) for b in benches)
    assert open_benchmark(f"refcoco={tmp_path / 'bench'}", str(tmp_path)).eval.split == "val"
    # the same queries as the published layout's reader: (sentence, mask) pairs
    published = open_benchmarks(f"refcoco={tmp_path / 'refer'}", str(tmp_path))
    assert [(b.name, b.eval.split) for b in published] == [(b.name, b.eval.split) for b in benches]
    for ours, theirs in zip(benches, published, strict=True):
        assert _queries(ours.eval) == _queries(theirs.eval) and len(_queries(ours.eval)) >= 3
    assert not any("embeddings" in t for _, t in benches[0].eval)  # the run's embedder will embed them
    _add_embeddings(str(tmp_path / "bench" / "val"))
    for _, target in open_benchmarks(f"refcoco={tmp_path / 'bench'}", str(tmp_path))[0].eval:
        assert target["embeddings"].shape == (len(target["masks"]), 16) == (1, 16)
    # a prepared copy holding only some splits evaluates those
    shutil.rmtree(tmp_path / "bench" / "testA")
    assert [b.name for b in open_benchmarks(f"refcoco={tmp_path / 'bench'}", ".")] == ["refcoco", "refcoco-testB"]


def test_eval_on_prepared_benchmarks(eval_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepared NYUv2 (depth probe + zero-shot) and RefCOCO val/testA (refseg, one cIoU per split)."""
    import versavit.eval.run as run_module
    from versavit.eval import compare_backbones

    monkeypatch.setattr(run_module, "_figures", lambda *args, **kwargs: [])  # matplotlib: 80% of the time here
    monkeypatch.setattr(run_module, "_training_curves", lambda *args, **kwargs: None)

    SOURCES["nyuv2"].write_fixture(tmp_path / "raw-nyu", 0)
    prepare_all("nyuv2", str(tmp_path / "raw-nyu"), str(tmp_path / "nyuv2"))
    SOURCES["refcoco"].write_fixture(tmp_path / "refer", 0)
    prepare_splits("refcoco", str(tmp_path / "refer"), str(tmp_path / "refcoco"), ["val", "testA"])
    _add_embeddings(str(tmp_path / "refcoco" / "testA"))  # testA with emb.npy, val through the run's embedder

    class FakeEmbedder:  # the real one needs model weights; the head was built for EMB_DIM-d embeddings
        def __init__(self, model_id: str, device: str = "auto") -> None:
            self.model_id = model_id

        def encode(self, texts: list[str]) -> np.ndarray:
            return np.stack([bag_of_words(t) for t in texts])

    import versavit.labeling.embed as embed_module

    monkeypatch.setattr(embed_module, "TextEmbedder", FakeEmbedder)
    cfg = eval_config(eval_run, "eval.probe.epochs=1", "tracking.enabled=false",
                      "eval.evaluators=[linear-probe, zero-shot-depth, refseg]")
    res = compare_backbones({"trained": f"{eval_run}/stages/multitask/export"}, cfg,
                            benchmarks=[f"nyu={tmp_path / 'nyuv2'}", f"refcoco={tmp_path / 'refcoco'}"],
                            out_dir=tmp_path / "report")
    m = res["metrics"]["trained"]
    assert {"linear-probe/depth_rmse", "linear-probe/depth_absrel", "zero-shot-depth/absrel",
            "zero-shot-depth/delta1"} <= set(m["nyu"])
    assert all(np.isfinite(v) for v in m["nyu"].values())
    for name in ("refcoco", "refcoco-testA"):
        assert 0 <= m[name]["refseg/ciou"] <= 1 and "refseg/miou" in m[name]
    nyu = res["benchmarks"]["nyu"]
    assert nyu["eval"]["root"] == f"{tmp_path}/nyuv2/test" and nyu["train"]["root"] == f"{tmp_path}/nyuv2/train"
    assert nyu["eval"]["prepared"] and nyu["eval"]["samples"] == 3
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "RefCOCO val cIoU" in md and "RefCOCO testA cIoU" in md and "NYUv2 RMSE" in md
