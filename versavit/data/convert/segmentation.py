"""Ready-made masks -> samples: SA-1B per-image JSON, RefCOCO-family refs + instances.

- SA-1B: `sa_N.jpg` + `sa_N.json` pairs (the contents of the release's `sa_XXXXXX.tar` files). Each JSON
  holds `image` {image_id, width, height, file_name} and `annotations` [{id, segmentation (compressed RLE),
  bbox (x, y, w, h), area, predicted_iou, stability_score, crop_box, point_coords}]. One sample per image;
  masks stay RLE in the objects (they overlap, so no instance map). Annotations with a
  `description`/`caption` (SA-1B-DAM style) get it as their expression.
- RefCOCO / RefCOCO+ / RefCOCOg in the `refer` toolkit's layout: `refs(<split_by>).p` (pickle, as
  released; a JSON list works too) + COCO `instances.json` + the COCO train2014 images. One sample per
  (ref, sentence): `mask.png` of the referred object, json `expression`, and a one-object `objects` list.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from versavit import storage
from versavit.data import codecs
from versavit.data.convert import synth
from versavit.data.convert.common import (
    SkipRecord,
    clip_box,
    file_stamp,
    find_files,
    first_existing,
    image_jpeg,
    load_image,
    read_json,
    safe_key,
    write_dataset,
    xywh_to_xyxy,
)
from versavit.data.convert.detection import coco_segmentation_rle

# ------------------------------------------------------------------------------------ SA-1B

if TYPE_CHECKING:
    from versavit.data.shards import Manifest


def sa1b_sample(json_url: str, source: str, counts: Counter, min_predicted_iou: float = 0.0) -> dict | None:
    """One SA-1B image JSON (+ the image it names, beside it) -> sample with RLE-masked objects, or None
    (counted: bad_json, bad_image, missing_image, no_objects)."""
    counts["records"] += 1
    try:
        data = read_json(json_url)
        info = data["image"]
        folder = json_url.rsplit("/", 1)[0]
        jpeg, (h, w) = image_jpeg(load_image(str(info["file_name"]), folder))
    except SkipRecord as skip:
        counts[skip.reason] += 1
        return None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError):  # unreadable or incomplete JSON
        counts["bad_json"] += 1
        return None
    objects = []
    for ann in sorted(data.get("annotations") or [], key=lambda a: a.get("id", 0)):
        rle = ann.get("segmentation")
        if not isinstance(rle, dict) or list(rle.get("size", [])) != [h, w]:  # e.g. [w, h]: a writer's mix-up
            counts["bad_mask_dropped"] += 1
            continue
        if ann.get("area") == 0:
            counts["empty_mask_dropped"] += 1
            continue
        if float(ann.get("predicted_iou", 1.0)) < min_predicted_iou:
            counts["low_iou_dropped"] += 1
            continue
        box = clip_box(xywh_to_xyxy(ann.get("bbox") or [0, 0, 0, 0]), h, w)
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
        return None
    image_id = info.get("image_id", json_url.rsplit("/", 1)[-1][:-5])
    return {"__key__": safe_key(source, image_id), "rgb.jpg": jpeg,
            "json": {"source": source, "image_id": image_id, "file_name": info.get("file_name"), "size": [h, w],
                     "objects": objects}}


def list_sa1b(input_url: str, split: str) -> list[Any]:
    """Every per-image JSON below the input folder (the unpacked sa_XXXXXX.tar folders), sorted."""
    return find_files(input_url, (".json",))


def read_sa1b(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
    for rel in units:
        sample = sa1b_sample(storage.join(input_url, rel), "sa1b", counts)
        if sample is not None:
            yield sample


def convert_sa1b(input_url: str, output_url: str, *, source: str = "sa1b", samples_per_shard: int = 64,
                 min_predicted_iou: float = 0.0, limit: int | None = None) -> Manifest:
    """A folder of SA-1B image + per-image JSON pairs -> one shard dataset with RLE-masked objects."""
    counts: Counter = Counter()
    files = list_sa1b(input_url, "train")[:limit]
    samples = (s for rel in files
               if (s := sa1b_sample(storage.join(input_url, rel), source, counts, min_predicted_iou)) is not None)
    meta = {"convert": {"format": "sa1b", "input": input_url}}
    return write_dataset(samples, output_url, source, meta, counts, samples_per_shard)


def write_sa1b_fixture(folder: Path, seed: int) -> None:
    """SA-1B's layout, two tars unpacked: sa_000000/sa_N.jpg + sa_N.json, sa_000001/...; one annotation per
    object (its visible mask as compressed RLE, bbox, area, predicted_iou, stability_score, crop_box,
    point_coords)."""
    for i, s in enumerate(synth.scenes(seed)):
        h, w = s.image.shape[:2]
        part = folder / f"sa_{i // 4:06d}"
        anns = []
        for o in s.objects:
            m = synth.mask(s, o["id"])
            rows, cols = np.nonzero(m)
            anns.append({"bbox": synth.xywh(o), "area": int(m.sum()), "segmentation": codecs.encode_rle(m),
                         "predicted_iou": round(0.85 + 0.01 * o["id"], 4), "point_coords": [[float(cols.mean()),
                                                                                             float(rows.mean())]],
                         "crop_box": [0.0, 0.0, float(w), float(h)], "id": 100 * (i + 1) + o["id"],
                         "stability_score": 0.95})
        data = {"image": {"image_id": i + 1, "width": w, "height": h, "file_name": f"sa_{i + 1}.jpg"},
                "annotations": anns}
        synth.write(part / f"sa_{i + 1}.jpg", synth.jpeg(s))
        synth.write(part / f"sa_{i + 1}.json", json.dumps(data))


# ------------------------------------------------------------------------------------ RefCOCO family

REFER_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {  # name -> (split_by, splits; train first)
    "refcoco": ("unc", ("train", "val", "testA", "testB")),
    "refcoco+": ("unc", ("train", "val", "testA", "testB")),
    "refcocog": ("umd", ("train", "val", "test")),
}
REFER_IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014", "train2014", "images")


class _PlainUnpickler(pickle.Unpickler):
    """refs(*).p holds only lists, dicts, strings and numbers: refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a refs pickle (only plain data)")


