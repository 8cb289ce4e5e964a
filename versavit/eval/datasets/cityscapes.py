"""Cityscapes fine annotations, 19 train ids, as published (train ids made by cityscapesscripts'
createTrainIdLabelImgs):

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png    0..18, 255 = ignore
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from versavit.eval.datasets.base import BenchmarkReader, Sample, read_label, read_rgb
from versavit.eval.metrics import IGNORE_INDEX

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelTrainIds.png"


class Cityscapes(BenchmarkReader):
    """Cityscapes: leftImg8bit/<split>/<city>/* + gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (255 = ignore)."""

    name = "cityscapes"
    tasks = ("seg",)
    num_classes = 19
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str, split: str = "val") -> None:
        super().__init__(root, split)

    def _items(self) -> list[tuple[Path, Path]]:
        images = sorted((self.root / "leftImg8bit" / self.split).glob(f"*/*{_IMAGE_SUFFIX}"))
        pairs = []
        for im in images:
            base = im.name[: -len(_IMAGE_SUFFIX)]
            pairs.append((im, self.root / "gtFine" / self.split / im.parent.name / f"{base}{_LABEL_SUFFIX}"))
        missing = [str(a.relative_to(self.root)) for _, a in pairs if not a.is_file()]
        if missing:
            raise ValueError(f"cityscapes: {len(missing)} image(s) without *{_LABEL_SUFFIX}, e.g. {missing[:3]} "
                             "(make them with cityscapesscripts' createTrainIdLabelImgs)")
        return pairs

    def _files(self, item: tuple[Path, Path]) -> list[Path]:
        return list(item)

    def _load(self, item: tuple[Path, Path]) -> Sample:
        image_path, label_path = item
        seg = read_label(label_path).astype(np.int64)
        seg[(seg >= self.num_classes) & (seg != IGNORE_INDEX)] = IGNORE_INDEX
        return read_rgb(image_path), {"key": image_path.name[: -len(_IMAGE_SUFFIX)], "seg": seg}
