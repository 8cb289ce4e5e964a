"""The data stage for the built-in synthetic world: render scenes, write train/val shards.

One sample carries every annotation of a scene (RGB, depth, instances, semantic classes, texts),
so each task reads the fields it needs from the same shards:

    rgb.jpg    image                       depth.png  16-bit depth, scale in json["depth"]
    inst.png   16-bit instance ids         sem.png    8-bit class ids (CLASSES, 255 = ignore)
    json       {"depth": {scale, kind}, "objects": [...], "caption", "qa", "classes", "source"}
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from versavit import storage
from versavit.config.schema import SyntheticConfig
from versavit.data import codecs
from versavit.data.shards import Manifest, ShardWriter
from versavit.data.synthetic import CLASSES, IGNORE_INDEX, SceneSample, render_sample

SPLITS = {"train": "num_train", "val": "num_val"}


def encode_scene(sample: SceneSample, image_format: str = "jpg") -> dict[str, Any]:
    """A rendered scene -> webdataset sample (field name -> bytes)."""
    depth_png, scale = codecs.encode_depth(sample.depth)
    meta = {
        "source": "synthetic",
        "depth": {"scale": scale, "kind": "depth", "unit": "m"},
        "objects": sample.objects,
        "caption": sample.caption,
        "qa": sample.qa,
        "classes": list(CLASSES),
        "ignore_index": IGNORE_INDEX,
        "size": [int(sample.image.shape[0]), int(sample.image.shape[1])],
    }
    return {
        "__key__": sample.key,
        f"rgb.{image_format}": codecs.encode_image(sample.image, image_format),
        "depth.png": depth_png,
        "inst.png": codecs.encode_png(sample.instances.astype("uint16")),
        "sem.png": codecs.encode_png(sample.semantic.astype("uint8")),
        "json": codecs.encode_json(meta),
    }


def _render_encoded(index: int, *, split: str, cfg: SyntheticConfig) -> dict[str, Any]:
    sample = render_sample(cfg.seed, split, index, image_size=cfg.image_size,
                           min_objects=cfg.min_objects, max_objects=cfg.max_objects)
    return encode_scene(sample)


def build_synthetic(
    out_url: str,
    cfg: SyntheticConfig,
    splits: tuple[str, ...] = ("train", "val"),
    workers: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Manifest]:
    """Render `cfg`'s splits into `<out_url>/<split>/` shard datasets; returns their manifests.

    Deterministic: sample i of a split is the same whatever `workers` or shard size.
    """
    storage.ensure_bucket(out_url)
    manifests: dict[str, Manifest] = {}
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for split in splits:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
            total = getattr(cfg, SPLITS[split])
            meta = {"generator": "versavit.data.synthetic", "split": split, **cfg.model_dump()}
            render = functools.partial(_render_encoded, split=split, cfg=cfg)
            samples = pool.map(render, range(total), chunksize=8) if pool else map(render, range(total))
            with ShardWriter(storage.join(out_url, split), cfg.samples_per_shard,
                             name=f"synthetic-{split}", meta=meta) as writer:
                for done, sample in enumerate(samples, 1):
                    writer.write(sample)
                    if progress:
                        progress(split, done, total)
            assert writer.manifest is not None
            manifests[split] = writer.manifest
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return manifests
