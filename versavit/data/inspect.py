"""Read a dataset back through the training reader: counts, statistics and a preview figure.

It proves the shards decode the way training will read them (same pipeline, same corrupt-data
rules) and gives people a picture of the data before hours of training are spent on it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from versavit.data.loader import CorruptionStats, make_loader, shard_pipeline
from versavit.data.shards import resolve_shards

_TURBO_ANCHORS = np.array([[48, 18, 59], [70, 131, 250], [27, 229, 181], [165, 253, 55], [251, 185, 56],
                           [221, 63, 13], [122, 4, 3]], dtype=np.float32)


def colorize(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """A float map -> [H, W, 3] uint8 with a turbo-like palette (near = warm); invalid = black."""
    valid = np.isfinite(values) if valid is None else valid & np.isfinite(values)
    out = np.zeros((*values.shape, 3), np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(values[valid], [2, 98])
    t = 1.0 - np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1)  # near -> 1 (warm)
    pos = t * (len(_TURBO_ANCHORS) - 1)
    i = np.clip(pos.astype(int), 0, len(_TURBO_ANCHORS) - 2)
    frac = (pos - i)[..., None]
    rgb = _TURBO_ANCHORS[i] * (1 - frac) + _TURBO_ANCHORS[i + 1] * frac
    out[valid] = rgb[valid].astype(np.uint8)
    return out


def overlay_instances(image: np.ndarray, instances: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Tint each instance with its own colour (golden-ratio hues), background untouched."""
    out = image.astype(np.float32).copy()
    for k in np.unique(instances):
        if k == 0:
            continue
        hue = (k * 0.618034) % 1.0
        color = np.array(Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0)))
        m = instances == k
        out[m] = (1 - alpha) * out[m] + alpha * color
    return out.astype(np.uint8)


def preview_grid(samples: list[dict[str, Any]], tile: int = 224) -> Image.Image:
    """Rows of [image | depth | instances + first referring expression]."""
    rows = []
    for s in samples:
        img = s["rgb.jpg"] if "rgb.jpg" in s else s["rgb.png"]
        tiles = [img]
        if "depth" in s:
            tiles.append(colorize(s["depth"], s.get("depth_valid")))
        if "inst.png" in s:
            tiles.append(overlay_instances(img, s["inst.png"]))
        row = Image.new("RGB", (tile * len(tiles), tile + 18), "white")
        for j, t in enumerate(tiles):
            row.paste(Image.fromarray(t).resize((tile, tile)), (j * tile, 0))
        objects = (s.get("json") or {}).get("objects") or []
        if objects:
            ImageDraw.Draw(row).text((4, tile + 3), objects[0].get("expression", "")[:90], fill="black")
        rows.append(row)
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


def inspect_dataset(urls: list[str], num_workers: int = 0, max_corrupt_fraction: float = 0.05,
                    preview: int = 4, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read every sample once; return counts, statistics, samples/s and a preview image."""
    shards = resolve_shards(urls)
    stats = CorruptionStats(max_fraction=max_corrupt_fraction)
    loader = make_loader(shard_pipeline(shards, stats=stats), num_workers=num_workers)
    objects_per_image: Counter[int] = Counter()
    classes: Counter[int] = Counter()
    depth_min, depth_max, n_qa, n = np.inf, 0.0, 0, 0
    kept: list[dict[str, Any]] = []
    start = time.perf_counter()
    for sample in loader:
        n += 1
        meta = sample.get("json") or {}
        objects_per_image[len(meta.get("objects", []))] += 1
        n_qa += len(meta.get("qa", []))
        if "sem.png" in sample:
            ids, counts = np.unique(sample["sem.png"], return_counts=True)
            classes.update(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
        if "depth" in sample and sample["depth_valid"].any():
            d = sample["depth"][sample["depth_valid"]]
            depth_min, depth_max = min(depth_min, float(d.min())), max(depth_max, float(d.max()))
        if len(kept) < preview:
            kept.append(sample)
        if progress:
            progress(n)
    elapsed = time.perf_counter() - start
    total_px = sum(classes.values()) or 1
    return {
        "num_samples": n,
        "num_shards": len(shards),
        "skipped": stats.skipped,
        "samples_per_s": n / elapsed if elapsed > 0 else 0.0,
        "objects_per_image": dict(sorted(objects_per_image.items())),
        "qa_per_image": n_qa / max(n, 1),
        "class_pixel_fraction": {k: v / total_px for k, v in sorted(classes.items())},
        "depth_range": [depth_min if n else 0.0, depth_max],
        "preview": preview_grid(kept) if kept else None,
    }
