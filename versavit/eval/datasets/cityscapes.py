"""Cityscapes fine annotations, 19 train ids, as published:

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png    0..18, 255 = ignore
                                                  _gtFine_labelIds.png         0..33 (as the gtFine zip ships)

The train-id images (cityscapesscripts' createTrainIdLabelImgs) are read where they exist; otherwise the
published labelIds are mapped to train ids (versavit.data.prepare.benchmarks.CITYSCAPES_TRAIN_IDS, the same
mapping the `cityscapes` prepare source applies).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from versavit.data.prepare.benchmarks import CITYSCAPES_IMAGE_SUFFIX, cityscapes_label_files, list_cityscapes
from versavit.eval.datasets.base import BenchmarkReader, Sample, read_label, read_rgb

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
_IMAGE_SUFFIX = CITYSCAPES_IMAGE_SUFFIX
Item = tuple[Path, Path, Callable[[np.ndarray], np.ndarray]]


class Cityscapes(BenchmarkReader):
    """Cityscapes: leftImg8bit/<split>/<city>/* + gtFine/<split>/<city>/*_gtFine_labelTrainIds.png or *_labelIds.png."""

    name = "cityscapes"
    tasks = ("seg",)
    num_classes = 19
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)

    def _items(self) -> list[Item]:
        items, missing = [], []
        for unit in list_cityscapes(str(self.root), self.split):
            image = self.root / "leftImg8bit" / self.split / f"{unit}{_IMAGE_SUFFIX}"
            labels = [(self.root / rel, convert) for rel, _, convert in cityscapes_label_files(self.split, unit)]
            found = next(((path, convert) for path, convert in labels if path.is_file()), None)
            if found is None:
                missing.append(str(labels[-1][0].relative_to(self.root)))
                continue
            items.append((image, *found))
        if missing:
            raise ValueError(f"cityscapes: {len(missing)} image(s) without *_gtFine_labelTrainIds.png or "
                             f"*_gtFine_labelIds.png, e.g. {missing[:3]} (unzip gtFine_trainvaltest.zip beside "
                             "leftImg8bit/; createTrainIdLabelImgs is optional)")
        return items

    def _files(self, item: Item) -> list[Path]:
        return [item[0], item[1]]

    def _load(self, item: Item) -> Sample:
        image_path, label_path, convert = item
        seg = convert(read_label(label_path)).astype(np.int64)
        return read_rgb(image_path), {"key": image_path.name[: -len(_IMAGE_SUFFIX)], "seg": seg}
