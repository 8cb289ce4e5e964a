"""COCO-Stuff 164K as referring segmentation: each class present in an image becomes one query (its mask, its name).

The published layout (github.com/nightrome/cocostuff, README "Downloads" and "Setup"): the COCO 2017 images
(train2017.zip 118K images / 18 GB, val2017.zip 5K / 1 GB) unpacked into `images/`, and
stuffthingmaps_trainval2017.zip (659 MB) unpacked into `annotations/`:

    <input>/images/train2017/000000000009.jpg          <input>/annotations/train2017/000000000009.png
    <input>/images/val2017/...                          <input>/annotations/val2017/...

A stuff-thing map is an 8-bit single-channel ("indexed") PNG of the image's size: values 0..181 index the
classes of labels.txt shifted by one (labels.txt's 0 is "unlabeled"; map 0 = labels.txt 1 "person"), things
0-90, stuff 91-181, and 255 = unlabeled. Eleven thing indices never occur (COCO has no masks for them: street
sign, hat, shoe, eye glasses, plate, mirror, window, desk, door, blender, hair brush). The annotation folder is
also found as `stuffthingmaps_trainval2017/<split>2017` or `stuffthingmaps/<split>2017`; the images as
`<split>2017/` when `images/` is absent. Names below are nightrome/cocostuff's labels.txt (the 182 classes).

One sample per image with a label map: the image (JPEG bytes untouched) and `objects`, one per class whose area
is at least `MIN_AREA_FRACTION` of the image, in class-index order, each {id, label (the COCO-Stuff name),
category_id (map index), expression, bbox, area, segmentation (COCO RLE)}. The expression is the class name
with COCO-Stuff's disambiguating suffix dropped ("wall-other" -> "wall", "desk-stuff" -> "desk") and hyphens
as spaces ("floor-wood" -> "floor wood"). Unlabelled pixels (255) belong to no mask. That is the objects + RLE
refseg format SA-1B's samples use: `PreparedRefSeg` reads every object as a query, the refseg training view
draws one per pass, and `versavit label embed` embeds one row per object.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from versavit import storage
from versavit.data import codecs
from versavit.data.convert import synth
from versavit.data.convert.common import SkipRecord, first_existing, image_jpeg, safe_key

# labels.txt of nightrome/cocostuff without its 0 "unlabeled": COCO_STUFF_CLASSES[v] names map value v
COCO_STUFF_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "street sign", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "hat", "backpack", "umbrella", "shoe", "eye glasses",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "mirror", "dining table", "window", "desk",
    "toilet", "door", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff: 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain",
    "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other",
    "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin",
    "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing",
    "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other",
    "skyscraper", "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
    "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
assert len(COCO_STUFF_CLASSES) == 182
NUM_THINGS = 91  # map values 0..90 are things, 91..181 stuff
UNLABELED = 255
MIN_AREA_FRACTION = 0.001  # a class covering less of the image is no query (a few stray pixels, not a region)
SPLITS = {"train": "train2017", "val": "val2017"}
_LABEL_DIRS = ("annotations/{s}", "stuffthingmaps_trainval2017/{s}", "stuffthingmaps/{s}")
_IMAGE_DIRS = ("images/{s}", "{s}")


def stuff_expression(name: str) -> str:
    """A COCO-Stuff class name as a referring expression: "wall-other" -> "wall", "floor-wood" -> "floor wood"."""
    return name.removesuffix("-other").removesuffix("-stuff").replace("-", " ")


def _folders(input_url: str, split: str) -> tuple[str, str]:
    """(label folder, image folder) URLs of `split` under the input (the first candidate that exists)."""
    if split not in SPLITS:
        raise ValueError(f"coco-stuff split must be one of {sorted(SPLITS)}, got {split!r}")
    year = SPLITS[split]
    labels = first_existing(input_url, [d.format(s=year) for d in _LABEL_DIRS])
    images = first_existing(input_url, [d.format(s=year) for d in _IMAGE_DIRS])
    if labels is None or images is None:
        what = "stuff-thing maps" if labels is None else "images"
        raise storage.StorageError(
            f"coco-stuff: no {what} for {split} under {input_url}: expected <input>/images/{year}/*.jpg and "
            f"<input>/annotations/{year}/*.png (stuffthingmaps_trainval2017.zip unpacked into annotations/)",
            kind="missing")
    return labels, images


def list_coco_stuff(input_url: str, split: str) -> list[str]:
    """Stems of the split's stuff-thing maps (<label folder>/<stem>.png), sorted: images without one are not
    annotated."""
    labels, _ = _folders(input_url, split)
    return sorted(u.rsplit("/", 1)[-1][:-4] for u in storage.list_files(labels, ".png"))


def class_queries(labels: np.ndarray, min_area: int) -> tuple[list[dict[str, Any]], int]:
    """A stuff-thing map -> (one object per class of at least `min_area` pixels, in class order; the number of
    classes dropped as smaller). 255 and values outside 0..181 belong to no class."""
    objects: list[dict[str, Any]] = []
    dropped = 0
    values, areas = np.unique(labels, return_counts=True)
    for value, area in zip(values.tolist(), areas.tolist(), strict=True):
        if value >= len(COCO_STUFF_CLASSES):  # 255 unlabeled (any other value is not a class either)
            continue
        if area < min_area:
            dropped += 1
            continue
        mask = labels == value
        rows, cols = np.nonzero(mask)
        name = COCO_STUFF_CLASSES[value]
        objects.append({"id": len(objects) + 1, "label": name, "category_id": int(value),
                        "kind": "thing" if value < NUM_THINGS else "stuff", "expression": stuff_expression(name),
                        "bbox": [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)],
                        "area": int(area), "segmentation": codecs.encode_rle(mask)})
    return objects, dropped


def read_coco_stuff(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """Image + stuff-thing map of each stem -> a sample with one object per class present (see the module doc)."""
    label_dir, image_dir = _folders(input_url, split)
    for stem in units:
        counts["records"] += 1
        try:
            try:
                label_bytes = storage.read_bytes(storage.join(label_dir, f"{stem}.png"))
            except storage.StorageError as exc:
                if exc.fatal:
                    raise
                raise SkipRecord("missing_label") from None
            try:
                image = storage.read_bytes(storage.join(image_dir, f"{stem}.jpg"))
            except storage.StorageError as exc:
                if exc.fatal:
                    raise
                raise SkipRecord("missing_image") from None
            jpeg, (h, w) = image_jpeg(image)
            try:
                labels = codecs.decode_png(label_bytes)
            except Exception:
                raise SkipRecord("bad_label") from None
            if labels.ndim != 2 or labels.dtype != np.uint8:
                raise SkipRecord("bad_label")
            if labels.shape != (h, w):
                raise SkipRecord("size_mismatch")
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        objects, dropped = class_queries(labels, max(1, round(MIN_AREA_FRACTION * h * w)))
        if dropped:
            counts["small_class_dropped"] += dropped
        if not objects:
            counts["no_objects"] += 1
            continue
        yield {"__key__": safe_key("coco-stuff", stem), "rgb.jpg": jpeg,
               "json": {"source": "coco-stuff", "split": split, "image_id": int(stem) if stem.isdigit() else stem,
                        "file_name": f"{SPLITS[split]}/{stem}.jpg", "size": [h, w], "objects": objects}}


# ------------------------------------------------------------------------------------ fixture

# the synthetic world's classes (versavit.data.synthetic.CLASSES: floor, wall, ball, cube, cylinder) as COCO-Stuff
# map values: floor-other, wall-other, sports ball, cardboard, cup
FIXTURE_CLASS_MAP: tuple[int, ...] = (COCO_STUFF_CLASSES.index("floor-other"),
                                      COCO_STUFF_CLASSES.index("wall-other"),
                                      COCO_STUFF_CLASSES.index("sports ball"),
                                      COCO_STUFF_CLASSES.index("cardboard"),
                                      COCO_STUFF_CLASSES.index("cup"))
FIXTURE_SPLITS = {"train": range(0, 6), "val": range(6, 8)}
FIXTURE_UNLABELED_ROWS = 3  # the top rows of every map are left unlabelled (255)
FIXTURE_SPECK = (COCO_STUFF_CLASSES.index("sky-other"), 2)  # a 2x2 speck of sky in image 0: below the min area


def fixture_stem(index: int) -> str:
    """COCO 2017 file names: the image id, zero-padded to 12 digits."""
    return f"{139 + 16 * index:012d}"


def fixture_labels(seed: int, index: int) -> np.ndarray:
    """The stuff-thing map the fixture writes for scene `index`: the scene's classes mapped to COCO-Stuff,
    the top rows unlabelled, and image 0's speck of sky."""
    s = synth.scene(seed, index)
    labels = np.asarray(FIXTURE_CLASS_MAP, np.uint8)[s.semantic]
    labels[:FIXTURE_UNLABELED_ROWS] = UNLABELED
    if index == 0:
        value, side = FIXTURE_SPECK
        labels[-side:, -side:] = value
    return labels


def write_coco_stuff_fixture(folder: Path, seed: int) -> None:
    """nightrome/cocostuff's setup layout: images/{train,val}2017/<id>.jpg and annotations/{train,val}2017/<id>.png
    (8-bit grey maps, as stuffthingmaps_trainval2017.zip holds them); six train and two val images."""
    for split, indices in FIXTURE_SPLITS.items():
        year = SPLITS[split]
        for i in indices:
            stem = fixture_stem(i)
            synth.write(folder / "images" / year / f"{stem}.jpg", synth.jpeg(synth.scene(seed, i)))
            path = folder / "annotations" / year / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fixture_labels(seed, i)).save(path)  # uint8 2-D: mode L
