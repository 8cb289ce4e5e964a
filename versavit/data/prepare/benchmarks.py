"""The evaluation benchmarks of `versavit data prepare`: ADE20k, Pascal VOC 2012, Cityscapes, NYUv2 and KITTI, read
in the layouts their authors publish and written as versavit shards that the evaluator reads by URL
(`eval.benchmarks: [ade20k=s3://bucket/bench/ade20k]`, one `<url>/<split>/` per split).

A prepared sample:

    rgb.jpg | rgb.png   the image as published: JPEG bytes pass through, PNG stays PNG (no re-encoding loss)
    sem.png             seg benchmarks: uint8 class ids in the benchmark's evaluation convention, 255 = ignore
                        (ADE20k reduce_zero_label, VOC boundaries, Cityscapes labelIds -> trainIds applied here)
    depth.png           depth benchmarks: the published 16-bit codes unchanged, json depth.scale codes per metre
                        (NYUv2 1000, KITTI 256), code 0 = no measurement; caps and eval crops are applied when read
    json                {benchmark, split, key, file, label_file, size: [h, w], labels: {convention, num_classes,
                        ignore_index} | depth: {scale, kind, unit}, focal?}

The label conventions and layout rules live here, in the data layer, and the published-layout readers of
versavit.eval.datasets use the same functions: one definition for both paths. A unit that cannot be read (image
or label missing, truncated or undecodable, sizes that disagree) is skipped and counted by reason.

`write_fixture` writes a tiny stand-in of each published layout (file names, PNG modes and palettes, 16-bit
depth at the published scale, split files with their quirks), rendered from the synthetic world so that
`fixture_truth` knows every label exactly.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from versavit import storage
from versavit.data import codecs
from versavit.data.convert.common import safe_key
from versavit.data.prepare.base import Source

IGNORE_INDEX = 255


class _Skip(Exception):
    """A unit that cannot become a sample; `reason` is its counter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------ label conventions


def ade20k_eval_labels(raw: np.ndarray) -> np.ndarray:
    """ADE20k annotation (0 = other, 1..150) -> 0..149, with 0 and anything above 150 -> 255 (mmsegmentation's
    reduce_zero_label: "other" is not a class of the benchmark)."""
    raw = _single_channel(raw).astype(np.int64)
    out = np.where(raw == 0, IGNORE_INDEX, raw - 1)
    out[raw > 150] = IGNORE_INDEX
    return out.astype(np.uint8)


def voc_eval_labels(raw: np.ndarray) -> np.ndarray:
    """VOC SegmentationClass palette indices: 0..20 are the classes, 255 the boundary band (ignored); any other
    index is not a VOC class and is ignored too."""
    seg = _single_channel(raw).astype(np.int64)
    seg[(seg >= 21) & (seg != IGNORE_INDEX)] = IGNORE_INDEX
    return seg.astype(np.uint8)


# cityscapesscripts/helpers/labels.py: labelId -> trainId (255 = ignoreInEval); ids not listed map to 255
CITYSCAPES_TRAIN_IDS: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}
_CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


def cityscapes_from_label_ids(raw: np.ndarray) -> np.ndarray:
    """*_gtFine_labelIds.png (0..33) -> train ids 0..18, 255 for every class ignored in evaluation (what
    cityscapesscripts' createTrainIdLabelImgs writes as *_labelTrainIds.png)."""
    raw = _single_channel(raw)
    if raw.dtype != np.uint8:
        raise ValueError(f"cityscapes labelIds must be 8-bit, got {raw.dtype}")
    return _CITYSCAPES_LUT[raw]


def cityscapes_eval_labels(raw: np.ndarray) -> np.ndarray:
    """*_gtFine_labelTrainIds.png: 0..18 are the classes, 255 = ignore (other values are ignored too)."""
    seg = _single_channel(raw).astype(np.int64)
    seg[(seg >= 19) & (seg != IGNORE_INDEX)] = IGNORE_INDEX
    return seg.astype(np.uint8)


def _single_channel(raw: np.ndarray) -> np.ndarray:
    if raw.ndim != 2:
        raise ValueError(f"a label map must be single-channel (grey or palette PNG), got shape {raw.shape}")
    return raw


# ------------------------------------------------------------------------------------------ depth conventions