def load_refs(refs_url: str) -> list[dict]:
    """RefCOCO refs: the released pickle (refs(unc).p etc., written by Python 2) or the same list as JSON.

    The pickle is read with an unpickler that builds plain data only (no classes, no code).
    """
    data = storage.read_bytes(refs_url)
    if refs_url.endswith(".json"):
        refs = json.loads(data)
    else:
        try:
            refs = _PlainUnpickler(io.BytesIO(data)).load()
        except UnicodeDecodeError:  # Python 2 str pickles: latin-1 recovers their bytes
            refs = _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    if not isinstance(refs, list):
        raise ValueError(f"{refs_url}: expected a list of refs, got {type(refs).__name__}")
    return refs


@dataclass
class ReferIndex:
    refs: dict[int, dict]
    images: dict[Any, dict]
    anns: dict[Any, dict]
    names: dict[Any, str]


def load_refer(refs_url: str, instances_url: str) -> ReferIndex:
    """A refer dataset's refs and instances, parsed once per process while both files are unchanged."""
    return _load_refer(refs_url, instances_url, file_stamp(refs_url) + file_stamp(instances_url))


@functools.lru_cache(maxsize=2)
def _load_refer(refs_url: str, instances_url: str, stamp: tuple[Any, ...]) -> ReferIndex:
    instances = read_json(instances_url)
    return ReferIndex({int(r["ref_id"]): r for r in load_refs(refs_url)},
                      {im["id"]: im for im in instances["images"]}, {a["id"]: a for a in instances["annotations"]},
                      {c["id"]: c["name"] for c in instances.get("categories", [])})


