"""Boxes from detection and grounding datasets -> samples with objects (boxes; masks come from SAM later).

- COCO-style detection JSON (Objects365, COCO): `images`, `annotations` (bbox x, y, w, h in pixels;
  category_id; optional segmentation), `categories`. One sample per image; objects carry the class name
  as `label` (the describer's fallback text). `objects365_*`: the Objects365 v2 release layout.
- GRIT (Kosmos-2's grounded captions): one record per image with `caption` and `ref_exps` (or
  `noun_chunks`) = [[char_start, char_end, x0, y0, x1, y1, score], ...], boxes normalised to [0, 1]; each
  phrase becomes an object whose expression is caption[start:end]. `grit_*`: img2dataset's webdataset
  download of GRIT-20M (tars of jpg + json), or record files with the image bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from versavit import storage
from versavit.data.convert import synth
from versavit.data.convert.common import (
    SkipRecord,
    clip_box,
    file_stamp,
    find_files,
    first_existing,
    image_jpeg,
    iter_records,
    iter_tar_groups,
    load_image,
    read_json,
    read_record_unit,
    record_units,
    safe_key,
    write_dataset,
    xywh_to_xyxy,
)

if TYPE_CHECKING:
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


# ------------------------------------------------------------------------------------ COCO-style detection


@dataclass
class CocoIndex:
    """A COCO-style annotation file, indexed by image."""

    images: dict[Any, dict]
    anns: dict[Any, list[dict]]
    names: dict[Any, str]

    @classmethod
    def from_json(cls, data: dict) -> CocoIndex:
        by_image: dict[Any, list[dict]] = defaultdict(list)
        for ann in data.get("annotations", []):
            by_image[ann.get("image_id")].append(ann)
        return cls({im["id"]: im for im in data.get("images", [])}, dict(by_image),
                   {c["id"]: c["name"] for c in data.get("categories", [])})


def load_coco(url: str) -> CocoIndex:
    """The annotation file at `url`, parsed once per process while it is unchanged (Objects365's train JSON is
    several GB)."""
    return _load_coco(url, file_stamp(url))


@functools.lru_cache(maxsize=1)
def _load_coco(url: str, stamp: tuple[Any, ...]) -> CocoIndex:
    return CocoIndex.from_json(read_json(url))


def _coco_image(file_name: str, images_url: str, fallbacks: bool, prefer: list[int]) -> bytes:
    """The image bytes; with `fallbacks`, also the last two parts of file_name (Objects365 v2 lists train images
    as images/v1/patchN/x.jpg, its train tars unpack to patchN/x.jpg). `prefer` remembers which form worked."""
    forms = [file_name, "/".join(file_name.split("/")[-2:])] if fallbacks else [file_name]
    order = prefer + [i for i in range(len(forms)) if i not in prefer]
    for n, i in enumerate(order[:len(forms)]):
        try:
            data = load_image(forms[i], images_url)
        except SkipRecord as skip:
            if skip.reason != "missing_image" or n == len(forms) - 1:
                raise
            continue
        prefer[:] = [i]
        return data
    raise SkipRecord("missing_image", file_name)


def coco_samples(index: CocoIndex, image_ids: list[Any], images_url: str, source: str, counts: Counter, *,
                 keep_crowd: bool = False, skip_empty: bool = True, keep_masks: bool = False,
                 path_fallbacks: bool = False) -> Iterator[dict]:
    """One sample per image of `image_ids` (in that order): rgb.jpg + objects with boxes and class labels."""
    prefer: list[int] = []
    for image_id in image_ids:
        counts["records"] += 1
        image = index.images.get(image_id)
        try:
            if image is None:
                raise SkipRecord("bad_record", f"image id {image_id} not in the annotations")
            anns = sorted(index.anns.get(image_id, []), key=lambda a: a.get("id", 0))
            crowd = sum(bool(a.get("iscrowd")) for a in anns)
            if not keep_crowd:
                anns = [a for a in anns if not a.get("iscrowd")]
            jpeg, (h, w) = image_jpeg(_coco_image(str(image["file_name"]), images_url, path_fallbacks, prefer))
            objects = []
            dropped = 0
            for ann in anns:
                if not isinstance(ann.get("bbox"), list | tuple) or len(ann["bbox"]) != 4:
                    raise SkipRecord("bad_record", f"annotation {ann.get('id')} has no [x, y, w, h] bbox")
                box = clip_box(xywh_to_xyxy(ann["bbox"]), h, w)
                if box is None:
                    dropped += 1
                    continue
                obj = {"id": len(objects) + 1, "bbox": box, "label": index.names.get(ann.get("category_id"), "object"),
                       "category_id": ann.get("category_id"), "ann_id": ann.get("id"), "area": ann.get("area"),
                       "iscrowd": int(bool(ann.get("iscrowd")))}
                if keep_masks and (rle := coco_segmentation_rle(ann.get("segmentation"), h, w)):
                    obj["segmentation"] = rle
                objects.append(obj)
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        if crowd and not keep_crowd:
            counts["crowd_dropped"] += crowd
        if dropped:
            counts["empty_box_dropped"] += dropped
        if skip_empty and not objects:
            counts["no_objects"] += 1
            continue
        yield {"__key__": safe_key(source, image_id), "rgb.jpg": jpeg,
               "json": {"source": source, "image_id": image_id, "file_name": image["file_name"],
                        "size": [h, w], "objects": objects}}


def convert_coco_detection(annotations_url: str, images_url: str, output_url: str, *, source: str = "objects365",
                           samples_per_shard: int = 256, keep_crowd: bool = False, skip_empty: bool = True,
                           keep_masks: bool = False, limit: int | None = None) -> Manifest:
    """COCO-style detection JSON + image folder -> one shard dataset (no sharding of the work: small sets, tests).

    `keep_masks` also stores annotation masks (COCO) as RLE; Objects365 has none (SAM adds them).
    """
    index = CocoIndex.from_json(read_json(annotations_url))
    counts: Counter = Counter()
    ids = sorted(index.images)[:limit]
    samples = coco_samples(index, ids, images_url, source, counts, keep_crowd=keep_crowd, skip_empty=skip_empty,
                           keep_masks=keep_masks)
    meta = {"convert": {"format": "coco-detection", "annotations": annotations_url, "images": images_url}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)


# Objects365 v2 as released (objects365.org / OpenDataLab): zhiyuan_objv2_{train,val}.json + image patches.
OBJECTS365_ANNOTATIONS = ("annotations/zhiyuan_objv2_{split}.json", "{split}/zhiyuan_objv2_{split}.json",
                          "zhiyuan_objv2_{split}.json", "annotations/objects365_{split}.json")


def _objects365_paths(input_url: str, split: str) -> tuple[str, str]:
    candidates = [c.format(split=split) for c in OBJECTS365_ANNOTATIONS]
    ann = first_existing(input_url, candidates)
    if ann is None:
        raise storage.StorageError(f"objects365: no {split} annotation file under {input_url} (tried "
                                   f"{', '.join(candidates)})", kind="missing")
    return ann, storage.join(input_url, split)


def list_objects365(input_url: str, split: str) -> list[Any]:
    """The image ids of the split's annotation file, sorted."""
    ann, _ = _objects365_paths(input_url, split)
    return sorted(load_coco(ann).images)


