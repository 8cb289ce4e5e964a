"""Boxes from detection and grounding datasets -> task shards (objects with boxes, masks by SAM later).

- `convert_coco_detection`: COCO-style detection JSON (Objects365, COCO): `images`, `annotations`
  (bbox x, y, w, h in pixels; category_id; optional segmentation), `categories`. One sample per
  image; objects carry the class name as `label` (the describer's fallback text).
- `convert_grit`: GRIT-style grounded captions: one record per image with `caption` and
  `ref_exps` (or `noun_chunks`) = [[char_start, char_end, x0, y0, x1, y1, score], ...] with
  boxes normalised to [0, 1]; each phrase becomes an object whose expression is caption[start:end].
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from versavit.data.convert.common import (
    SkipRecord,
    clip_box,
    image_jpeg,
    iter_records,
    load_image,
    read_json,
    safe_key,
    write_dataset,
    xywh_to_xyxy,
)
from versavit.data.shards import Manifest


def coco_segmentation_rle(segmentation: Any, height: int, width: int) -> dict[str, Any] | None:
    """COCO polygons / uncompressed RLE / compressed RLE -> compressed RLE {"size", "counts": str}."""
    from pycocotools import mask as mask_utils

    if not segmentation:
        return None
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes)
            else counts}


def _coco_samples(data: dict, images_url: str, source: str, counts: Counter, keep_crowd: bool,
                  skip_empty: bool, keep_masks: bool, limit: int | None) -> Iterator[dict]:
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in data.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    written = 0
    for image in sorted(data["images"], key=lambda im: im["id"]):
        if limit is not None and written >= limit:
            return
        anns = sorted(by_image.get(image["id"], []), key=lambda a: a.get("id", 0))
        crowd = sum(bool(a.get("iscrowd")) for a in anns)
        if not keep_crowd:
            counts["crowd_dropped"] += crowd
            anns = [a for a in anns if not a.get("iscrowd")]
        try:
            jpeg, (h, w) = image_jpeg(load_image(image["file_name"], images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        objects = []
        for ann in anns:
            box = clip_box(xywh_to_xyxy(ann["bbox"]), h, w)
            if box is None:
                counts["empty_box_dropped"] += 1
                continue
            obj = {"id": len(objects) + 1, "bbox": box, "label": names.get(ann["category_id"], "object"),
                   "category_id": ann["category_id"], "ann_id": ann.get("id"), "area": ann.get("area"),
                   "iscrowd": int(bool(ann.get("iscrowd")))}
            if keep_masks and (rle := coco_segmentation_rle(ann.get("segmentation"), h, w)):
                obj["segmentation"] = rle
            objects.append(obj)
        if skip_empty and not objects:
            counts["no_objects"] += 1
            continue
        written += 1
        yield {"__key__": safe_key(source, image["id"]), "rgb.jpg": jpeg,
               "json": {"source": source, "image_id": image["id"], "file_name": image["file_name"],
                        "size": [h, w], "objects": objects}}


def convert_coco_detection(annotations_url: str, images_url: str, output_url: str, *, source: str = "objects365",
                           samples_per_shard: int = 256, keep_crowd: bool = False, skip_empty: bool = True,
                           keep_masks: bool = False, limit: int | None = None) -> Manifest:
    """COCO-style detection JSON + image folder -> shards with `objects` (boxes + class labels).

    `keep_masks` also stores annotation masks (COCO) as RLE; Objects365 has none (SAM adds them).
    """
    data = read_json(annotations_url)
    counts: Counter = Counter()
    samples = _coco_samples(data, images_url, source, counts, keep_crowd, skip_empty, keep_masks, limit)
    meta = {"convert": {"format": "coco-detection", "annotations": annotations_url, "images": images_url}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)


def _grit_samples(records_url: str, images_url: str | None, source: str, counts: Counter, min_score: float,
                  use_noun_chunks: bool) -> Iterator[dict]:
    for rec in iter_records(records_url):
        key = str(rec.get("key") or rec.get("id") or counts["records"])
        counts["records"] += 1
        caption = rec.get("caption") or ""
        try:
            ref = rec.get("image") or rec.get("jpg") or rec.get("image_path") or f"{key}.jpg"
            jpeg, (h, w) = image_jpeg(load_image(ref, images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        spans = rec.get("ref_exps") or (rec.get("noun_chunks") if use_noun_chunks else None) or []
        objects = []
        for span in spans:
            start, end, x0, y0, x1, y1 = span[:6]
            score = float(span[6]) if len(span) > 6 else 1.0
            phrase = caption[int(start):int(end)].strip()
            box = clip_box([x0 * w, y0 * h, x1 * w, y1 * h], h, w)
            if not phrase or box is None or score < min_score:
                counts["phrases_dropped"] += 1
                continue
            objects.append({"id": len(objects) + 1, "bbox": box, "expression": phrase, "score": round(score, 4)})
        if not objects:
            counts["no_objects"] += 1
            continue
        yield {"__key__": safe_key(source, key), "rgb.jpg": jpeg,
               "json": {"source": source, "key": key, "caption": caption, "size": [h, w], "objects": objects}}


def convert_grit(records_url: str, output_url: str, images_url: str | None = None, *, source: str = "grit",
                 samples_per_shard: int = 256, min_score: float = 0.0, use_noun_chunks: bool = False) -> Manifest:
    """GRIT-style records (jsonl/json/parquet, or a folder of them) -> shards of phrase-grounded objects.

    The image of a record is its `image`/`jpg` field (bytes or path) or `<images_url>/<key>.jpg`.
    Phrases come from `ref_exps` (referring expressions; `noun_chunks` too with use_noun_chunks).
    """
    counts: Counter = Counter()
    samples = _grit_samples(records_url, images_url, source, counts, min_score, use_noun_chunks)
    meta = {"convert": {"format": "grit", "records": records_url, "images": images_url}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)
