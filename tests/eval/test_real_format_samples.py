"""Genuine files in the benchmarks' published formats (tests/fixtures/real-format-samples, see its PROVENANCE.md)
through the prepare sources and the readers, held to each benchmark's label convention and format quirks."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from benchmark_helpers import prepare_split
from PIL import Image

from versavit.data import codecs
from versavit.data.prepare.benchmarks import (
    CITYSCAPES_TRAIN_IDS,
    KITTI,
    NYU,
    cityscapes_from_label_ids,
    list_kitti,
    parse_depth_list,
)
from versavit.eval.datasets import ADE20k, Cityscapes, NYUv2Depth, open_benchmark
from versavit.eval.datasets.ade20k import ADE20K_CLASSES

SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "real-format-samples"
ADE_VAL = SAMPLES / "ade20k" / "ADEChallengeData2016"
CITY = SAMPLES / "cityscapes"
FRAME = "frankfurt_000000_000294"


def test_the_copies_match_their_checksums() -> None:
    lines = (SAMPLES / "SHA256SUMS").read_text().split("\n")
    listed = {}
    for line in filter(None, lines):
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    files = {p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*") if p.is_file()}
    assert files - set(listed) == {"PROVENANCE.md", "SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256((SAMPLES / name).read_bytes()).hexdigest() == digest, name
    assert sum((SAMPLES / n).stat().st_size for n in listed) < 2 * 1024 * 1024


# ------------------------------------------------------------------------------------------ ADE20k


def test_ade20k_genuine_reduce_zero_label(tmp_path: Path) -> None:
    """Mode-L annotations, 0 = other: prepared labels are v - 1 and 255 where the annotation is 0."""
    manifest, counts = prepare_split("ade20k", str(SAMPLES / "ade20k"), str(tmp_path / "validation"), "validation")
    assert counts == {"records": 3, "samples": 3} and manifest.num_samples == 3
    bench = open_benchmark(f"ade20k={tmp_path}", str(tmp_path), with_train=False)
    published = ADE20k(str(SAMPLES / "ade20k"), "validation")  # the folder above ADEChallengeData2016 works too
    sizes = []
    for (image, target), (image2, target2) in zip(bench.eval, published, strict=True):
        key = target["key"]
        with Image.open(ADE_VAL / "annotations/validation" / f"{key}.png") as ann:
            assert ann.mode == "L"  # not a palette
            raw = np.asarray(ann).astype(np.int64)
        seg = target["seg"]
        assert seg.shape == raw.shape == image.shape[:2]
        assert (seg[raw == 0] == 255).all() and (seg[raw > 0] == raw[raw > 0] - 1).all()
        assert (seg == target2["seg"]).all() and (image == image2).all()
        sizes.append((image.shape[1], image.shape[0], int(raw.max())))
    assert sizes == [(683, 512, 18), (500, 364, 18), (400, 300, 103)]  # full resolution; values up to 103


def test_ade20k_genuine_jpegs_pass_through_and_class_table(tmp_path: Path) -> None:
    prepare_split("ade20k", str(ADE_VAL), str(tmp_path / "v"), "validation")
    import tarfile

    from versavit.data.shards import read_manifest

    stored = {}
    for shard in read_manifest(str(tmp_path / "v")).shard_urls():
        with tarfile.open(shard) as tar:
            stored.update({m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")})
    for name, data in stored.items():
        assert data == (ADE_VAL / "images/validation" / f"{name.split('.')[0]}.jpg").read_bytes()
    # objectInfo150.csv: Idx 1..150 and names whose words are joined by ";" (synonyms too)
    rows = list(csv.DictReader((SAMPLES / "ade20k/objectInfo150.csv").open()))
    assert [int(r["Idx"]) for r in rows] == list(range(1, 151))
    for r in rows:
        assert ADE20K_CLASSES[int(r["Idx"]) - 1].replace(" ", ";") in r["Name"], r


# ------------------------------------------------------------------------------------------ Cityscapes


def _png(path: Path) -> np.ndarray:
    return codecs.decode_png(path.read_bytes())


def test_cityscapes_genuine_label_ids_to_train_ids() -> None:
    """labelIds -> train ids equals the genuine labelTrainIds, except where OpenMMLab's separately downscaled
    copies disagree by a pixel or two along class boundaries."""
    label_ids = _png(CITY / "gtFine/val/frankfurt" / f"{FRAME}_gtFine_labelIds.png")
    train_ids = _png(CITY / "gtFine/val/frankfurt" / f"{FRAME}_gtFine_labelTrainIds.png")
    instance_ids = _png(CITY / "gtFine/val/frankfurt" / f"{FRAME}_gtFine_instanceIds.png")
    assert label_ids.dtype == train_ids.dtype == np.uint8 and label_ids.shape == (128, 256)
    assert set(np.unique(label_ids)) <= set(range(34)) and set(np.unique(train_ids)) <= {*range(19), 255}
    assert instance_ids.dtype == np.uint16 and (instance_ids // 1000 == 26).any()  # cars: 26000 + k
    mapped = cityscapes_from_label_ids(label_ids)
    differ = mapped != train_ids
    assert differ.mean() < 0.003
    padded = np.pad(mapped, 2, mode="edge")  # every difference: the genuine id is within 2 px in our mapping
    near = np.zeros_like(differ)
    for dy in range(5):
        for dx in range(5):
            near |= padded[dy:dy + 128, dx:dx + 256] == train_ids
    assert near.all()
    for label_id in np.unique(label_ids):  # and per label id, the genuine majority train id is the mapping's
        values, counts = np.unique(train_ids[label_ids == label_id], return_counts=True)
        assert values[counts.argmax()] == CITYSCAPES_TRAIN_IDS.get(int(label_id), 255), label_id


def test_cityscapes_genuine_prepared_with_and_without_train_ids(tmp_path: Path) -> None:
    _, counts = prepare_split("cityscapes", str(CITY), str(tmp_path / "with" / "val"), "val")
    assert counts == {"records": 1, "samples": 1}
    with_ids = next(iter(open_benchmark(f"cityscapes={tmp_path / 'with'}", ".", with_train=False).eval))
    train_ids = _png(CITY / "gtFine/val/frankfurt" / f"{FRAME}_gtFine_labelTrainIds.png")
    assert with_ids[1]["key"] == FRAME and (with_ids[1]["seg"] == train_ids).all()  # labelTrainIds preferred
    assert with_ids[0].shape == (128, 256, 3)

    copy = tmp_path / "cityscapes"  # as the gtFine zip ships: no labelTrainIds
    shutil.copytree(CITY, copy)
    (copy / "gtFine/val/frankfurt" / f"{FRAME}_gtFine_labelTrainIds.png").unlink()
    prepare_split("cityscapes", str(copy), str(tmp_path / "without" / "val"), "val")
    without = next(iter(open_benchmark(f"cityscapes={tmp_path / 'without'}", ".", with_train=False).eval))
    label_ids = _png(CITY / "gtFine/val/frankfurt" / f"{FRAME}_gtFine_labelIds.png")
    assert (without[1]["seg"] == cityscapes_from_label_ids(label_ids)).all()
    assert (next(iter(Cityscapes(str(copy), "val")))[1]["seg"] == without[1]["seg"]).all()


# ------------------------------------------------------------------------------------------ NYUv2 / KITTI


def test_nyu_genuine_split_files() -> None:
    test = (SAMPLES / "nyuv2/zoedepth_nyudepthv2_test_files_with_gt.txt").read_text()
    train = (SAMPLES / "nyuv2/zoedepth_nyudepthv2_train_files_with_gt.head200.txt").read_text()
    assert not any(line.startswith("/") for line in test.splitlines())
    assert all(line.startswith("/") for line in train.splitlines() if line)  # the train list's leading slash
    pairs = parse_depth_list(test, NYU)
    assert len(pairs) == 654 and pairs[0] == ("bathroom/rgb_00045.jpg", "bathroom/sync_depth_00045.png", 518.8579)
    train_pairs = parse_depth_list(train, NYU)
    assert len(train_pairs) == 200
    assert train_pairs[0] == ("kitchen_0028b/rgb_00045.jpg", "kitchen_0028b/sync_depth_00045.png", 518.8579)


def test_nyu_genuine_frame_in_the_bts_layout(tmp_path: Path) -> None:
    """A genuine (downscaled) sync frame: uint16 millimetres, 0 = no depth, read under the train list's "/"."""
    raw = tmp_path / "nyu"
    src = SAMPLES / "nyuv2/mmseg_pseudo_nyu"
    for split, folder in (("train", "sync"), ("test", "official_splits/test")):
        scene = raw / folder / "bookstore_0001d"
        scene.mkdir(parents=True)
        shutil.copy(src / "images/bookstore_0001d_00001.jpg", scene / "rgb_00001.jpg")
        shutil.copy(src / "annotations/bookstore_0001d_00001.png", scene / "sync_depth_00001.png")
        lead = "/" if split == "train" else ""
        (raw / NYU.list_files[split]).write_text(
            f"{lead}bookstore_0001d/rgb_00001.jpg {lead}bookstore_0001d/sync_depth_00001.png 518.8579\n")
    with Image.open(src / "annotations/bookstore_0001d_00001.png") as img:
        assert img.mode == "I;16"
        codes = np.asarray(img, dtype=np.uint16)
    bench_root = tmp_path / "bench"
    for split in ("train", "test"):
        _, counts = prepare_split("nyuv2", str(raw), str(bench_root / split), split)
        assert counts == {"records": 1, "samples": 1}
    bench = open_benchmark(f"nyu={bench_root}", str(tmp_path))
    (image, target), = list(bench.train)
    assert image.shape == (120, 160, 3) and target["key"] == "bookstore_0001d/rgb_00001"
    assert np.allclose(target["depth"], codes / 1000.0) and target["depth"].max() == pytest.approx(10.0)
    assert (target["valid"] == ((codes > 0) & (codes < 10000))).all()  # 0 = no depth; the 10 m cap is exclusive
    (_, test), = list(bench.eval)
    assert (test["valid"] == target["valid"] & NYU.crop(120, 160)).all()  # the Eigen crop at the same fractions
    assert not test["valid"][:11].any() and not test["valid"][:, :10].any()
    published = next(iter(NYUv2Depth(str(raw), "test")))[1]
    assert (published["valid"] == test["valid"]).all() and (published["depth"] == test["depth"]).all()


