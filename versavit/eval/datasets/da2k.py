"""DA-2K relative-depth pairs (Depth Anything V2), read from the published layout or from prepared shards.

    <root>/annotations.json                 {"images/<scene>/<file>": [{"point1": [h, w], "point2": [h, w],
                                                                        "closer_point": "point1"}, ...], ...}
    <root>/images/<scene>/<file>            (root: DA-2K/ as DA-2K.zip unzips, or the folder holding it)

Layout and schema from DA-2K.md of github.com/DepthAnything/Depth-Anything-V2 ("point1": [h1, w1] = (vertical,
horizontal) position; "closer_point": the point nearer the camera, always point1 in the release); the parsing
rules are shared with the `da2k` prepare source (versavit.data.prepare.da2k). One split, "test".

A sample's target: "key" (the annotation's image path), "scene" (indoor, outdoor, ...) and "pairs": a list of
((r1, c1), (r2, c2), closer) with integer (row, column) pixels of the image as published and closer 0 (the first
point) or 1 (the second). No depth map: DA-2K scores the order of each pair only (versavit.eval.evaluators.da2k).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from versavit.data.prepare.da2k import (
    ANNOTATIONS,
    SPLITS,
    Pair,
    da2k_root,
    inside,
    pairs_from_json,
    parse_annotations,
    parse_entries,
    scene_of,
)
from versavit.eval.datasets.base import BenchmarkReader, Sample, read_rgb
from versavit.eval.datasets.prepared import _image, _ShardReader

# what a DA-2K sample serves: the order of point pairs (not "depth": no depth map for the probes to read)
TASKS = ("depth-pairs",)
Item = tuple[str, list[Pair]]


class DA2K(BenchmarkReader):
    """DA-2K, the published layout (annotations.json + images/<scene>/*), pairs as (row, col) points."""

    name = "da2k"
    tasks = TASKS

    def __init__(self, root: str | Path, split: str = "test") -> None:
        if split not in SPLITS:
            raise ValueError(f"da2k split must be one of {list(SPLITS)}, got {split!r}")
        super().__init__(da2k_root(str(root)), split)

    def _items(self) -> list[Item]:
        path = self.root / ANNOTATIONS
        if not path.is_file():
            raise ValueError(f"da2k: no {ANNOTATIONS} in {self.root} (expected DA-2K/ as DA-2K.zip unzips: "
                             f"{ANNOTATIONS} + images/<scene>/*)")
        text = path.read_text()
        self._annotations_sha = hashlib.sha256(text.encode()).hexdigest()[:16]
        annotations = parse_annotations(text, str(path))
        items, missing = [], []
        for image_path in sorted(annotations):
            pairs = parse_entries(image_path, annotations[image_path])
            if not (self.root / image_path).is_file():
                missing.append(image_path)
            items.append((image_path, pairs))
        if missing:
            raise ValueError(f"da2k: {len(missing)} image(s) named in {ANNOTATIONS} are missing under {self.root}, "
                             f"e.g. {missing[:3]}")
        return items

    def _files(self, item: Item) -> list[Path]:
        return [self.root / item[0]]

    def _settings(self) -> dict[str, Any]:
        return {"annotations": self._annotations_sha}  # a changed annotation file changes the digest

    def _load(self, item: Item) -> Sample:
        image_path, pairs = item
        image = read_rgb(self.root / image_path)
        return image, {"key": image_path, "scene": scene_of(image_path),
                       "pairs": inside(pairs, image.shape[:2], image_path)}


class PreparedDA2K(_ShardReader):
    """DA-2K prepared by `versavit data prepare da2k` (pairs in each sample's json)."""

    name = "da2k"
    tasks = TASKS

    def __init__(self, url: str, split: str = "test") -> None:
        self._open(url, split)

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            meta = sample.get("json") or {}
            if "pairs" not in meta:
                raise ValueError(f"da2k: prepared sample {sample['__key__']} in {self.url} has no pairs; prepare "
                                 "it with `versavit data prepare da2k`")
            key = meta.get("key", sample["__key__"])
            yield _image(sample), {"key": key, "scene": meta.get("scene", scene_of(key)),
                                   "pairs": pairs_from_json(meta["pairs"])}