def read_objects365(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    ann, images = _objects365_paths(input_url, split)
    yield from coco_samples(load_coco(ann), units, images, "objects365", counts, path_fallbacks=True)


def write_objects365_fixture(folder: Path, seed: int) -> None:
    """Objects365 v2's layout: annotations/zhiyuan_objv2_{train,val}.json; train images unpacked from the patch
    tars (train/patch0/...) while the JSON names them images/v1/patch0/... (the release's quirk); val images at
    the path the JSON names. Classes are the world's shapes, with Objects365-style ids."""
    cat_ids = {"ball": 12, "cube": 57, "cylinder": 203}  # not contiguous, not from 1: like the real file
    for split, first in (("train", 0), ("val", 6)):
        n = 6 if split == "train" else 2
        images, anns = [], []
        for i in range(first, first + n):
            s = synth.scene(seed, i)
            name = f"objects365_v1_{i:08d}.jpg"
            file_name = f"images/v1/patch0/{name}"
            on_disk = f"patch0/{name}" if split == "train" else file_name
            synth.write(folder / split / on_disk, synth.jpeg(s))
            h, w = s.image.shape[:2]
            images.append({"height": h, "width": w, "id": 1000 + i, "file_name": file_name, "license": 5,
                           "url": f"http://example.invalid/{name}"})
            for o in s.objects:
                anns.append({"id": 10_000 + 10 * i + o["id"], "iscrowd": 0, "isfake": 0, "isreflected": 0,
                             "area": float(o["area"]), "bbox": synth.xywh(o), "image_id": 1000 + i,
                             "category_id": cat_ids[o["shape"]]})
        data = {"images": images, "annotations": anns, "licenses": [{"id": 5, "name": "CC BY 4.0", "url": ""}],
                "categories": [{"name": name, "id": cid} for name, cid in sorted(cat_ids.items(), key=lambda x: -x[1])]}
        synth.write(folder / "annotations" / f"zhiyuan_objv2_{split}.json", json.dumps(data))


# ------------------------------------------------------------------------------------ GRIT


def grit_sample(rec: dict, jpeg: bytes, size: tuple[int, int], key: str, source: str, counts: Counter,
                min_score: float = 0.0, use_noun_chunks: bool = False) -> dict | None:
    """A GRIT record + its image -> sample with phrase-grounded objects (None: no phrase left, counted)."""
    h, w = size
    caption = str(rec.get("caption") or "")
    spans = rec.get("ref_exps") or (rec.get("noun_chunks") if use_noun_chunks else None) or []
    objects = []
    for span in spans:
        try:
            start, end, x0, y0, x1, y1 = (float(v) for v in span[:6])
            score = float(span[6]) if len(span) > 6 else 1.0
        except (TypeError, ValueError):
            counts["phrases_dropped"] += 1
            continue
        phrase = caption[int(start):int(end)].strip()
        box = clip_box([x0 * w, y0 * h, x1 * w, y1 * h], h, w)
        if not phrase or box is None or score < min_score:
            counts["phrases_dropped"] += 1
            continue
        objects.append({"id": len(objects) + 1, "bbox": box, "expression": phrase, "score": round(score, 4)})
    if not objects:
        counts["no_objects"] += 1
        return None
    return {"__key__": safe_key(source, key), "rgb.jpg": jpeg,
            "json": {"source": source, "key": key, "caption": caption, "size": [h, w], "objects": objects}}


def _grit_rows(records: Iterator[tuple[str, dict]], images_url: str | None, source: str, counts: Counter,
               min_score: float, use_noun_chunks: bool) -> Iterator[dict]:
    for row, rec in records:
        counts["records"] += 1
        key = str(rec.get("key") or rec.get("id") or row)
        try:
            ref = rec.get("image") or rec.get("jpg") or rec.get("image_path") or f"{key}.jpg"
            jpeg, size = image_jpeg(load_image(ref, images_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        sample = grit_sample(rec, jpeg, size, key, source, counts, min_score, use_noun_chunks)
        if sample is not None:
            yield sample


def convert_grit(records_url: str, output_url: str, images_url: str | None = None, *, source: str = "grit",
                 samples_per_shard: int = 256, min_score: float = 0.0, use_noun_chunks: bool = False) -> Manifest:
    """GRIT-style records (jsonl/json/parquet, or a folder of them) -> one shard dataset of grounded phrases.

    The image of a record is its `image`/`jpg` field (bytes or path) or `<images_url>/<key>.jpg`.
    Phrases come from `ref_exps` (referring expressions; `noun_chunks` too with use_noun_chunks).
    """
    counts: Counter = Counter()
    rows = ((str(n), rec) for n, rec in enumerate(iter_records(records_url)))
    samples = _grit_rows(rows, images_url, source, counts, min_score, use_noun_chunks)
    meta = {"convert": {"format": "grit", "records": records_url, "images": images_url}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)


GRIT_RECORD_SUFFIXES = (".parquet", ".jsonl", ".json")


def list_grit(input_url: str, split: str) -> list[Any]:
    """img2dataset's webdataset tars (one unit each) if the folder has any, else record-file units."""
    tars = find_files(input_url, (".tar",))
    if tars:
        return tars
    files = [f for f in find_files(input_url, GRIT_RECORD_SUFFIXES, exclude=("images/",))
             if not f.endswith("_stats.json")]
    return record_units(input_url, files)


def read_grit(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    for unit in units:
        if isinstance(unit, str):  # a tar of img2dataset's webdataset output: NNNNN.jpg + .json (+ .txt)
            for key, fields in iter_tar_groups(storage.join(input_url, unit), counts):
                if "json" not in fields and "jpg" not in fields:
                    continue
                counts["records"] += 1
                try:
                    rec = json.loads(fields["json"]) if "json" in fields else {}
                    if not isinstance(rec, dict):
                        raise ValueError("not an object")
                except (ValueError, UnicodeDecodeError):
                    counts["bad_record"] += 1
                    continue
                if not rec.get("caption") and "txt" in fields:
                    rec["caption"] = fields["txt"].decode("utf-8", "replace")
                try:
                    if "jpg" not in fields:
                        raise SkipRecord("missing_image", key)
                    jpeg, size = image_jpeg(fields["jpg"])
                except SkipRecord as skip:
                    counts[skip.reason] += 1
                    continue
                sample = grit_sample(rec, jpeg, size, str(rec.get("key") or key.rsplit("/", 1)[-1]), "grit", counts)
                if sample is not None:
                    yield sample
        else:
            rows = read_record_unit(input_url, unit, counts)
            yield from _grit_rows(rows, storage.join(input_url, "images"), "grit", counts, 0.0, False)


def _grit_record(s: synth.SceneSample, key: str, n: int) -> dict:
    """GRIT's columns for a scene: the caption lists the objects' expressions; each is a grounded phrase."""
    h, w = s.image.shape[:2]
    caption, spans = "A photo of ", []
    for j, o in enumerate(s.objects):
        if j:
            caption += " and " if j == len(s.objects) - 1 else ", "
        start = len(caption)
        caption += o["expression"]
        x0, y0, x1, y1 = o["bbox"]
        spans.append([start, len(caption), x0 / w, y0 / h, x1 / w, y1 / h, round(0.5 + 0.1 * (j % 5), 2)])
    caption += "."
    return {"key": key, "caption": caption, "url": f"http://example.invalid/{key}.jpg", "width": w, "height": h,
            "original_width": w, "original_height": h, "status": "success", "error_message": None, "id": n,
            "clip_similarity_vitb32": 0.31, "clip_similarity_vitl14": 0.29, "noun_chunks": spans, "ref_exps": spans}


def write_grit_fixture(folder: Path, seed: int) -> None:
    """img2dataset's webdataset output for GRIT-20M's parquet: NNNNN.tar holding KEY.jpg, KEY.json (the
    record's columns, caption and noun_chunks / ref_exps included) and KEY.txt (the caption), with
    NNNNN.parquet and NNNNN_stats.json beside each tar."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in range(2):
        rows, buf = [], io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for j in range(4):
                n = shard * 4 + j
                s = synth.scene(seed, n)
                key = f"{shard:05d}{j:04d}"
                rec = _grit_record(s, key, n)
                for ext, data in (("jpg", synth.jpeg(s)), ("txt", rec["caption"].encode()),
                                  ("json", json.dumps(rec).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
                rows.append({k: rec[k] for k in ("key", "caption", "url", "status", "width", "height")})
        synth.write(folder / f"{shard:05d}.tar", buf.getvalue())
        pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
        stats = {"count": len(rows), "successes": len(rows), "failed_to_download": 0, "failed_to_resize": 0,
                 "status_dict": {"success": len(rows)}, "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
        synth.write(folder / f"{shard:05d}_stats.json", json.dumps(stats))