def refcoco_samples(index: ReferIndex, ref_ids: list[int], images_url: str, source: str,
                    counts: Counter) -> Iterator[dict]:
    """One sample per sentence of each ref in `ref_ids` (records = refs; a ref whose image or annotation is
    missing or broken is counted once)."""
    cache: dict[Any, tuple[bytes, tuple[int, int]] | SkipRecord] = {}
    for ref_id in ref_ids:
        counts["records"] += 1
        ref = index.refs.get(ref_id)
        ann = index.anns.get(ref.get("ann_id")) if ref else None
        image = index.images.get(ref.get("image_id")) if ref else None
        if ann is None or image is None:
            counts["bad_record"] += 1
            continue
        if image["id"] not in cache:  # a few refs share an image: keep the last few decoded
            if len(cache) > 64:
                cache.clear()
            try:
                cache[image["id"]] = image_jpeg(load_image(image["file_name"], images_url))
            except SkipRecord as skip:
                cache[image["id"]] = skip
        got = cache[image["id"]]
        if isinstance(got, SkipRecord):
            counts[got.reason] += 1
            continue
        jpeg, (h, w) = got
        try:
            rle = coco_segmentation_rle(ann.get("segmentation"), h, w)
            box = clip_box(xywh_to_xyxy(ann["bbox"]), h, w)
        except (KeyError, TypeError, ValueError):
            counts["bad_record"] += 1
            continue
        if rle is None or box is None:
            counts["no_mask"] += 1
            continue
        mask_png = codecs.encode_png(codecs.decode_rle(rle).astype(np.uint8) * 255)
        label = index.names.get(ref.get("category_id", ann.get("category_id")), "object")
        for j, sent in enumerate(ref.get("sentences") or []):
            text = str(sent.get("sent") or sent.get("raw") or "").strip()
            if not text:
                counts["empty_sentence"] += 1
                continue
            obj = {"id": 1, "bbox": box, "label": label, "expression": text, "ann_id": ann["id"]}
            yield {"__key__": safe_key(source, ref_id, sent.get("sent_id", j)), "rgb.jpg": jpeg, "mask.png": mask_png,
                   "json": {"source": source, "expression": text, "ref_id": ref_id, "image_id": image["id"],
                            "split": ref.get("split"), "size": [h, w], "objects": [obj]}}


def convert_refcoco(refs_url: str, instances_url: str, images_url: str, output_url: str, *,
                    source: str = "refcoco", splits: tuple[str, ...] | None = ("train",),
                    samples_per_shard: int = 256) -> Manifest:
    """RefCOCO / RefCOCO+ / RefCOCOg refs + COCO instances -> one shard dataset, one sample per sentence.

    `splits` keeps refs of those splits only (None: all); val/test belong to evaluation.
    """
    instances = read_json(instances_url)
    refs = load_refs(refs_url)
    index = ReferIndex({int(r["ref_id"]): r for r in refs}, {im["id"]: im for im in instances["images"]},
                       {a["id"]: a for a in instances["annotations"]},
                       {c["id"]: c["name"] for c in instances.get("categories", [])})
    counts: Counter = Counter()
    keep = sorted(i for i, r in index.refs.items() if splits is None or r.get("split") in splits)
    if len(index.refs) > len(keep):
        counts["other_split"] = len(index.refs) - len(keep)
    meta = {"convert": {"format": "refcoco", "refs": refs_url, "instances": instances_url, "images": images_url,
                        "splits": list(splits) if splits is not None else None}}
    return write_dataset(refcoco_samples(index, keep, images_url, source, counts), output_url, source, meta, counts,
                         samples_per_shard)


def refer_paths(input_url: str, dataset: str) -> tuple[str, str, str]:
    """(refs, instances, image folder) URLs of `dataset` under a refer data root (or the dataset's own folder)."""
    split_by = REFER_DATASETS[dataset][0]
    refs = first_existing(input_url, [f"{dataset}/refs({split_by}).p", f"refs({split_by}).p",
                                      f"{dataset}/refs({split_by}).json"])
    instances = first_existing(input_url, [f"{dataset}/instances.json", "instances.json"])
    images = first_existing(input_url, REFER_IMAGE_DIRS)
    if refs is None or instances is None or images is None:
        what = "refs" if refs is None else "instances.json" if instances is None else "COCO train2014 images"
        raise storage.StorageError(
            f"{dataset}: no {what} under {input_url}: expected <input>/{dataset}/refs({split_by}).p, "
            f"<input>/{dataset}/instances.json and <input>/{REFER_IMAGE_DIRS[0]}/", kind="missing")
    return refs, instances, images


