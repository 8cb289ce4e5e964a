"""Pascal VOC 2012 semantic segmentation, 21 classes (background + 20), as published:

    VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png                 palette PNG: index = class, 255 = boundary/ignore
      ImageSets/Segmentation/{train,val,trainval}.txt
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from versavit.data.prepare.benchmarks import list_voc, voc_eval_labels, voc_root
from versavit.eval.datasets.base import BenchmarkReader, Sample, read_label, read_rgb

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class PascalVOC(BenchmarkReader):
    """VOC2012: JPEGImages + SegmentationClass + ImageSets/Segmentation/<split>.txt (255 = ignore)."""

    name = "voc"
    tasks = ("seg",)
    num_classes = 21
    class_names = VOC_CLASSES

    def __init__(self, root: str, split: str = "val") -> None:
        # the folder holding VOCdevkit/, VOCdevkit/ itself or VOC2012/
        super().__init__(voc_root(str(root)) if Path(root).is_dir() else root, split)

    def _items(self) -> list[tuple[Path, Path]]:
        listing = self.root / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not listing.is_file():
            raise ValueError(f"voc: no split file {listing}")
        ids = list_voc(str(self.root), self.split)
        pairs = [(self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClass" / f"{i}.png") for i in ids]
        missing = [str(p.relative_to(self.root)) for pair in pairs for p in pair if not p.is_file()]
        if missing:
            raise ValueError(f"voc: {len(missing)} file(s) listed in {listing.name} are missing, e.g. {missing[:3]}")
        return pairs

    def _files(self, item: tuple[Path, Path]) -> list[Path]:
        return list(item)

    def _load(self, item: tuple[Path, Path]) -> Sample:
        image_path, label_path = item
        raw = read_label(label_path)
        if raw.ndim != 2:
            raise ValueError(f"voc: {label_path} is not a palette/grey label PNG (shape {raw.shape})")
        seg = voc_eval_labels(raw).astype(np.int64)  # indices 0..20, 255 boundary = ignore
        return read_rgb(image_path), {"key": image_path.stem, "seg": seg}
