"""NYUv2 and KITTI depth in the file layout of BTS / AdaBins / Depth-Anything's metric-depth code: a split
file lists `image depth [focal]` pairs relative to an image root and a depth root; depth maps are 16-bit PNGs.

NYUv2 (the 654-image test split of Eigen et al.; depth in millimetres):

    <root>/nyudepthv2_test_files_with_gt.txt     "bathroom/rgb_00045.jpg bathroom/sync_depth_00045.png 518.8579"
    <root>/nyudepthv2_train_files_with_gt.txt    pairs of the training scenes
    <root>/official_splits/test/<scene>/rgb_XXXXX.jpg, sync_depth_XXXXX.png      (test: images and depth)
    <root>/sync/<scene>/rgb_XXXXX.jpg, sync_depth_XXXXX.png                      (train)

KITTI (Eigen split, 697 test lines of which 652 have ground truth; value / 256 = metres, 0 = no lidar point):

    <root>/eigen_test_files_with_gt.txt   one line per frame:
        "2011_09_26/2011_09_26_drive_0002_sync/image_02/data/0000000069.png
         2011_09_26_drive_0002_sync/proj_depth/groundtruth/image_02/0000000069.png 721.5377"
    <root>/eigen_train_files_with_gt.txt
    <root>/raw/<date>/<drive>/image_02/data/*.png                    (KITTI raw images; raw_data/ works too)
    <root>/data_depth_annotated/<drive>/proj_depth/groundtruth/...   (train/ and val/ of the depth benchmark merged,
                                                                     as BTS does, or left as the zip unpacks them)

Lines whose depth is "None" are skipped; NYUv2's train list starts its paths with "/", Depth-Anything-V2's KITTI
lists hold absolute paths: both are placed under the root (versavit.data.prepare.benchmarks.parse_depth_list,
shared with the `nyuv2` / `kitti` prepare sources). On the test split the usual evaluation crop is applied to the valid
mask (NYUv2: Eigen crop rows 45:471, cols 41:601 of 480x640; KITTI: Garg crop), as are the depth caps
(min_depth, max_depth) = (1e-3, 10) m and (1e-3, 80) m.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from versavit.data.prepare.benchmarks import KITTI, NYU, DepthLayout, first_existing, parse_depth_list
from versavit.eval.datasets.base import BenchmarkReader, Sample, depth_from_png, read_rgb

Pair = tuple[Path, Path]


class DepthListReader(BenchmarkReader):
    """Image/depth pairs from a BTS-style split file."""

    tasks = ("depth",)
    layout: DepthLayout = NYU

    def __init__(self, root: str, split: str = "test", eval_crop: bool | None = None) -> None:
        if split not in self.layout.list_files:
            raise ValueError(f"{self.name} split must be one of {sorted(self.layout.list_files)}, got {split!r}")
        self.eval_crop = split in self.layout.eval_splits if eval_crop is None else eval_crop
        super().__init__(root, split)

    @property
    def depth_divisor(self) -> float:
        return self.layout.scale

    def _items(self) -> list[Pair]:
        listing = self.root / self.layout.list_files[self.split]
        if not listing.is_file():
            raise ValueError(f"{self.name}: no split file {listing}")
        self.image_dir = self.root / first_existing(str(self.root), self.layout.image_dirs[self.split])
        depth_dirs = [self.root / d for d in self.layout.depth_dirs[self.split]]
        pairs, missing = [], []
        for image_rel, depth_rel, _ in parse_depth_list(listing.read_text(), self.layout):
            image = self.image_dir / image_rel
            depth = next((d / depth_rel for d in depth_dirs if (d / depth_rel).is_file()), depth_dirs[0] / depth_rel)
            missing += [str(p) for p in (image, depth) if not p.is_file()]
            pairs.append((image, depth))
        if missing:
            raise ValueError(f"{self.name}: {len(missing)} file(s) listed in {listing.name} are missing, "
                             f"e.g. {missing[:3]}")
        return pairs

    def _files(self, item: Pair) -> list[Path]:
        return list(item)

    def _settings(self) -> dict:
        return {"eval_crop": self.eval_crop, "min": self.min_depth, "max": self.max_depth}

    def crop_mask(self, height: int, width: int) -> np.ndarray:
        return self.layout.crop(height, width)

    def _load(self, item: Pair) -> Sample:
        image_path, depth_path = item
        image = read_rgb(image_path)
        depth, valid = depth_from_png(depth_path, self.layout.scale)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"{self.name}: {depth_path.name} is {depth.shape}, its image {image.shape[:2]}")
        valid &= (depth > self.min_depth) & (depth < self.max_depth)
        if self.eval_crop:
            valid &= self.crop_mask(*depth.shape)
        key = str(image_path.relative_to(self.image_dir).with_suffix(""))
        return image, {"key": key, "depth": depth, "valid": valid}


class NYUv2Depth(DepthListReader):
    """NYUv2 depth, BTS layout (split file + official_splits/test + sync/), 16-bit PNG in millimetres."""

    name = "nyu"
    layout = NYU
    min_depth = NYU.min_depth
    max_depth = NYU.max_depth


class KITTIDepth(DepthListReader):
    """KITTI Eigen split, BTS layout (split file + raw/ + data_depth_annotated/), 16-bit PNG / 256 = metres."""

    name = "kitti"
    layout = KITTI
    min_depth = KITTI.min_depth
    max_depth = KITTI.max_depth