def refer_source_fns(dataset: str) -> tuple[Any, Any, Any]:
    """(list_units, read_units, write_fixture) of one RefCOCO-family dataset."""

    def list_units(input_url: str, split: str) -> list[Any]:
        refs, instances, _ = refer_paths(input_url, dataset)
        index = load_refer(refs, instances)
        return sorted(i for i, r in index.refs.items() if r.get("split") == split)

    def read_units(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict]:
        refs, instances, images = refer_paths(input_url, dataset)
        yield from refcoco_samples(load_refer(refs, instances), [int(u) for u in units], images, dataset, counts)

    def write_fixture(folder: Path, seed: int) -> None:
        write_refer_fixture(folder, seed, dataset)

    return list_units, read_units, write_fixture


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = np.asarray(mask, bool).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"counts": [int(r) for r in runs], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def write_refer_fixture(folder: Path, seed: int, dataset: str = "refcoco") -> None:
    """The refer toolkit's layout: <dataset>/refs(<split_by>).p (a pickled list of refs, protocol 2 like the
    Python 2 originals), <dataset>/instances.json (COCO style) and images/mscoco/images/train2014/. Each object
    of each scene is one ref whose sentence is its referring expression; images are split between the
    dataset's splits (by image, as in the release). Masks are RLE (compressed and uncompressed) so they are
    exact; the real instances.json has polygons."""
    split_by, splits = REFER_DATASETS[dataset]
    plan = ["train"] * 4 + ["val"] * 2 + ([s for s in splits if s.startswith("test")] * 2)[:2]
    images, anns, refs = [], [], []
    shape_ids = {"ball": 37, "cube": 61, "cylinder": 44}  # COCO-like category ids
    for i, split in enumerate(plan):
        s = synth.scene(seed, i)
        h, w = s.image.shape[:2]
        image_id = 9 + 16 * i
        file_name = f"COCO_train2014_{image_id:012d}.jpg"
        synth.write(folder / REFER_IMAGE_DIRS[0] / file_name, synth.jpeg(s))
        images.append({"license": 1, "file_name": file_name, "coco_url": f"http://example.invalid/{file_name}",
                       "height": h, "width": w, "date_captured": "2013-11-14 16:28:13", "id": image_id})
        for o in s.objects:
            m = synth.mask(s, o["id"])
            ann_id = 1000 * image_id + o["id"]
            seg = codecs.encode_rle(m) if o["id"] % 2 else uncompressed_rle(m)
            anns.append({"segmentation": seg, "area": float(m.sum()), "iscrowd": 0, "image_id": image_id,
                         "bbox": synth.xywh(o), "category_id": shape_ids[o["shape"]], "id": ann_id})
            ref_id = len(refs)
            sent = o["expression"]
            refs.append({"sent_ids": [10 * ref_id], "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                         "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split,
                         "sentences": [{"tokens": sent.split(), "raw": sent[:1].upper() + sent[1:],
                                        "sent_id": 10 * ref_id, "sent": sent}],
                         "category_id": shape_ids[o["shape"]]})
    instances = {"info": {"description": "synthetic stand-in"}, "images": images, "annotations": anns,
                 "licenses": [{"id": 1, "name": "n/a", "url": ""}],
                 "categories": [{"supercategory": "shape", "id": cid, "name": n} for n, cid in shape_ids.items()]}
    synth.write(folder / dataset / "instances.json", json.dumps(instances))
    synth.write(folder / dataset / f"refs({split_by}).p", pickle.dumps(refs, protocol=2))
