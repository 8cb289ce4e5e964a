"""Labelling jobs end to end on synthetic shards: fields added, others copied, resumable, sharded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from label_helpers import labeling_config

from versavit import storage
from versavit.config.schema import SyntheticConfig
from versavit.data import codecs
from versavit.data.build import build_synthetic
from versavit.data.loader import CorruptDataError, shard_pipeline
from versavit.data.shards import ShardWriter, read_manifest, resolve_shards
from versavit.data.tasks import depth_view, refseg_view
from versavit.labeling import finalize_dataset, label_dataset
from versavit.labeling.embed import TextEmbedder

ROOT = Path(__file__).resolve().parents[2]


def raw_samples(url: str) -> dict[str, dict[str, bytes]]:
    """key -> {field: bytes} of every sample of a dataset (tar members read directly)."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in read_manifest(url).shard_urls():
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                out.setdefault(key, {})[field] = tar.extractfile(m).read()
    return out


def shard_digests(url: str) -> dict[str, str]:
    return {Path(u).name: hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in read_manifest(url).shard_urls()}


def decoded(url: str) -> list[dict]:
    return list(shard_pipeline(resolve_shards([url])))


class Counting:
    """Wraps a teacher and counts the calls of one method."""

    def __init__(self, inner, method: str):
        self.inner, self.method, self.calls = inner, method, 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        def counted(*args, **kwargs):
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