def nyu_eigen_crop(height: int, width: int) -> np.ndarray:
    """NYUv2's evaluation crop (Eigen et al.): rows 45:471, cols 41:601 of 480x640, where the depth sensor's
    frame is valid; resized copies take the same fractions."""
    mask = np.zeros((height, width), bool)
    if (height, width) == (480, 640):
        mask[45:471, 41:601] = True
    else:
        rows = slice(round(45 / 480 * height), round(471 / 480 * height))
        mask[rows, round(41 / 640 * width):round(601 / 640 * width)] = True
    return mask


def kitti_garg_crop(height: int, width: int) -> np.ndarray:
    """KITTI's Garg crop (rows 40.8%..99.2%, cols 3.6%..96.4%): the part of the frame the lidar covers."""
    mask = np.zeros((height, width), bool)
    mask[int(0.40810811 * height):int(0.99189189 * height), int(0.03594771 * width):int(0.96405229 * width)] = True
    return mask


@dataclass(frozen=True)
class DepthLayout:
    """Where a BTS-style depth benchmark keeps its split files, images and 16-bit depth PNGs."""

    name: str
    list_files: dict[str, str]
    image_dirs: dict[str, tuple[str, ...]]  # first existing folder wins
    depth_dirs: dict[str, tuple[str, ...]]  # a depth file is looked up in each, in order
    scale: float  # codes per metre
    min_depth: float
    max_depth: float
    crop: Callable[[int, int], np.ndarray]
    eval_splits: tuple[str, ...] = ("test",)


NYU = DepthLayout(
    name="nyu",
    list_files={"train": "nyudepthv2_train_files_with_gt.txt", "test": "nyudepthv2_test_files_with_gt.txt"},
    image_dirs={"train": ("sync",), "test": ("official_splits/test",)},
    depth_dirs={"train": ("sync",), "test": ("official_splits/test",)},
    scale=1000.0, min_depth=1e-3, max_depth=10.0, crop=nyu_eigen_crop)
# data_depth_annotated.zip unpacks to train/ and val/; BTS merges both into one folder: either works
KITTI = DepthLayout(
    name="kitti",
    list_files={"train": "eigen_train_files_with_gt.txt", "test": "eigen_test_files_with_gt.txt"},
    image_dirs={s: ("raw", "raw_data", "kitti_raw_data") for s in ("train", "test")},
    depth_dirs={s: ("data_depth_annotated", "data_depth_annotated/train", "data_depth_annotated/val")
                for s in ("train", "test")},
    scale=256.0, min_depth=1e-3, max_depth=80.0, crop=kitti_garg_crop)
DEPTH_LAYOUTS = {"nyu": NYU, "kitti": KITTI}

_KITTI_DATE_DRIVE = re.compile(r"\d{4}_\d{2}_\d{2}/\d{4}_\d{2}_\d{2}_drive_\d{4}_sync/.*")
_KITTI_DEPTH = re.compile(r"(?:.*/)?data_depth_annotated/(.*)")


def _relative(path: str, layout: DepthLayout, depth: bool) -> str:
    """A split-file path -> relative to its root. NYUv2's train list starts its paths with "/"; Depth-Anything-V2's
    KITTI lists hold absolute paths (`/mnt/.../raw_data/<date>/<drive>/...`, `/.../data_depth_annotated/val/...`)."""
    if layout.name == "kitti" and path.startswith("/"):
        match = _KITTI_DEPTH.fullmatch(path) if depth else _KITTI_DATE_DRIVE.search(path)
        if match is None:
            raise ValueError(f"kitti: cannot place the absolute path {path!r} (expected .../<date>/<drive>_sync/... "
                             "or .../data_depth_annotated/...)")
        return match.group(1) if depth else match.group(0)
    return path.lstrip("/")


def parse_depth_list(text: str, layout: DepthLayout) -> list[tuple[str, str, float | None]]:
    """A split file's `image depth [focal]` lines -> (image, depth, focal) relative paths. Lines whose depth is
    "None" (KITTI's Eigen test frames without projected lidar) and blank lines are skipped."""
    pairs = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[1] == "None":
            continue
        focal = float(parts[2]) if len(parts) > 2 else None
        pairs.append((_relative(parts[0], layout, False), _relative(parts[1], layout, True), focal))
    return pairs


def first_existing(root: str, candidates: tuple[str, ...]) -> str:
    """The first of `candidates` (folders under root) that exists, else the first."""
    for rel in candidates:
        if storage.exists(storage.join(root, rel)):
            return rel
    return candidates[0]


