"""NAVI and SPair-71k image pairs (Probe3D's correspondence benchmarks, paper Table 8), read from the published
layouts or from the shards `versavit data prepare navi|spair71k` writes. The layouts, the parsing rules and where
they come from are in versavit.data.prepare.correspondence (one definition for both readers).

A sample is one pair: `image` is the source view [H, W, 3] uint8, and the target holds the second view and the
ground truth, by kind:

    every       "key" (the pair's id), "kind", "category" (SPair class / NAVI object), "image_b" [H', W', 3] uint8,
                "image_id", "image_id_b" (an image's id: the same image in several pairs is computed once)
    keypoints   (SPair) "kps", "kps_b": [N, 2] float32 (x, y) = (column, row) pixel positions of corresponding
                keypoints in each image, as published (row i of both is one correspondence); "norm": the PCK
                normaliser in the target's pixels (the longer side of the target's bounding box); "bbox",
                "bbox_b": [x1, y1, x2, y2]; "viewpoint_variation" (0, 1, 2)
    navi        (NAVI) "depth", "depth_b": [H, W] float32 metres (z-depth, 0 off the object), "focal", "focal_b":
                pixels of the stored image (principal point at its centre; x right, y down, z forward), "pose",
                "pose_b": 4x4 object-to-camera transforms in metres, "angle": the cameras' rotation difference
                (degrees). A pixel (u, v) with depth d is the camera point d * ((u + 0.5 - W/2) / f, (v + 0.5 -
                H/2) / f, 1); pose_b @ inv(pose) takes the source camera's points into the target's.

Both are evaluation sets: one split each ("test"; SPair's val and trn are readable too).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from versavit.data import codecs
from versavit.data.prepare.correspondence import (
    list_navi,
    list_spair,
    navi_files,
    navi_root,
    navi_target,
    read_navi,
    read_spair,
    spair_root,
    spair_target,
)
from versavit.eval.datasets.base import BenchmarkReader, Sample
from versavit.eval.datasets.prepared import _ShardReader

TASKS = ("correspondence",)


def _rgb(sample: dict[str, Any], stem: str) -> np.ndarray:
    """The image field `stem`.jpg / `stem`.png of a sample: decoded already (rgb.*, by the shard loader) or bytes."""
    for suffix in ("jpg", "png"):
        value = sample.get(f"{stem}.{suffix}")
        if value is not None:
            return codecs.decode_image(value) if isinstance(value, bytes | bytearray) else np.asarray(value)
    raise KeyError(f"correspondence sample {sample.get('__key__')} has no {stem}.jpg / {stem}.png")


def _png(value: Any) -> np.ndarray:
    return codecs.decode_png(value) if isinstance(value, bytes | bytearray) else np.asarray(value)


def pair_sample(sample: dict[str, Any]) -> Sample:
    """A prepared sample (or one `read_spair` / `read_navi` yields) -> (source image, target)."""
    meta = sample.get("json") or {}
    benchmark = meta.get("benchmark")
    if benchmark == "spair":
        target = spair_target(meta)
    elif benchmark == "navi":
        target = navi_target(meta, _png(sample["navi_depth.png"]), _png(sample["navi_depth_b.png"]))
    else:
        raise ValueError(f"sample {sample.get('__key__')} is not a prepared navi / spair pair (json benchmark "
                         f"{benchmark!r}); prepare it with `versavit data prepare navi|spair71k`")
    image, image_b = _rgb(sample, "rgb"), _rgb(sample, "rgb_b")
    if benchmark == "navi" and (image.shape[:2], image_b.shape[:2]) != (target["depth"].shape,
                                                                        target["depth_b"].shape):
        raise ValueError(f"navi: {target['key']}: image and depth sizes differ")
    target["image_b"] = image_b
    return image, target


class _PublishedPairs(BenchmarkReader):
    """Common part of the published-layout readers: units from the source's lister, samples from its reader."""

    tasks = TASKS
    _list: Callable[[str, str], list[Any]]
    _read: Callable[[str, str, list[Any], Counter], Iterator[dict[str, Any]]]

    def _items(self) -> list[Any]:
        return type(self)._list(str(self.root), self.split)

    def _load(self, item: Any) -> Sample:
        counts: Counter = Counter()
        samples = list(type(self)._read(str(self.root), self.split, [item], counts))
        if not samples:
            reasons = {k: v for k, v in counts.items() if k != "records"}
            raise ValueError(f"{self.name}: cannot read pair {item} under {self.root}: {reasons}")
        return pair_sample(samples[0])


class SPair(_PublishedPairs):
    """SPair-71k, the published layout (JPEGImages/<category>/, PairAnnotation/<split>/*.json)."""

    name = "spair"
    _list = staticmethod(list_spair)
    _read = staticmethod(read_spair)

    def __init__(self, root: str | Path, split: str = "test") -> None:
        super().__init__(spair_root(str(root)), split)

    def _files(self, item: str) -> list[Path]:
        return [self.root / item]


class NAVI(_PublishedPairs):
    """NAVI v1, the published layout (<object>/<scene>/{annotations.json, images/, depth/}), Probe3D's test pairs."""

    name = "navi"
    _list = staticmethod(list_navi)
    _read = staticmethod(read_navi)

    def __init__(self, root: str | Path, split: str = "test") -> None:
        super().__init__(navi_root(str(root)), split)

    def _files(self, item: list[Any]) -> list[Path]:
        obj, scene, a, b = item[:4]
        files = [self.root / obj / scene / "annotations.json"]
        for image in (a, b):
            files += [self.root / p for p in navi_files(str(self.root), obj, scene, image, f"{image}.jpg")]
        return [f for f in files if f.exists()]


class PreparedPairs(_ShardReader):
    """NAVI or SPair-71k pairs prepared into shards (`versavit data prepare navi|spair71k`)."""

    tasks = TASKS

    def __init__(self, url: str, split: str, name: str) -> None:
        if name not in ("navi", "spair"):
            raise ValueError(f"prepared correspondence pairs are navi or spair, got {name!r}")
        self.name = name
        self._open(url, split)

    def _settings(self) -> dict[str, Any]:
        return {"benchmark": self.name}

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            image, target = pair_sample(sample)
            if (sample.get("json") or {}).get("benchmark") != self.name:
                raise ValueError(f"{self.name}: the prepared split at {self.url} holds "
                                 f"{sample['json'].get('benchmark')} pairs")
            yield image, target
