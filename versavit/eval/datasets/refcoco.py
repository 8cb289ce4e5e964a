"""RefCOCO, RefCOCO+ and RefCOCOg in the layout of the `refer` toolkit (lichengunc/refer):

    <root>/refcoco/instances.json   + refs(unc).p  (also refs(google).p)
    <root>/refcoco+/instances.json  + refs(unc).p
    <root>/refcocog/instances.json  + refs(umd).p  (also refs(google).p)
    <root>/images/mscoco/images/train2014/COCO_train2014_XXXXXXXXXXXX.jpg   (or pass image_dir)

refs(*).p is a pickled list of refs {ref_id, ann_id, image_id, split, sentences: [{sent, ...}], ...};
instances.json is COCO-style (images, annotations with polygon or RLE segmentation). One sample per image
of the split: every sentence of every ref in it is one query whose ground truth is the ref's mask.
"""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from versavit.eval.datasets.base import BenchmarkReader, Sample, read_rgb

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
_IMAGE_DIRS = ("images/mscoco/images/train2014", "images/train2014", "train2014", "images")


class _PlainUnpickler(pickle.Unpickler):
    """refs(*).p holds only lists, dicts, strings and numbers: refuse anything that would import code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a refs pickle (only plain data)")


def load_refs(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        try:
            refs = _PlainUnpickler(f).load()
        except UnicodeDecodeError:  # the published files were written by Python 2
            f.seek(0)
            refs = _PlainUnpickler(f, encoding="latin1").load()
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> bool [H, W]."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons: one object may have several parts
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode(rle).astype(bool)


def refer_splits(root: str, dataset: str, split_by: str | None = None) -> set[str]:
    """The splits the refs file of `dataset` under a refer-toolkit root names (empty when it is missing)."""
    path = Path(root) / dataset / f"refs({split_by or DEFAULT_SPLIT_BY[dataset]}).p"
    return {str(r.get("split")) for r in load_refs(path)} if path.is_file() else set()


class RefCOCO(BenchmarkReader):
    """refer-toolkit layout: <root>/<dataset>/{instances.json, refs(<split_by>).p} + COCO train2014 images."""

    tasks = ("refseg",)

    def __init__(self, root: str, dataset: str = "refcoco", split: str = "val", split_by: str | None = None,
                 image_dir: str | None = None) -> None:
        if dataset not in DEFAULT_SPLIT_BY:
            raise ValueError(f"dataset must be one of {sorted(DEFAULT_SPLIT_BY)}, got {dataset!r}")
        self.name = dataset
        self.dataset = dataset
        self.split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        self._image_dir_arg = image_dir
        super().__init__(root, split)

    def _settings(self) -> dict:
        return {"dataset": self.dataset, "split_by": self.split_by}

    def _image_dir(self) -> Path:
        if self._image_dir_arg:
            return Path(self._image_dir_arg)
        for rel in _IMAGE_DIRS:
            if (self.root / rel).is_dir():
                return self.root / rel
        raise ValueError(f"{self.name}: no COCO train2014 image folder under {self.root} (tried {_IMAGE_DIRS}); "
                         "pass image_dir")

    def _items(self) -> list[dict[str, Any]]:
        folder = self.root / self.dataset
        refs_path, inst_path = folder / f"refs({self.split_by}).p", folder / "instances.json"
        for p in (refs_path, inst_path):
            if not p.is_file():
                raise ValueError(f"{self.name}: {p} is missing")
        refs = [r for r in load_refs(refs_path) if r.get("split") == self.split]
        instances = json.loads(inst_path.read_text())
        images = {im["id"]: im for im in instances["images"]}
        anns = {a["id"]: a for a in instances["annotations"]}
        self.image_dir = self._image_dir()
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for ref in refs:
            if ref["ann_id"] not in anns:
                raise ValueError(f"{self.name}: ref {ref.get('ref_id')} points at unknown annotation {ref['ann_id']}")
            by_image[ref["image_id"]].append(ref)
        items = []
        for image_id in sorted(by_image):
            info = images[image_id]
            items.append({"image": info, "path": self.image_dir / info["file_name"],
                          "refs": [{"ref_id": r["ref_id"], "ann": anns[r["ann_id"]],
                                    "sentences": [s["sent"] for s in r["sentences"]]} for r in by_image[image_id]]})
        missing = [str(it["path"]) for it in items if not it["path"].is_file()]
        if missing:
            raise ValueError(f"{self.name}: {len(missing)} image(s) missing, e.g. {missing[:3]}")
        return items

    def _files(self, item: dict[str, Any]) -> list[Path]:
        return [item["path"]]

    def digest(self) -> str:
        import hashlib

        h = hashlib.sha256(super().digest().encode())
        for f in (f"refs({self.split_by}).p", "instances.json"):
            st = (self.root / self.dataset / f).stat()
            h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()[:32]

    def num_queries(self) -> int:
        return sum(len(r["sentences"]) for it in self.items for r in it["refs"])

    def _load(self, item: dict[str, Any]) -> Sample:
        image = read_rgb(item["path"])
        h, w = image.shape[:2]
        masks, sentences, ref_ids = [], [], []
        for ref in item["refs"]:
            mask = annotation_mask(ref["ann"]["segmentation"], h, w)
            for sentence in ref["sentences"]:
                masks.append(mask)
                sentences.append(sentence)
                ref_ids.append(ref["ref_id"])
        return image, {"key": str(item["image"]["id"]), "masks": masks, "sentences": sentences, "ref_ids": ref_ids}