# ------------------------------------------------------------------------------------------ layouts


ADE20K_SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_LABELS = (  # preferred first: the train-id images createTrainIdLabelImgs writes, else the published ids
    ("_gtFine_labelTrainIds.png", "cityscapes-trainIds", cityscapes_eval_labels),
    ("_gtFine_labelIds.png", "cityscapes-labelIds-to-trainIds", cityscapes_from_label_ids),
)


def descend(root: str, *folders: str) -> str:
    """`root`, or root/<folder> when the archive's top folder was given one level up (ADEChallengeData2016,
    VOCdevkit/VOC2012)."""
    root = root.rstrip("/")
    for folder in folders:
        if storage.exists(storage.join(root, folder)):
            return storage.join(root, folder)
    return root


def ade20k_root(root: str) -> str:
    """The ADEChallengeData2016 folder, given it or the folder the zip was unpacked in."""
    return descend(root, "ADEChallengeData2016")


def voc_root(root: str) -> str:
    """The VOC2012 folder, given it, VOCdevkit/ or the folder the tar was unpacked in."""
    return descend(root, "VOCdevkit/VOC2012", "VOC2012")


def _check_split(name: str, split: str, splits: tuple[str, ...] | dict[str, str]) -> str:
    if split not in splits:
        raise ValueError(f"{name} split must be one of {sorted(splits)}, got {split!r}")
    return splits[split] if isinstance(splits, dict) else split


def _names(url: str, suffix: str) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in storage.list_files(url, suffix)]


def list_ade20k(input_url: str, split: str) -> list[str]:
    """Image stems of images/<split>/*.jpg, sorted."""
    split = _check_split("ade20k", split, ADE20K_SPLITS)
    return [n[:-4] for n in _names(storage.join(ade20k_root(input_url), "images", split), ".jpg")]


def list_voc(input_url: str, split: str) -> list[str]:
    """Image ids of ImageSets/Segmentation/<split>.txt (train, val, trainval), in the file's order."""
    listing = storage.join(voc_root(input_url), "ImageSets", "Segmentation", f"{split}.txt")
    return [line.split()[0] for line in storage.read_text(listing).splitlines() if line.strip()]


def list_cityscapes(input_url: str, split: str) -> list[str]:
    """`<city>/<city>_<seq>_<frame>` of leftImg8bit/<split>/<city>/*_leftImg8bit.png, sorted."""
    _check_split("cityscapes", split, ("train", "val", "test"))
    fs, path = storage.get_fs(storage.join(input_url, "leftImg8bit", split))
    try:
        found = fs.glob(f"{path.rstrip('/')}/*/*{CITYSCAPES_IMAGE_SUFFIX}")
    except Exception as exc:
        raise storage.describe_error(input_url, exc) from exc
    units = []
    for p in found:
        city, name = p.rstrip("/").split("/")[-2:]
        units.append(f"{city}/{name[:-len(CITYSCAPES_IMAGE_SUFFIX)]}")
    return sorted(units)


def _list_depth(layout: DepthLayout, input_url: str, split: str) -> list[list[Any]]:
    _check_split(layout.name, split, tuple(layout.list_files))
    text = storage.read_text(storage.join(input_url, layout.list_files[split]))
    return [[image, depth, focal] for image, depth, focal in parse_depth_list(text, layout)]


def list_nyu(input_url: str, split: str) -> list[list[Any]]:
    """[image, depth, focal] of nyudepthv2_<split>_files_with_gt.txt, in the file's order."""
    return _list_depth(NYU, input_url, split)


def list_kitti(input_url: str, split: str) -> list[list[Any]]:
    """[image, depth, focal] of eigen_<split>_files_with_gt.txt, in the file's order (None lines skipped)."""
    return _list_depth(KITTI, input_url, split)


# ------------------------------------------------------------------------------------------ reading units


