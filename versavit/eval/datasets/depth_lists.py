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
    <root>/raw/<date>/<drive>/image_02/data/*.png                    (KITTI raw images)
    <root>/data_depth_annotated/<drive>/proj_depth/groundtruth/...   (train/ and val/ of the depth benchmark merged)

Lines whose depth is "None" are skipped. On the test split the usual evaluation crop is applied to the valid
mask (NYUv2: Eigen crop rows 45:471, cols 41:601 of 480x640; KITTI: Garg crop), as are the depth caps
(min_depth, max_depth) = (1e-3, 10) m and (1e-3, 80) m.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from versavit.eval.datasets.base import BenchmarkReader, Sample, depth_from_png, read_rgb

Pair = tuple[Path, Path]


class DepthListReader(BenchmarkReader):
    """Image/depth pairs from a BTS-style split file."""

    tasks = ("depth",)
    depth_divisor: float = 1000.0
    list_files: dict[str, str] = {}
    image_dirs: dict[str, str] = {}
    depth_dirs: dict[str, str] = {}
    eval_splits: tuple[str, ...] = ("test",)

    def __init__(self, root: str, split: str = "test", eval_crop: bool | None = None) -> None:
        if split not in self.list_files:
            raise ValueError(f"{self.name} split must be one of {sorted(self.list_files)}, got {split!r}")
        self.eval_crop = split in self.eval_splits if eval_crop is None else eval_crop
        super().__init__(root, split)

    def _items(self) -> list[Pair]:
        listing = self.root / self.list_files[self.split]
        if not listing.is_file():
            raise ValueError(f"{self.name}: no split file {listing}")
        images, depths = self.root / self.image_dirs[self.split], self.root / self.depth_dirs[self.split]
        pairs = []
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2 or parts[1] == "None":
                continue  # KITTI's Eigen test list names frames that have no projected lidar depth
            pairs.append((images / parts[0], depths / parts[1]))
        missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise ValueError(f"{self.name}: {len(missing)} file(s) listed in {listing.name} are missing, "
                             f"e.g. {missing[:3]}")
        return pairs

    def _files(self, item: Pair) -> list[Path]:
        return list(item)

    def _settings(self) -> dict:
        return {"eval_crop": self.eval_crop, "min": self.min_depth, "max": self.max_depth}

    def crop_mask(self, height: int, width: int) -> np.ndarray:
        return np.ones((height, width), bool)

    def _load(self, item: Pair) -> Sample:
        image_path, depth_path = item
        image = read_rgb(image_path)
        depth, valid = depth_from_png(depth_path, self.depth_divisor)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"{self.name}: {depth_path.name} is {depth.shape}, its image {image.shape[:2]}")
        valid &= (depth > self.min_depth) & (depth < self.max_depth)
        if self.eval_crop:
            valid &= self.crop_mask(*depth.shape)
        key = str(image_path.relative_to(self.root / self.image_dirs[self.split]).with_suffix(""))
        return image, {"key": key, "depth": depth, "valid": valid}


class NYUv2Depth(DepthListReader):
    """NYUv2 depth, BTS layout (split file + official_splits/test + sync/), 16-bit PNG in millimetres."""

    name = "nyu"
    max_depth = 10.0
    depth_divisor = 1000.0
    list_files = {"train": "nyudepthv2_train_files_with_gt.txt", "test": "nyudepthv2_test_files_with_gt.txt"}
    image_dirs = {"train": "sync", "test": "official_splits/test"}
    depth_dirs = image_dirs

    def crop_mask(self, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), bool)
        if (height, width) == (480, 640):
            mask[45:471, 41:601] = True  # Eigen crop: the border NYUv2's depth does not cover
        else:  # resized copies: the same fractions
            rows = slice(round(45 / 480 * height), round(471 / 480 * height))
            mask[rows, round(41 / 640 * width):round(601 / 640 * width)] = True
        return mask


class KITTIDepth(DepthListReader):
    """KITTI Eigen split, BTS layout (split file + raw/ + data_depth_annotated/), 16-bit PNG / 256 = metres."""

    name = "kitti"
    max_depth = 80.0
    depth_divisor = 256.0
    list_files = {"train": "eigen_train_files_with_gt.txt", "test": "eigen_test_files_with_gt.txt"}
    image_dirs = {"train": "raw", "test": "raw"}
    depth_dirs = {"train": "data_depth_annotated", "test": "data_depth_annotated"}

    def crop_mask(self, height: int, width: int) -> np.ndarray:
        mask = np.zeros((height, width), bool)  # Garg crop
        mask[int(0.40810811 * height):int(0.99189189 * height), int(0.03594771 * width):int(0.96405229 * width)] = True
        return mask