def test_teacher_labels_replace_ground_truth(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    """use_ground_truth=False: masks -> describe -> embed -> depth, each job on the previous output."""
    cfg = labeling_config(teachers, use_ground_truth=False)
    urls = {"in": world}
    previous = world
    for kind in ("masks", "describe", "embed", "depth"):
        urls[kind] = str(tmp_path / kind)
        summary = label_dataset(kind, previous, urls[kind], cfg)
        assert summary["finalized"] and summary["shards_processed"] == [0, 1, 2, 3]
        assert summary["samples"] == 8 and summary["labelled"] > 0 and summary["corrupt"] == 0
        previous = urls[kind]

    source, final = raw_samples(world), raw_samples(previous)
    assert source.keys() == final.keys()
    for key, fields in final.items():
        assert fields["rgb.jpg"] == source[key]["rgb.jpg"] and fields["sem.png"] == source[key]["sem.png"]
        assert fields["depth.png"] != source[key]["depth.png"] and "emb.npy" in fields

    manifest = read_manifest(previous)
    assert manifest.name == "synthetic-train+masks+describe+embed+depth"
    assert set(manifest.meta["labels"]) == {"masks", "describe", "embed", "depth"}
    assert manifest.meta["labels"]["embed"]["teacher"] == teachers["embedder"]
    assert {"rgb.jpg", "depth.png", "inst.png", "sem.png", "json", "emb.npy"} == set(manifest.fields)
    assert manifest.meta["seed"] == 0  # the input's meta is carried over

    for sample in decoded(previous):
        meta = sample["json"]
        assert meta["depth"]["kind"] == "disparity" and meta["depth"]["source"] == teachers["depth"]
        assert sample["depth"].shape == (64, 64) and sample["depth_valid"].any()
        objects = meta["objects"]
        assert sample["emb.npy"].dtype == np.float16 and sample["emb.npy"].shape == (len(objects), 32)
        assert meta["embedding"] == {"model": teachers["embedder"], "dim": 32, "normalized": True,
                                     "field": "emb.npy", "rows": "objects"}
        for obj in objects:
            assert obj["mask_source"] == teachers["masks"] and isinstance(obj["mask_score"], float)
            assert codecs.decode_rle(obj["segmentation"]).shape == (64, 64)
            assert obj["expression_source"] == teachers["describer"] and obj["expression"]
        # the training views read the labelled sample
        view = refseg_view(sample, 56)
        assert view["text_embedding"].shape == (32,) and view["mask"].shape == (56, 56)
        assert depth_view(sample, 56, target="depth")["target"].shape == (56, 56)


def test_ground_truth_is_kept(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    """use_ground_truth=True: the world's exact depth/masks/expressions stay; no teacher is even loaded."""
    cfg = labeling_config(teachers, use_ground_truth=True)

    class NeverCalled:
        def __getattr__(self, name):
            raise AssertionError(f"teacher used: {name}")

    for kind in ("depth", "masks", "describe"):
        out = str(tmp_path / kind)
        summary = label_dataset(kind, world, out, cfg, teacher=NeverCalled())
        assert summary["labelled"] == 0 and summary["kept"] > 0
        assert shard_digests(out) == shard_digests(world)  # byte-identical copies

    out = str(tmp_path / "embed")
    summary = label_dataset("embed", world, out, cfg)
    assert summary["labelled"] == 8 and summary["counts"]["class_label_texts"] == 0
    embedder = TextEmbedder(teachers["embedder"], device="cpu")
    source = {s["__key__"]: s for s in decoded(world)}
    for sample in decoded(out):
        meta = sample["json"]
        assert meta["depth"]["kind"] == "depth" and meta["objects"] == source[sample["__key__"]]["json"]["objects"]
        want = embedder.encode([o["expression"] for o in meta["objects"]])
        np.testing.assert_allclose(sample["emb.npy"].astype(np.float32), want, atol=2e-3)


def test_class_label_describer_is_the_default(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    cfg = labeling_config(teachers, use_ground_truth=False, describer=False)
    summary = label_dataset("describe", world, str(tmp_path / "out"), cfg)
    assert summary["labelled"] == summary["counts"]["labelled"] > 0
    for sample in decoded(str(tmp_path / "out")):
        for obj in sample["json"]["objects"]:
            assert obj["expression"] == obj["shape"] and obj["expression_source"] == "class-label"
    assert read_manifest(str(tmp_path / "out")).meta["labels"]["describe"]["teacher"] == "class-label"


def test_interrupted_job_redoes_only_missing_shards(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    cfg = labeling_config(teachers, use_ground_truth=False)
    reference = str(tmp_path / "reference")
    label_dataset("embed", world, reference, cfg)

    out = str(tmp_path / "resumed")
    embedder = Counting(TextEmbedder(teachers["embedder"], device="cpu"), "encode")
    calls: list[tuple[int, int]] = []

    def crash_in_third_shard(kind: str, done: int, total: int) -> None:
        calls.append((done, total))
        if done == 6:  # shards 0 and 1 are committed; shard 2 is labelled but not yet written
            raise KeyboardInterrupt("preempted")

    with pytest.raises(KeyboardInterrupt):
        label_dataset("embed", world, out, cfg, progress=crash_in_third_shard, teacher=embedder)
    assert embedder.calls == 3
    names = sorted(p.name for p in Path(out).iterdir() if p.is_file())
    assert names == ["shard-000000.tar", "shard-000001.tar"]  # no partial shard, no manifest, no temp file
    assert sorted(p.name for p in (Path(out) / "done").iterdir()) == ["shard-000000.json", "shard-000001.json"]
    first_records = {p.name: p.read_text() for p in (Path(out) / "done").iterdir()}

    embedder.calls = 0
    summary = label_dataset("embed", world, out, cfg, teacher=embedder)
    assert summary["shards_processed"] == [2, 3] and summary["shards_already_done"] == 2
    assert embedder.calls == 2 and summary["samples"] == 4 and summary["finalized"]
    assert {p.name: p.read_text() for p in (Path(out) / "done").iterdir() if p.name in first_records} == first_records
    assert shard_digests(out) == shard_digests(reference)
    assert read_manifest(out).digest == read_manifest(reference).digest

    # a third run finds everything done and loads nothing
    summary = label_dataset("embed", world, out, cfg, teacher=Counting(None, "encode"))
    assert summary["shards_processed"] == [] and summary["finalized"]


def test_workers_take_their_slice_and_the_last_writes_the_manifest(world: str, teachers: dict[str, str],
                                                                    tmp_path: Path) -> None:
    cfg = labeling_config(teachers, use_ground_truth=False, describer=False)
    single = str(tmp_path / "single")
    label_dataset("describe", world, single, cfg)
    out = str(tmp_path / "split")
    first = label_dataset("describe", world, out, cfg, shard_index=1, num_shards=3)
    assert first["shards_processed"] == [1] and not first["finalized"] and first["shards_missing"] == [0, 2, 3]
    assert not (Path(out) / "manifest.json").exists()
    assert finalize_dataset("describe", world, out, cfg) == (None, [0, 2, 3])
    second = label_dataset("describe", world, out, cfg, shard_index=0, num_shards=3)
    assert second["shards_processed"] == [0, 3] and not second["finalized"]
    last = label_dataset("describe", world, out, cfg, shard_index=2, num_shards=3)
    assert last["shards_processed"] == [2] and last["finalized"]
    assert shard_digests(out) == shard_digests(single)
    # the manifest does not depend on who wrote it: --finalize rewrites the same bytes
    text = (Path(out) / "manifest.json").read_text()
    manifest, missing = finalize_dataset("describe", world, out, cfg)
    assert missing == [] and manifest is not None and (Path(out) / "manifest.json").read_text() == text
    with pytest.raises(ValueError, match="shard_index"):
        label_dataset("describe", world, out, cfg, shard_index=3, num_shards=3)


def test_changed_teacher_redoes_everything(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    cfg = labeling_config(teachers, use_ground_truth=False, describer=False)
    label_dataset("describe", world, out, cfg)
    assert (Path(out) / "manifest.json").exists()
    other = labeling_config(teachers, use_ground_truth=False, describer=True)
    with pytest.raises(KeyboardInterrupt):  # the stale manifest goes before any shard changes
        label_dataset("describe", world, out, other, progress=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert not (Path(out) / "manifest.json").exists()
    summary = label_dataset("describe", world, out, other)
    assert summary["shards_processed"] == [0, 1, 2, 3] and summary["finalized"]
    assert read_manifest(out).meta["labels"]["describe"]["teacher"] == teachers["describer"]


def test_corrupt_inputs_are_skipped_and_counted(teachers: dict[str, str], tmp_path: Path) -> None:
    src = str(tmp_path / "src")
    build_synthetic(str(tmp_path / "w"), SyntheticConfig(num_train=4, num_val=1, image_size=48, samples_per_shard=4),
                    splits=("train",))
    good = [s for s in shard_pipeline(resolve_shards([str(tmp_path / "w" / "train")]))]
    raw = raw_samples(str(tmp_path / "w" / "train"))
    with ShardWriter(src, samples_per_shard=3, name="mixed") as w:
        for i, key in enumerate(sorted(raw)):
            fields = dict(raw[key])
            if i == 1:
                fields["rgb.jpg"] = b"\xff\xd8\xff not a jpeg"
            w.write({"__key__": key, **fields})
    # truncate the second shard in the middle of its only sample
    shard = Path(src) / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    cfg = labeling_config(teachers, use_ground_truth=True)
    summary = label_dataset("embed", src, str(tmp_path / "out"), cfg)
    assert summary["samples"] == 2 and summary["corrupt"] >= 2 and summary["finalized"]
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.num_samples == 2 and [s.name for s in manifest.shards] == ["shard-000000.tar"]
    assert len(good) == 4
    # with a corruption budget the job stops instead
    with pytest.raises(CorruptDataError):
        label_dataset("embed", src, str(tmp_path / "strict"), cfg, max_corrupt_fraction=0.1)


def test_tracker_gets_images_per_second(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    class Recorder:
        def __init__(self):
            self.points = []

        def log_metrics(self, run, metrics, step):
            self.points.append((step, dict(metrics)))

    rec = Recorder()
    label_dataset("describe", world, str(tmp_path / "out"), labeling_config(teachers, describer=False),
                  tracker=rec, run=object())
    steps = [s for s, m in rec.points if "label_describe/images_per_s" in m]
    assert steps == [0, 1, 2, 3] and all(m["label_describe/images_per_s"] > 0 for _, m in rec.points[:4])
    assert "label_describe/images_per_s_total" in rec.points[-1][1]


def test_label_on_s3(s3: str, teachers: dict[str, str]) -> None:
    build_synthetic("s3://label-bucket/world", SyntheticConfig(num_train=4, num_val=1, image_size=48,
                                                                samples_per_shard=2), splits=("train",))
    cfg = labeling_config(teachers, use_ground_truth=False, describer=False)
    out = "s3://label-bucket/described"
    first = label_dataset("describe", "s3://label-bucket/world/train", out, cfg, shard_index=0, num_shards=2)
    assert not first["finalized"] and storage.exists(f"{out}/done/shard-000000.json")
    last = label_dataset("describe", "s3://label-bucket/world/train", out, cfg, shard_index=1, num_shards=2)
    assert last["finalized"] and read_manifest(out).num_samples == 4
    # a changed teacher removes the S3 manifest before rewriting
    label_dataset("describe", "s3://label-bucket/world/train", out, labeling_config(teachers, use_ground_truth=False))
    assert read_manifest(out).meta["labels"]["describe"]["teacher"] == teachers["describer"]


def test_converted_detection_data_labelled_end_to_end(teachers: dict[str, str], tmp_path: Path) -> None:
    """Objects365-style boxes -> SAM masks -> class-label texts -> embeddings -> a refseg training view."""
    from PIL import Image

    from versavit.data.convert import convert_coco_detection

    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
    ann = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": 40, "width": 56} for i in (1, 2)],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400},
                           {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 10, 30, 25], "area": 750},
                           {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 56, 40], "area": 2240}],
           "categories": [{"id": 3, "name": "car"}, {"id": 5, "name": "person"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    convert_coco_detection(str(tmp_path / "ann.json"), str(tmp_path / "img"), str(tmp_path / "o365"))
    cfg = labeling_config(teachers, use_ground_truth=True, describer=False)
    previous = str(tmp_path / "o365")
    for kind in ("masks", "describe", "embed"):
        summary = label_dataset(kind, previous, str(tmp_path / kind), cfg)
        assert summary["labelled"] > 0  # nothing to keep: the source has no masks or expressions
        previous = str(tmp_path / kind)
    samples = decoded(previous)
    assert [[o["expression"] for o in s["json"]["objects"]] for s in samples] == [["car", "person"], ["car"]]
    for s in samples:
        assert set(np.unique(s["inst.png"])) <= {0, *[o["id"] for o in s["json"]["objects"]]}
        view = refseg_view(s, 28)
        assert view["text_embedding"].shape == (32,)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "versavit.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_label_embed_and_finalize(world: str, teachers: dict[str, str], tmp_path: Path, cli_main,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers, --finalize and a bad --shard-index through the CLI's main() in this process (a fresh process would
    spend ~8 s importing torch and the teacher's libraries per call), and the finalize error once from a real
    process: its one line and exit status as a user sees them."""
    monkeypatch.chdir(tmp_path)  # a default workdir (runs/tiny) lands here, not in the repository
    config = str(ROOT / "configs/tiny.yaml")
    out = str(tmp_path / "out")
    code, err = cli_main("label", "embed", "--config", config, "--input", world, "--output", out, "--shard-index", "1",
                         "--num-shards", "2", f"labeling.teachers.embedder={teachers['embedder']}",
                         "tracking.enabled=false", f"workdir={tmp_path / 'run'}")
    assert code == 0, err
    assert "shards_processed" in err and "not yet (2 shard(s) missing)" in err
    res = cli("label", "embed", "--finalize", "--input", world, "--output", out, "-c", "configs/tiny.yaml",
              f"labeling.teachers.embedder={teachers['embedder']}")
    assert res.returncode == 1 and "2 shard(s) not done yet: [0, 2]" in res.stderr
    code, err = cli_main("label", "embed", "-c", config, "-i", world, "-o", out, "--shard-index", "0",
                         "--num-shards", "2", f"labeling.teachers.embedder={teachers['embedder']}",
                         "tracking.enabled=false")
    assert code == 0, err
    assert read_manifest(out).num_samples == 8
    code, err = cli_main("label", "embed", "-c", config, "-i", world, "-o", out, "--shard-index", "2",
                         "--num-shards", "2")
    assert code == 2 and "--shard-index" in err


def test_unknown_kind_is_rejected(world: str, teachers: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown label kind"):
        label_dataset("captions", world, str(tmp_path / "o"), labeling_config(teachers))
