"""Scenes of the synthetic world for the sources' fixtures: tiny stand-ins of each published layout whose
labels (boxes, masks, class names, expressions, captions, QA) are exact because the world made them.

Rendering is cached per (seed, split, index, size), so the fixtures of several sources share scenes.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from versavit.data import codecs
from versavit.data.synthetic import SceneSample, render_sample

FIXTURE_SIZE = 96  # pixels (square)
FIXTURE_IMAGES = 8


@functools.lru_cache(maxsize=256)
def scene(seed: int, index: int, split: str = "train", size: int = FIXTURE_SIZE) -> SceneSample:
    """Scene `index` of the world with `seed` (cached: treat it as read-only)."""
    return render_sample(seed, split, index, image_size=size, min_objects=2, max_objects=4)


def scenes(seed: int, n: int = FIXTURE_IMAGES, split: str = "train", size: int = FIXTURE_SIZE) -> list[SceneSample]:
    return [scene(seed, i, split, size) for i in range(n)]


def jpeg(sample: SceneSample) -> bytes:
    """The scene's image as the JPEG a fixture stores (quality 95, like the shards)."""
    return codecs.encode_image(sample.image, "jpg")


def png(sample: SceneSample) -> bytes:
    return codecs.encode_image(sample.image, "png")


def mask(sample: SceneSample, object_id: int) -> np.ndarray:
    """The visible mask of object `object_id` (1-based, like `objects[k]["id"]`)."""
    return sample.instances == object_id


def xywh(obj: dict) -> list[float]:
    """An object's box as COCO's [x, y, w, h] (pixels)."""
    x0, y0, x1, y1 = obj["bbox"]
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
