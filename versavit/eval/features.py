"""Frozen-backbone features for linear probes: computed once per (backbone, dataset split, resolution), cached.

Every image is resized to R x R (bilinear, antialiased) and passed once through the frozen backbone in fp32;
the final layer's patch features [D, R/p, R/p] (patch p = 14; 16 for SigLIP2) are stored as float16 in a .npy
memory map, so a probe reads them for all its epochs (and a second probe on the same split reads them again)
without touching the backbone. Targets are resized to R x R with nearest neighbour (labels and depth are never
interpolated) and cached separately: they do not depend on the backbone.

    <cache>/features/<backbone digest>-<dataset digest>-r<R>/{features.npy, meta.json}
    <cache>/targets/<dataset digest>-r<R>/{seg.npy, depth.npy, valid.npy, images.npy, meta.json}

A cache entry becomes visible in one rename once complete (meta.json inside), so an interrupted extraction
is redone, never half-read. Disk cost: N * D * (R/14)^2 * 2 bytes (ADE20k train at 560 px with D = 1280:
about 83 GB; the tiny configuration: a few MB).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from versavit.data.tasks import image_tensor
from versavit.eval.datasets.base import BenchmarkReader
from versavit.models.backbone import VisionBackbone

log = logging.getLogger(__name__)
PREVIEW_IMAGES = 4  # input images kept (at R x R) for the report's figures
_TARGET_KEYS = ("seg", "depth", "valid")


@dataclass
class FeatureSet:
    """Cached features of one split and its targets, all at one resolution (arrays may be memory maps)."""

    features: np.ndarray  # [N, D, h, w] float16
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # seg [N, R, R] uint8, depth f32, valid bool
    images: np.ndarray | None = None  # [K, R, R, 3] uint8, the first K inputs
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.meta.get("resolution", 0))


def backbone_digest(backbone: torch.nn.Module) -> str:
    """Content digest of a module's weights (names, dtypes, shapes, bytes): the cache key of its features."""
    h = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _nearest(array: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if tuple(t.shape) == (size, size):
        return t
    return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].to(t.dtype)


def _finished(path: Path) -> bool:
    return (path / "meta.json").is_file()


