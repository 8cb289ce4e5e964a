"""Ready-made masks -> task shards: SA-1B per-image JSON, RefCOCO-family refs + instances.

- `convert_sa1b`: a folder of `sa_N.jpg` + `sa_N.json` pairs (the SA-1B tar's contents). Each
  JSON holds `image` {image_id, width, height, file_name} and `annotations` [{id, segmentation
  (compressed RLE), bbox (x, y, w, h), area, predicted_iou, stability_score, ...}]. One sample per
  image; masks stay RLE in the objects (they overlap, so no instance map). Annotations with a
  `description`/`caption` (SA-1B-DAM style) get it as their expression.
- `convert_refcoco`: `refs(<split_by>).p` (pickle, as released; a JSON list works too) + COCO
  `instances.json` + the COCO image folder. One sample per (ref, sentence): `mask.png` of the
  referred object, json `expression`, and a one-object `objects` list.
"""

from __future__ import annotations

import io
import pickle
from collections import Counter
from collections.abc import Iterator

import numpy as np

from versavit import storage
from versavit.data import codecs
from versavit.data.convert.common import (
    SkipRecord,
    clip_box,
    image_jpeg,
    load_image,
    read_json,
    safe_key,
    write_dataset,
    xywh_to_xyxy,
)
from versavit.data.convert.detection import coco_segmentation_rle
from versavit.data.shards import Manifest


def _sa1b_samples(input_url: str, source: str, counts: Counter, min_predicted_iou: float,
                  limit: int | None) -> Iterator[dict]:
    written = 0
    for url in storage.list_files(input_url, ".json"):
        if limit is not None and written >= limit:
            return
        counts["records"] += 1
        try:
            data = read_json(url)
            info = data["image"]
            jpeg, (h, w) = image_jpeg(load_image(info["file_name"], input_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        except (KeyError, ValueError):  # unreadable or incomplete JSON: nothing to convert
            counts["bad_json"] += 1
            continue
        objects = []
        for ann in sorted(data.get("annotations", []), key=lambda a: a.get("id", 0)):
            rle = ann.get("segmentation")
            if not isinstance(rle, dict) or list(rle.get("size", [])) != [h, w]:
                counts["bad_mask_dropped"] += 1
                continue
            if float(ann.get("predicted_iou", 1.0)) < min_predicted_iou:
                counts["low_iou_dropped"] += 1
                continue
            box = clip_box(xywh_to_xyxy(ann["bbox"]), h, w)
            if box is None:
                counts["empty_box_dropped"] += 1
                continue
            obj = {"id": len(objects) + 1, "bbox": box, "segmentation": coco_segmentation_rle(rle, h, w),
                   "area": ann.get("area"), "ann_id": ann.get("id"),
                   "predicted_iou": ann.get("predicted_iou"), "stability_score": ann.get("stability_score")}
            text = ann.get("description") or ann.get("caption")
            if text:
                obj["expression"] = str(text).strip()
            objects.append(obj)
        if not objects:
            counts["no_objects"] += 1
            continue
        written += 1
        yield {"__key__": safe_key(source, info.get("image_id", url.rsplit("/", 1)[-1][:-5])), "rgb.jpg": jpeg,
               "json": {"source": source, "image_id": info.get("image_id"), "size": [h, w], "objects": objects}}


def convert_sa1b(input_url: str, output_url: str, *, source: str = "sa1b", samples_per_shard: int = 64,
                 min_predicted_iou: float = 0.0, limit: int | None = None) -> Manifest:
    """A folder of SA-1B image + per-image JSON pairs -> shards with RLE-masked objects."""
    counts: Counter = Counter()
    samples = _sa1b_samples(input_url, source, counts, min_predicted_iou, limit)
    meta = {"convert": {"format": "sa1b", "input": input_url}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)


def load_refs(refs_url: str) -> list[dict]:
    """RefCOCO refs: the released pickle (refs(unc).p etc.), or the same list as JSON.

    The pickle is unpickled: only point this at the official files or files you made.
    """
    data = storage.read_bytes(refs_url)
    if refs_url.endswith(".json"):
        import json

        return json.loads(data)
    return pickle.load(io.BytesIO(data))


def _refcoco_samples(refs: list[dict], instances: dict, images_url: str, source: str, splits: set[str] | None,
                     counts: Counter) -> Iterator[dict]:
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    names = {c["id"]: c["name"] for c in instances.get("categories", [])}
    cache: dict[int, tuple[bytes, tuple[int, int]] | SkipRecord] = {}
    for ref in sorted(refs, key=lambda r: r["ref_id"]):
        if splits is not None and ref.get("split") not in splits:
            counts["other_split"] += 1
            continue
        ann, image = anns.get(ref["ann_id"]), images.get(ref["image_id"])
        if ann is None or image is None:
            counts["dangling_ref"] += 1
            continue
        if image["id"] not in cache:  # refs of one image are adjacent-ish: keep the last few decoded
            if len(cache) > 64:
                cache.clear()
            try:
                cache[image["id"]] = image_jpeg(load_image(image["file_name"], images_url))
            except SkipRecord as skip:
                cache[image["id"]] = skip
        got = cache[image["id"]]
        if isinstance(got, SkipRecord):
            counts[got.reason] += len(ref.get("sentences", []))
            continue
        jpeg, (h, w) = got
        rle = coco_segmentation_rle(ann.get("segmentation"), h, w)
        box = clip_box(xywh_to_xyxy(ann["bbox"]), h, w)
        if rle is None or box is None:
            counts["no_mask"] += 1
            continue
        mask_png = codecs.encode_png(codecs.decode_rle(rle).astype(np.uint8) * 255)
        label = names.get(ref.get("category_id", ann.get("category_id")), "object")
        for j, sent in enumerate(ref.get("sentences", [])):
            text = (sent.get("sent") or sent.get("raw") or "").strip()
            if not text:
                counts["empty_sentence"] += 1
                continue
            obj = {"id": 1, "bbox": box, "label": label, "expression": text, "ann_id": ann["id"]}
            yield {"__key__": safe_key(source, ref["ref_id"], sent.get("sent_id", j)), "rgb.jpg": jpeg,
                   "mask.png": mask_png,
                   "json": {"source": source, "expression": text, "ref_id": ref["ref_id"],
                            "image_id": image["id"], "split": ref.get("split"), "size": [h, w],
                            "objects": [obj]}}


def convert_refcoco(refs_url: str, instances_url: str, images_url: str, output_url: str, *,
                    source: str = "refcoco", splits: tuple[str, ...] | None = ("train",),
                    samples_per_shard: int = 256) -> Manifest:
    """RefCOCO / RefCOCO+ / RefCOCOg refs + COCO instances -> one sample per referring sentence.

    `splits` keeps refs of those splits only (None: all); val/test belong to evaluation.
    """
    counts: Counter = Counter()
    samples = _refcoco_samples(load_refs(refs_url), read_json(instances_url), images_url, source,
                               set(splits) if splits is not None else None, counts)
    meta = {"convert": {"format": "refcoco", "refs": refs_url, "instances": instances_url, "images": images_url,
                        "splits": list(splits) if splits is not None else None}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)