def test_kitti_genuine_split_files(tmp_path: Path) -> None:
    """Eigen test list: 697 lines, 45 without ground truth ("None"); Depth-Anything-V2's two-column list of
    absolute paths names the same 652 frames, its depth under data_depth_annotated/{train,val}/."""
    listing = (SAMPLES / "kitti_eigen/zoedepth_kitti_eigen_test_files_with_gt.txt").read_text()
    lines = listing.splitlines()
    assert len(lines) == 697 and sum(line.split()[1] == "None" for line in lines) == 45
    shutil.copy(SAMPLES / "kitti_eigen/zoedepth_kitti_eigen_test_files_with_gt.txt",
                tmp_path / KITTI.list_files["test"])
    units = list_kitti(str(tmp_path), "test")
    assert len(units) == 652 and units[0] == [
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png",
        "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png", 721.5377]
    dav2 = parse_depth_list((SAMPLES / "kitti_eigen/depth_anything_v2_metric_kitti_val.txt").read_text(), KITTI)
    assert len(dav2) == 652 and all(focal is None for _, _, focal in dav2)
    assert [image for image, _, _ in dav2] == [u[0] for u in units]
    # the Eigen test frames' ground truth lies in both halves of data_depth_annotated.zip: look in both
    halves = [depth.split("/", 1)[0] for _, depth, _ in dav2]
    assert (halves.count("train"), halves.count("val")) == (491, 161)
    assert [depth.split("/", 1)[1] for _, depth, _ in dav2] == [u[1] for u in units]
    assert KITTI.depth_dirs["test"] == ("data_depth_annotated", "data_depth_annotated/train",
                                        "data_depth_annotated/val")
    train = parse_depth_list((SAMPLES / "kitti_eigen/zoedepth_kitti_eigen_train_files_with_gt.head200.txt")
                             .read_text(), KITTI)
    assert len(train) == 200 and {f for _, _, f in train} >= {721.5377, 718.856}