def _commit(tmp: Path, final: Path) -> None:
    """Publish a finished cache folder in one rename (a concurrent writer's copy wins if it was first)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not _finished(final):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _load(feature_dir: Path, target_dir: Path) -> FeatureSet:
    meta = json.loads((feature_dir / "meta.json").read_text())
    n = meta["num_samples"]
    features = np.load(feature_dir / "features.npy", mmap_mode="r")[:n]
    targets = {k: np.load(target_dir / f"{k}.npy", mmap_mode="r")[:n] for k in _TARGET_KEYS
               if (target_dir / f"{k}.npy").is_file()}
    images = np.load(target_dir / "images.npy") if (target_dir / "images.npy").is_file() else None
    return FeatureSet(features, targets, images, meta)


def cached_features(backbone: VisionBackbone, reader: BenchmarkReader, resolution: int, cache_dir: str | Path,
                    batch_size: int = 8, device: torch.device | str | None = None, digest: str | None = None,
                    label: str = "") -> FeatureSet:
    """Final-layer patch features of every image of `reader` at `resolution`, from the cache or computed now."""
    unit = backbone.patch_size * backbone.merge_size
    if resolution % unit:
        raise ValueError(f"probe resolution must be a multiple of {unit}, got {resolution}")
    cache = Path(cache_dir)
    data_key = f"{reader.digest()[:16]}-r{resolution}"
    digest = digest or backbone_digest(backbone)
    feature_dir = cache / "features" / f"{digest[:16]}-{data_key}"
    target_dir = cache / "targets" / data_key
    if _finished(feature_dir) and _finished(target_dir):
        log.info("features of %s/%s at %d px: cached at %s", reader.name, reader.split, resolution, feature_dir)
        return _load(feature_dir, target_dir)
    _extract(backbone, reader, resolution, feature_dir, target_dir, batch_size, device, digest, label)
    return _load(feature_dir, target_dir)


@torch.inference_mode()
def _extract(backbone: VisionBackbone, reader: BenchmarkReader, resolution: int, feature_dir: Path,
             target_dir: Path, batch_size: int, device: torch.device | str | None, digest: str, label: str) -> None:
    from versavit.progress import progress_bar

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = backbone.to(device).eval()
    n_max, grid = len(reader), resolution // backbone.patch_size
    write_targets = not _finished(target_dir)
    suffix = f".tmp-{uuid.uuid4().hex[:8]}"
    ftmp = feature_dir.with_name(feature_dir.name + suffix)
    ttmp = target_dir.with_name(target_dir.name + suffix)
    ftmp.mkdir(parents=True)
    if write_targets:
        ttmp.mkdir(parents=True)
    features = np.lib.format.open_memmap(ftmp / "features.npy", mode="w+", dtype=np.float16,
                                         shape=(n_max, backbone.embed_dim, grid, grid))
    targets: dict[str, np.ndarray] = {}
    previews: list[np.ndarray] = []
    batch: list[torch.Tensor] = []
    count = 0

    def flush() -> None:
        nonlocal count
        maps = backbone(torch.stack(batch).to(device)).maps
        features[count:count + len(batch)] = maps.float().cpu().numpy().astype(np.float16)
        count += len(batch)
        batch.clear()

    try:
        with progress_bar() as bar:
            task = bar.add_task(f"features {label or 'backbone'} {reader.name}/{reader.split} @{resolution}",
                                total=n_max)
            for index, (image, target) in enumerate(reader):
                if index >= n_max:
                    raise ValueError(f"{reader.name}/{reader.split} yielded more than its {n_max} samples")
                batch.append(image_tensor(image, (resolution, resolution)))
                if write_targets:
                    _store_targets(targets, ttmp, target, index, n_max, resolution, reader)
                    if len(previews) < PREVIEW_IMAGES:
                        previews.append((batch[-1].permute(1, 2, 0) * 255).round().byte().numpy())
                if len(batch) == batch_size:
                    flush()
                bar.update(task, completed=index + 1)
            if batch:
                flush()
        if count == 0:
            raise ValueError(f"{reader.name}/{reader.split}: no samples could be read")
        features.flush()
        meta = {"num_samples": count, "resolution": resolution, "grid": grid, "embed_dim": backbone.embed_dim,
                "backbone_digest": digest, "dataset": reader.describe(), "dataset_digest": reader.digest()}
        if write_targets:
            for arr in targets.values():
                arr.flush()
            np.save(ttmp / "images.npy", np.stack(previews) if previews else np.zeros((0, resolution, resolution, 3),
                                                                                     np.uint8))
            (ttmp / "meta.json").write_text(json.dumps({k: meta[k] for k in ("num_samples", "resolution", "dataset",
                                                                           "dataset_digest")}, indent=1))
            _commit(ttmp, target_dir)
        (ftmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _commit(ftmp, feature_dir)
    finally:
        shutil.rmtree(ftmp, ignore_errors=True)
        shutil.rmtree(ttmp, ignore_errors=True)


def _store_targets(targets: dict[str, np.ndarray], folder: Path, target: dict[str, Any], index: int, n: int,
                   resolution: int, reader: BenchmarkReader) -> None:
    """Write one sample's seg / depth / valid maps, resized to R x R (nearest), into the target memmaps."""
    shape = (n, resolution, resolution)
    if "seg" in target:
        if reader.num_classes > 255:
            raise ValueError(f"{reader.name}: more than 255 classes do not fit the uint8 label cache")
        if "seg" not in targets:
            targets["seg"] = np.lib.format.open_memmap(folder / "seg.npy", mode="w+", dtype=np.uint8, shape=shape)
            targets["seg"][:] = reader.ignore_index  # samples that fail to load stay ignored
        targets["seg"][index] = _nearest(np.asarray(target["seg"]).astype(np.uint8), resolution).numpy()
    if "depth" in target:
        if "depth" not in targets:
            targets["depth"] = np.lib.format.open_memmap(folder / "depth.npy", mode="w+", dtype=np.float32,
                                                         shape=shape)
            targets["valid"] = np.lib.format.open_memmap(folder / "valid.npy", mode="w+", dtype=np.bool_, shape=shape)
        targets["depth"][index] = _nearest(np.asarray(target["depth"], np.float32), resolution).numpy()
        targets["valid"][index] = _nearest(np.asarray(target["valid"], np.uint8), resolution).numpy().astype(bool)
