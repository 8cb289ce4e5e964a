"""Benchmark readers: a tiny fixture in each published layout, read back (values, ignore handling, pairing)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import write_refer
from PIL import Image

from versavit.eval.datasets import (
    ADE20k,
    Cityscapes,
    KITTIDepth,
    NYUv2Depth,
    PascalVOC,
    RefCOCO,
    SyntheticWorld,
    open_benchmark,
    parse_benchmark,
)
from versavit.eval.datasets.ade20k import ADE20K_CLASSES
from versavit.eval.datasets.refcoco import load_refs


def _rgb(path: Path, value: int, shape: tuple[int, int] = (20, 30)) -> None:
    """A flat-colour image: its colour tells which sample it is (pairing checks survive JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(path)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def _colour(image: np.ndarray) -> int:
    return int(round(float(image.mean())))


def test_ade20k(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    for i, colour in ((2, 160), (1, 80)):
        _rgb(root / "images/validation" / f"ADE_val_{i:08d}.jpg", colour)
        label = np.full((20, 30), i, np.uint8)
        label[0, :4] = [0, 1, 150, 37]
        _png(root / "annotations/validation" / f"ADE_val_{i:08d}.png", label)
    _rgb(root / "images/training/ADE_train_00000001.jpg", 10)
    _png(root / "annotations/training/ADE_train_00000001.png", np.zeros((20, 30), np.uint8))
    reader = ADE20k(str(root), "val")
    assert len(reader) == 2 and reader.num_classes == len(ADE20K_CLASSES) == 150
    samples = list(reader)
    assert [s[1]["key"] for s in samples] == ["ADE_val_00000001", "ADE_val_00000002"]
    for (image, target), (i, colour) in zip(samples, ((1, 80), (2, 160)), strict=True):
        assert image.dtype == np.uint8 and image.shape == (20, 30, 3) and abs(_colour(image) - colour) <= 2
        assert target["seg"][0, :4].tolist() == [255, 0, 149, 36]  # 0 -> ignore, 1..150 -> 0..149
        assert (target["seg"][1:] == i - 1).all()
    assert len(ADE20k(str(root), "training")) == 1
    (root / "annotations/validation/ADE_val_00000002.png").unlink()
    with pytest.raises(ValueError, match="without annotation"):
        ADE20k(str(root), "validation")


def test_pascal_voc(tmp_path: Path) -> None:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    palette = np.random.default_rng(0).integers(0, 256, 768).astype(np.uint8).tolist()
    for k, (name, colour) in enumerate((("2007_000032", 50), ("2007_000033", 200), ("2008_000001", 120))):
        _rgb(root / "JPEGImages" / f"{name}.jpg", colour)
        label = np.full((20, 30), k, np.uint8)
        label[5, 5], label[6, 6] = 15, 255
        img = Image.fromarray(label, mode="P")
        img.putpalette(palette)  # a palette PNG: indices are the classes, not the colours
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        img.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000033\n2007_000032\n")
    (root / "ImageSets/Segmentation/train.txt").write_text("2008_000001\n")
    reader = PascalVOC(str(tmp_path / "VOCdevkit"), "val")  # the devkit folder is accepted too
    samples = list(reader)
    assert [s[1]["key"] for s in samples] == ["2007_000033", "2007_000032"]  # the split file's order
    assert abs(_colour(samples[0][0]) - 200) <= 2 and (samples[0][1]["seg"][0] == 1).all()
    seg = samples[1][1]["seg"]
    assert seg[0, 0] == 0 and seg[5, 5] == 15 and seg[6, 6] == 255
    assert len(PascalVOC(str(root), "train")) == 1 and reader.num_classes == 21


def test_cityscapes(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    names = [("frankfurt", "frankfurt_000000_000294", 30), ("lindau", "lindau_000001_000019", 220)]
    for city, base, colour in names:
        _rgb(root / "leftImg8bit/val" / city / f"{base}_leftImg8bit.png", colour)
        train_ids = np.full((20, 30), 18 if city == "lindau" else 0, np.uint8)
        train_ids[0, 0] = 255
        _png(root / "gtFine/val" / city / f"{base}_gtFine_labelTrainIds.png", train_ids)
        _png(root / "gtFine/val" / city / f"{base}_gtFine_labelIds.png", np.full((20, 30), 33, np.uint8))
    reader = Cityscapes(str(root), "val")
    samples = list(reader)
    assert [t["key"] for _, t in samples] == [n[1] for n in names]
    for (image, target), (city, _, colour) in zip(samples, names, strict=True):
        assert _colour(image) == colour  # PNG: exact
        assert target["seg"][0, 0] == 255 and (target["seg"].ravel()[1:] == (18 if city == "lindau" else 0)).all()
    # without train-id images (the gtFine zip ships labelIds only) the labelIds are mapped: 33 (bicycle) -> 18
    (root / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelTrainIds.png").unlink()
    lindau = list(Cityscapes(str(root), "val"))[1][1]["seg"]
    assert (lindau == 18).all()
    (root / "gtFine/val/lindau/lindau_000001_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(ValueError, match="without .*labelIds"):
        Cityscapes(str(root), "val")


def test_nyu_depth(tmp_path: Path) -> None:
    root = tmp_path / "nyu"
    test = root / "official_splits/test"
    depth = np.full((480, 640), 1500, np.uint16)  # millimetres
    depth[100, 100], depth[200, 200], depth[300, 300] = 0, 12000, 2250
    for name, colour in (("bathroom/rgb_00045", 60), ("kitchen/rgb_00100", 140)):
        _rgb(test / f"{name}.jpg", colour, (480, 640))
        _png(test / f"{name.replace('rgb_', 'sync_depth_')}.png", depth)
    (root / "nyudepthv2_test_files_with_gt.txt").write_text(
        "kitchen/rgb_00100.jpg kitchen/sync_depth_00100.png 518.8579\n"
        "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579\n")
    reader = NYUv2Depth(str(root), "test")
    (image, target), (image2, target2) = list(reader)
    assert target["key"] == "kitchen/rgb_00100" and abs(_colour(image) - 140) <= 2 and abs(_colour(image2) - 60) <= 2
    d, v = target["depth"], target["valid"]
    assert d.dtype == np.float32 and d[300, 300] == pytest.approx(2.25) and d[50, 60] == pytest.approx(1.5)
    assert not v[100, 100] and not v[200, 200] and v[300, 300]  # 0 = invalid, 12 m > max_depth 10
    assert not v[:45].any() and not v[471:].any() and not v[:, :41].any() and not v[:, 601:].any()  # Eigen crop
    assert v[45:471, 41:601].sum() == (471 - 45) * (601 - 41) - 2
    uncropped = NYUv2Depth(str(root), "test", eval_crop=False)
    assert next(iter(uncropped))[1]["valid"][0, 0]


def test_kitti_depth(tmp_path: Path) -> None:
    root = tmp_path / "kitti"
    image_rel = "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png"
    depth_rel = "2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png"
    _rgb(root / "raw" / image_rel, 90, (40, 100))
    _rgb(root / "raw/2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000070.png", 10, (40, 100))
    depth = np.zeros((40, 100), np.uint16)
    depth[30, 50], depth[31, 50], depth[5, 50] = 5 * 256, 90 * 256, 3 * 256  # lidar is sparse
    _png(root / "data_depth_annotated" / depth_rel, depth)
    (root / "eigen_test_files_with_gt.txt").write_text(
        f"{image_rel} {depth_rel} 721.5377\n"
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000070.png None 721.5377\n")
    reader = KITTIDepth(str(root), "test")
    assert len(reader) == 1  # the frame without ground truth is skipped
    image, target = reader[0]
    assert abs(_colour(image) - 90) <= 2
    assert target["depth"][30, 50] == pytest.approx(5.0) and target["valid"][30, 50]
    assert not target["valid"][31, 50]  # 90 m > max_depth 80
    assert not target["valid"][5, 50]  # above the Garg crop (rows >= 0.408 * 40)
    assert target["valid"].sum() == 1


def test_refcoco(tmp_path: Path) -> None:
    root = tmp_path / "refer"
    write_refer(root)
    reader = RefCOCO(str(root), "refcoco", "val")
    assert len(reader) == 2 and reader.num_queries() == 4
    (img1, t1), (img3, t3) = list(reader)
    assert t1["key"] == "1" and abs(_colour(img1) - 40) <= 2 and abs(_colour(img3) - 170) <= 2
    assert t1["sentences"] == ["left box", "the tall one", "top right"] and t1["ref_ids"] == [0, 0, 1]
    box = t1["masks"][0]
    assert box.dtype == bool and box.shape == (40, 60)
    assert box[15:25, 12:18].all() and not box[:8].any() and not box[:, 25:].any()  # the polygon's rectangle
    assert t1["masks"][1] is box  # both sentences of a ref share its mask
    assert t1["masks"][2][2:8, 32:38].all() and not t1["masks"][2][20:].any()
    expected = np.zeros((40, 60), bool)
    expected[30:35, 50:58] = True
    assert (t3["masks"][0] == expected).all()  # compressed RLE decodes exactly
    assert len(RefCOCO(str(root), "refcoco", "testA")) == 1


def test_refs_pickle_refuses_code(tmp_path: Path) -> None:
    from collections import OrderedDict

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([OrderedDict(a=1)]))  # needs an import: not plain data
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_refs(path)


def test_synthetic_reader(eval_run: Path) -> None:
    reader = SyntheticWorld(f"{eval_run}/data/synthetic/val")
    assert len(reader) == 8 and reader.has_embeddings
    samples = list(reader)
    assert [t["key"] for _, t in samples] == sorted(t["key"] for _, t in samples)  # shard order, stable
    image, target = samples[0]
    assert image.shape == (56, 56, 3) and image.dtype == np.uint8
    assert set(np.unique(target["seg"])) <= {0, 1, 2, 3, 4, 255}
    assert (target["depth"][target["valid"]] > 0).all() and target["depth"].max() <= reader.max_depth
    assert len(target["masks"]) == len(target["sentences"]) == target["embeddings"].shape[0] >= 3
    assert [t["key"] for _, t in reader] == [t["key"] for _, t in samples]


def test_registry(tmp_path: Path, eval_run: Path) -> None:
    assert parse_benchmark("ade20k") == ("ade20k", None)
    assert parse_benchmark("NYU=/data/nyu") == ("nyu", "/data/nyu")
    with pytest.raises(ValueError, match="unknown benchmark"):
        parse_benchmark("imagenet")
    bench = open_benchmark("synthetic", str(eval_run))
    assert bench.train is not None and len(bench.train) == 24 and len(bench.eval) == 8
    assert bench.tasks == ("seg", "depth", "refseg")
    root = tmp_path / "refer"
    write_refer(root)
    ref = open_benchmark(f"refcoco={root}", str(eval_run))
    assert ref.train is None and ref.eval.split == "val"
    from versavit.storage import StorageError

    with pytest.raises(StorageError, match="not a folder"):
        open_benchmark(f"kitti={tmp_path / 'nowhere'}", str(eval_run))


def test_synthetic_embeddings_from_the_labelled_copy(tmp_path: Path) -> None:
    """Ground truth comes from the rendered world, text embeddings from the label stage's copy (by key)."""
    import shutil

    from eval_helpers import add_embeddings

    from versavit.config.schema import SyntheticConfig
    from versavit.data.build import build_synthetic
    from versavit.layout import labelled_root, synthetic_root

    build_synthetic(synthetic_root(str(tmp_path)), SyntheticConfig(num_train=2, num_val=3, image_size=40))
    plain = open_benchmark("synthetic", str(tmp_path))
    assert not plain.eval.has_embeddings and "embeddings" not in next(iter(plain.eval))[1]
    labelled = Path(labelled_root(str(tmp_path))) / "val"
    shutil.copytree(Path(synthetic_root(str(tmp_path))) / "val", labelled)
    add_embeddings(str(labelled))
    bench = open_benchmark("synthetic", str(tmp_path))
    assert bench.eval.has_embeddings and bench.eval.url == plain.eval.url and len(bench.train) == 2
    assert bench.eval.digest() == plain.eval.digest()  # same images and truth: the feature cache is reused
    for _, target in bench.eval:
        assert target["embeddings"].shape == (len(target["masks"]), 16)