def _read(url: str, reason: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except storage.StorageError as exc:
        if exc.fatal:
            raise
        raise _Skip(reason) from None


def image_field(data: bytes) -> tuple[str, bytes, tuple[int, int]]:
    """Image bytes -> (field name, bytes, (h, w)), fully decoded once so truncated files are caught here. JPEG
    and PNG pass through unchanged; anything else becomes a lossless PNG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            size, fmt, mode = (img.height, img.width), img.format, img.mode
            if fmt == "JPEG" and mode in ("RGB", "L"):
                return "rgb.jpg", data, size
            if fmt == "PNG" and mode in ("RGB", "L"):
                return "rgb.png", data, size
            rgb = np.asarray(img.convert("RGB"))
    except Exception:
        raise _Skip("bad_image") from None
    return "rgb.png", codecs.encode_image(rgb, "png"), size


def _label(data: bytes) -> np.ndarray:
    try:
        return codecs.decode_png(data)
    except Exception:
        raise _Skip("bad_label") from None


@dataclass(frozen=True)
class _SegUnit:
    key: str
    image: str  # path relative to the layout root
    labels: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...]  # (path, convention, convert), in order


def _first_label(root: str, labels: tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...]
                 ) -> tuple[np.ndarray, str, str, Callable[[np.ndarray], np.ndarray]]:
    """The first label file of `labels` that exists, decoded: (raw map, file, convention, convert)."""
    for label_file, convention, convert in labels:
        try:
            return _label(_read(storage.join(root, label_file), "missing_label")), label_file, convention, convert
        except _Skip as skip:
            if skip.reason != "missing_label":
                raise
    raise _Skip("missing_label")


def _seg_samples(benchmark: str, num_classes: int, root: str, split: str, units: list[_SegUnit],
                 counts: Counter) -> Iterator[dict[str, Any]]:
    for unit in units:
        counts["records"] += 1
        try:
            name, image, size = image_field(_read(storage.join(root, unit.image), "missing_image"))
            raw, label_file, convention, convert = _first_label(root, unit.labels)
            try:
                seg = convert(raw)
            except ValueError:
                raise _Skip("bad_label") from None
            if seg.shape != size:
                raise _Skip("size_mismatch")
        except _Skip as skip:
            counts[skip.reason] += 1
            continue
        counts["samples"] += 1
        yield {"__key__": safe_key(unit.key), name: image, "sem.png": codecs.encode_png(seg),
               "json": {"benchmark": benchmark, "split": split, "key": unit.key, "file": unit.image,
                        "label_file": label_file, "size": list(size),
                        "labels": {"convention": convention, "num_classes": num_classes,
                                   "ignore_index": IGNORE_INDEX}}}


def read_ade20k(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """ADE20k images + annotations (reduce_zero_label applied)."""
    split = _check_split("ade20k", split, ADE20K_SPLITS)
    seg_units = [_SegUnit(stem, f"images/{split}/{stem}.jpg",
                          ((f"annotations/{split}/{stem}.png", "ade20k-reduce-zero-label", ade20k_eval_labels),))
                 for stem in units]
    yield from _seg_samples("ade20k", 150, ade20k_root(input_url), split, seg_units, counts)


def read_voc(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """VOC JPEGImages + SegmentationClass palette indices (255 boundary kept as ignore)."""
    seg_units = [_SegUnit(i, f"JPEGImages/{i}.jpg", ((f"SegmentationClass/{i}.png", "voc-palette-index",
                                                       voc_eval_labels),)) for i in units]
    yield from _seg_samples("voc2012", 21, voc_root(input_url), split, seg_units, counts)


def cityscapes_label_files(split: str, unit: str) -> tuple[tuple[str, str, Callable[[np.ndarray], np.ndarray]], ...]:
    """The label files of one frame, in preference order, with their conventions."""
    return tuple((f"gtFine/{split}/{unit}{suffix}", convention, convert)
                 for suffix, convention, convert in CITYSCAPES_LABELS)


def read_cityscapes(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """Cityscapes leftImg8bit + gtFine train ids (labelTrainIds, else labelIds mapped to train ids)."""
    seg_units = [_SegUnit(u.rsplit("/", 1)[-1], f"leftImg8bit/{split}/{u}{CITYSCAPES_IMAGE_SUFFIX}",
                          cityscapes_label_files(split, u)) for u in units]
    yield from _seg_samples("cityscapes", 19, input_url.rstrip("/"), split, seg_units, counts)


def depth_codes(data: bytes) -> np.ndarray:
    """A published depth PNG -> its 16-bit codes (8-bit or colour depth maps are refused)."""
    codes = codecs.decode_png(data)
    if codes.ndim != 2 or codes.dtype != np.uint16:
        raise ValueError(f"a depth PNG must be 16-bit single-channel, got {codes.dtype} {codes.shape}")
    return codes


def _depth_samples(layout: DepthLayout, source: str, input_url: str, split: str, units: list[Any],
                   counts: Counter) -> Iterator[dict[str, Any]]:
    root = input_url.rstrip("/")
    image_dir = first_existing(root, layout.image_dirs[split])
    depth_dirs = layout.depth_dirs[split]
    for image_rel, depth_rel, focal in units:
        counts["records"] += 1
        try:
            name, image, size = image_field(_read(storage.join(root, image_dir, image_rel), "missing_image"))
            data = depth_file = None
            for folder in depth_dirs:
                try:
                    depth_file = f"{folder}/{depth_rel}"
                    data = _read(storage.join(root, depth_file), "missing_depth")
                    break
                except _Skip:
                    continue
            if data is None:
                raise _Skip("missing_depth")
            try:
                codes = depth_codes(data)
            except Exception:
                raise _Skip("bad_depth") from None
            if codes.shape != size:
                raise _Skip("size_mismatch")
        except _Skip as skip:
            counts[skip.reason] += 1
            continue
        counts["samples"] += 1
        key = str(Path(image_rel).with_suffix(""))
        meta = {"benchmark": source, "split": split, "key": key, "file": f"{image_dir}/{image_rel}",
                "label_file": depth_file, "size": list(size),
                "depth": {"scale": layout.scale, "kind": "depth", "unit": "m", "invalid_code": 0}}
        if focal is not None:
            meta["focal"] = focal
        yield {"__key__": safe_key(key), name: image, "depth.png": codecs.encode_png(codes), "json": meta}


def read_nyu(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """NYUv2 image + 16-bit depth in millimetres (codes kept, scale 1000)."""
    yield from _depth_samples(NYU, "nyuv2", input_url, split, units, counts)


def read_kitti(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """KITTI raw image + projected-lidar depth (codes kept, scale 256)."""
    yield from _depth_samples(KITTI, "kitti", input_url, split, units, counts)


# ------------------------------------------------------------------------------------------ fixtures

FIXTURE_SIZE = 64
FIXTURE_IMAGES = 3  # per split
# synthetic classes (floor, wall, ball, cube, cylinder) -> stand-in classes, as published and as evaluated
ADE20K_FIXTURE_RAW = (4, 1, 120, 42, 43)  # objectInfo150 indices: floor, wall, ball, box, column
ADE20K_FIXTURE_EVAL = (3, 0, 119, 41, 42)
VOC_FIXTURE = (0, 0, 16, 20, 5)  # background, background, pottedplant, tvmonitor, bottle
CITYSCAPES_FIXTURE_IDS = (7, 11, 24, 26, 17)  # road, building, person, car, pole (labelIds)
CITYSCAPES_FIXTURE_TRAIN = (0, 2, 11, 13, 5)
CITYSCAPES_EGO_ID = 1  # "ego vehicle": the bottom rows of every real frame, ignored in evaluation
_FIXTURE_SPLITS = {"ade20k": {"training": "train", "validation": "val"}, "voc2012": {"train": "train", "val": "val"},
                   "cityscapes": {"train": "train", "val": "val"}, "nyuv2": {"train": "train", "test": "test"},
                   "kitti": {"train": "train", "test": "test"}}
_CITIES = {"train": ("aachen",), "val": ("frankfurt", "lindau")}


def _scene(seed: int, source: str, split: str, index: int) -> Any:
    from versavit.data.synthetic import render_sample

    return render_sample(seed, _FIXTURE_SPLITS[source][split], index, image_size=FIXTURE_SIZE)


def _voc_boundary(instances: np.ndarray) -> np.ndarray:
    """Pixels of an object next to a different instance: VOC marks such a band 255 ("void")."""
    edge = np.zeros(instances.shape, bool)
    diff_v = instances[1:] != instances[:-1]
    diff_h = instances[:, 1:] != instances[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    return edge & (instances > 0)


def _nyu_holes(shape: tuple[int, int]) -> np.ndarray:
    """Where the stand-in NYUv2 depth has no measurement (code 0): a block, like the sensor's shadows."""
    holes = np.zeros(shape, bool)
    holes[4:10, 6:14] = True
    return holes


def _kitti_points(shape: tuple[int, int], index: int) -> np.ndarray:
    """Where the stand-in KITTI depth has a lidar point: sparse, lower part of the frame only."""
    rng = np.random.default_rng([7, index])
    points = rng.random(shape) < 0.3
    points[: int(0.35 * shape[0])] = False
    return points


def fixture_truth(source: str, seed: int, split: str, index: int) -> dict[str, Any]:
    """What the fixture's sample `index` of `split` holds, in the evaluation convention: "image" (as rendered),
    "seg" (uint8, 255 = ignore) or "depth" (exact metres) + "valid" (where the published file has a measurement),
    and "key" (the published-layout reader's key)."""
    scene = _scene(seed, source, split, index)
    out: dict[str, Any] = {"image": scene.image}
    if source == "ade20k":
        seg = np.asarray(ADE20K_FIXTURE_EVAL, np.uint8)[scene.semantic]
        seg[scene.instances == 1] = IGNORE_INDEX  # the first object is "other" (0) in the annotation
        prefix = "train" if split == "training" else "val"
        out.update(seg=seg, key=f"ADE_{prefix}_{index + 1:08d}")
    elif source == "voc2012":
        seg = np.asarray(VOC_FIXTURE, np.uint8)[scene.semantic]
        seg[_voc_boundary(scene.instances)] = IGNORE_INDEX
        out.update(seg=seg, key=_voc_id(split, index))
    elif source == "cityscapes":
        seg = np.asarray(CITYSCAPES_FIXTURE_TRAIN, np.uint8)[scene.semantic]
        seg[-4:] = IGNORE_INDEX  # ego vehicle
        out.update(seg=seg, key=_cityscapes_base(split, index)[1])
    elif source == "nyuv2":
        valid = ~_nyu_holes(scene.depth.shape)
        out.update(depth=scene.depth, valid=valid, key=f"{_nyu_scene(index)}/rgb_{index:05d}")
    elif source == "kitti":
        frame = _kitti_frame(split, index)
        out.update(depth=scene.depth, valid=_kitti_points(scene.depth.shape, frame), key=_kitti_image(frame)[:-4])
    else:
        raise ValueError(f"no benchmark fixture for {source!r}")
    return out


def _png(path: Path, array: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


def _jpg(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(codecs.encode_image(rgb, "jpg"))


def voc_palette() -> list[int]:
    """The VOC colour map (bit-interleaved), as SegmentationClass PNGs carry it."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _voc_id(split: str, index: int) -> str:
    return f"{2007 if split == 'train' else 2008}_{index + 1:06d}"


def _cityscapes_base(split: str, index: int) -> tuple[str, str]:
    cities = _CITIES["val" if split == "val" else "train"]
    city = cities[index % len(cities)]
    return city, f"{city}_{index:06d}_{19 + index:06d}"


def _nyu_scene(index: int) -> str:
    return ("bathroom", "kitchen_0028b")[index % 2]


def _kitti_frame(split: str, index: int) -> int:
    """Test frames are others than the training ones (10 + i)."""
    return index + (10 if split == "test" else 0)


def _kitti_image(index: int) -> str:
    return f"2011_09_26/2011_09_26_drive_{index % 2 + 1:04d}_sync/image_02/data/{index:010d}.png"


def write_ade20k_fixture(folder: Path, seed: int) -> None:
    """ADEChallengeData2016/{images,annotations}/{training,validation}: JPEGs + mode-L annotations (0 = other)."""
    root = folder / "ADEChallengeData2016"
    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(FIXTURE_IMAGES):
            scene = _scene(seed, "ade20k", split, i)
            stem = f"ADE_{prefix}_{i + 1:08d}"
            raw = np.asarray(ADE20K_FIXTURE_RAW, np.uint8)[scene.semantic]
            raw[scene.instances == 1] = 0
            _jpg(root / "images" / split / f"{stem}.jpg", scene.image)
            _png(root / "annotations" / split / f"{stem}.png", raw, "L")


def write_voc_fixture(folder: Path, seed: int) -> None:
    """VOCdevkit/VOC2012: JPEGImages, SegmentationClass palette PNGs (255 boundary band), ImageSets/Segmentation."""
    root = folder / "VOCdevkit" / "VOC2012"
    palette = voc_palette()
    for split in ("train", "val"):
        ids = []
        for i in range(FIXTURE_IMAGES):
            scene = _scene(seed, "voc2012", split, i)
            name = _voc_id(split, i)
            seg = np.asarray(VOC_FIXTURE, np.uint8)[scene.semantic]
            seg[_voc_boundary(scene.instances)] = IGNORE_INDEX
            _jpg(root / "JPEGImages" / f"{name}.jpg", scene.image)
            _png(root / "SegmentationClass" / f"{name}.png", seg, "P", palette)
            ids.append(name)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "ImageSets" / "Segmentation" / "trainval.txt").write_text(
        "\n".join(_voc_id(s, i) for s in ("train", "val") for i in range(FIXTURE_IMAGES)) + "\n")


def write_cityscapes_fixture(folder: Path, seed: int) -> None:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_{labelIds,instanceIds}.png as
    the gtFine zip ships them (no labelTrainIds: createTrainIdLabelImgs makes those; this source maps labelIds)."""
    for split in ("train", "val"):
        for i in range(FIXTURE_IMAGES):
            scene = _scene(seed, "cityscapes", split, i)
            city, base = _cityscapes_base(split, i)
            label_ids = np.asarray(CITYSCAPES_FIXTURE_IDS, np.uint8)[scene.semantic]
            label_ids[-4:] = CITYSCAPES_EGO_ID
            instance_ids = label_ids.astype(np.uint16)
            things = np.isin(label_ids, (24, 26)) & (scene.instances > 0)  # person, car: id * 1000 + k
            instance_ids[things] = label_ids[things].astype(np.uint16) * 1000 + scene.instances[things]
            _png(folder / "leftImg8bit" / split / city / f"{base}{CITYSCAPES_IMAGE_SUFFIX}", scene.image)
            _png(folder / "gtFine" / split / city / f"{base}_gtFine_labelIds.png", label_ids, "L")
            _png(folder / "gtFine" / split / city / f"{base}_gtFine_instanceIds.png", instance_ids)


def write_nyu_fixture(folder: Path, seed: int) -> None:
    """BTS layout: split files (the train list's paths start with "/", as published), official_splits/test/ and
    sync/ with rgb_XXXXX.jpg + sync_depth_XXXXX.png (16-bit millimetres, 0 = no depth)."""
    for split in ("train", "test"):
        lines = []
        for i in range(FIXTURE_IMAGES):
            scene = _scene(seed, "nyuv2", split, i)
            scene_dir = _nyu_scene(i)
            codes = np.clip(np.rint(scene.depth * NYU.scale), 1, 65535).astype(np.uint16)
            codes[_nyu_holes(codes.shape)] = 0
            base = folder / NYU.image_dirs[split][0] / scene_dir
            _jpg(base / f"rgb_{i:05d}.jpg", scene.image)
            _png(base / f"sync_depth_{i:05d}.png", codes)
            lead = "/" if split == "train" else ""
            lines.append(f"{lead}{scene_dir}/rgb_{i:05d}.jpg {lead}{scene_dir}/sync_depth_{i:05d}.png 518.8579")
        (folder / NYU.list_files[split]).write_text("\n".join(lines) + "\n")


def write_kitti_fixture(folder: Path, seed: int) -> None:
    """raw/<date>/<drive>/image_02/data/*.png, data_depth_annotated/{train,val}/<drive>/proj_depth/groundtruth/
    image_02/*.png (sparse 16-bit, metres * 256) and the Eigen split files, with a "None" test line as published."""
    for split in ("train", "test"):
        lines = []
        for i in range(FIXTURE_IMAGES):
            index = _kitti_frame(split, i)
            scene = _scene(seed, "kitti", split, i)
            image_rel = _kitti_image(index)
            drive = image_rel.split("/")[1]
            depth_rel = f"{drive}/proj_depth/groundtruth/image_02/{index:010d}.png"
            codes = np.zeros(scene.depth.shape, np.uint16)
            points = _kitti_points(codes.shape, index)
            codes[points] = np.clip(np.rint(scene.depth[points] * KITTI.scale), 1, 65535).astype(np.uint16)
            _png(folder / "raw" / image_rel, scene.image)
            part = "train" if i % 2 == 0 else "val"  # the depth zip's two halves
            _png(folder / "data_depth_annotated" / part / depth_rel, codes)
            lines.append(f"{image_rel} {depth_rel} 721.5377")
        if split == "test":  # a frame without projected lidar: listed with depth "None", skipped
            lines.append(f"{_kitti_image(99)} None 721.5377")
        (folder / KITTI.list_files[split]).write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ the sources


# the dense benchmarks (seg / depth maps); DA-2K, NAVI, SPair-71k and COCO Karpathy live in modules of their own,
# which use the helpers above, and join these in versavit.data.prepare.BENCHMARK_SOURCES
DENSE_SOURCES: list[Source] = [
    Source(
        name="ade20k", kind="benchmark", tasks=("seg",), splits=("validation", "training"),
        about="ADE20k SceneParsing (150 classes): ADEChallengeData2016.zip (923 MB, "
        "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip), unzipped; --input is "
        "ADEChallengeData2016/ or the folder holding it: images/{training,validation}/ADE_*.jpg + "
        "annotations/{training,validation}/ADE_*.png (mode L, 0 = other, 1..150). 20,210 training / 2,000 "
        "validation images (~1 GB of shards); labels stored reduced (1..150 -> 0..149, 0 -> 255 ignore).",
        list_units=list_ade20k, read_units=read_ade20k, write_fixture=write_ade20k_fixture, units_per_shard=256),
    Source(
        name="voc2012", kind="benchmark", tasks=("seg",), splits=("val", "train", "trainval"),
        about="PASCAL VOC 2012 segmentation (21 classes incl. background): VOCtrainval_11-May-2012.tar (1.9 GB, "
        "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/), extracted; --input is the folder holding VOCdevkit/ "
        "(or VOCdevkit/, or VOC2012/): JPEGImages/*.jpg + SegmentationClass/*.png (palette PNG: index = class, "
        "255 = boundary, ignored) + ImageSets/Segmentation/{train,val}.txt. 1,464 train / 1,449 val images "
        "(~200 MB of shards); SBD's augmented training set is not part of this source.",
        list_units=list_voc, read_units=read_voc, write_fixture=write_voc_fixture, units_per_shard=256),
    Source(
        name="cityscapes", kind="benchmark", tasks=("seg",), splits=("val", "train"),
        about="Cityscapes fine annotations (19 train ids): leftImg8bit_trainvaltest.zip (11 GB) + "
        "gtFine_trainvaltest.zip (241 MB) from https://www.cityscapes-dataset.com (login), unzipped side by side; "
        "--input holds leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and gtFine/{train,val}/<city>/"
        "*_gtFine_labelIds.png (*_labelTrainIds.png used instead where createTrainIdLabelImgs made them; "
        "labelIds are mapped to train ids here, 255 = ignore). 2,975 train / 500 val frames at 2048x1024 (~6.5 GB "
        "of shards: images stay PNG).",
        list_units=list_cityscapes, read_units=read_cityscapes, write_fixture=write_cityscapes_fixture,
        units_per_shard=64),
    Source(
        name="nyuv2", kind="benchmark", tasks=("depth",), splits=("test", "train"),
        about="NYU Depth V2, Eigen split in the BTS/ZoeDepth layout: nyudepthv2_{train,test}_files_with_gt.txt "
        "(train_test_inputs/ of github.com/cleinc/bts or isl-org/ZoeDepth) + official_splits/test/<scene>/"
        "{rgb_XXXXX.jpg, sync_depth_XXXXX.png} (654 test pairs, extracted from nyu_depth_v2_labeled.mat (2.8 GB) "
        "with BTS's extract_official_train_test_set_from_mat.py) + sync/<scene>/... (24,231 training pairs, BTS's "
        "sync.zip, roughly 30 GB). 480x640, depth 16-bit millimetres (0 = none), kept as published (scale 1000).",
        list_units=list_nyu, read_units=read_nyu, write_fixture=write_nyu_fixture, units_per_shard=256),
    Source(
        name="kitti", kind="benchmark", tasks=("depth",), splits=("test", "train"),
        about="KITTI depth, Eigen split in the BTS/ZoeDepth layout: eigen_{train,test}_files_with_gt.txt "
        "(train_test_inputs/ of github.com/cleinc/bts; Depth-Anything-V2's absolute-path lists work too) + "
        "raw/<date>/<drive>/image_02/data/*.png (KITTI raw sync+rectified drives, ~180 GB for all, only listed "
        "frames are read) + data_depth_annotated/{train,val}/<drive>/proj_depth/groundtruth/image_02/*.png "
        "(data_depth_annotated.zip, 14 GB; 16-bit, metres * 256, 0 = no lidar point). Test: 697 lines, 652 with "
        "ground truth (the 45 'None' lines are skipped); ~23k training frames.",
        list_units=list_kitti, read_units=read_kitti, write_fixture=write_kitti_fixture, units_per_shard=128),
]
