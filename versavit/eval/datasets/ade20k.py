"""ADE20k (SceneParsing / ADEChallengeData2016), 150 classes, as published:

    ADEChallengeData2016/
      images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg
      annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png   8-bit, 0 = other/ignore, 1..150

Labels are shifted to 0..149 and 0 becomes the ignore index (mmsegmentation's reduce_zero_label). The layout
and the convention are versavit.data.prepare.benchmarks' (the `ade20k` prepare source uses the same functions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from versavit.data.prepare.benchmarks import ADE20K_SPLITS, ade20k_eval_labels, ade20k_root, list_ade20k
from versavit.eval.datasets.base import BenchmarkReader, Sample, read_label, read_rgb

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class ADE20k(BenchmarkReader):
    """ADEChallengeData2016 (or its parent): images/<split>/*.jpg + annotations/<split>/*.png (0 = ignore, 1..150)."""

    name = "ade20k"
    tasks = ("seg",)
    num_classes = 150
    class_names = ADE20K_CLASSES

    def __init__(self, root: str, split: str = "validation") -> None:
        if split not in ADE20K_SPLITS:
            raise ValueError(f"ade20k split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}")
        super().__init__(ade20k_root(str(root)) if Path(root).is_dir() else root, ADE20K_SPLITS[split])

    def _items(self) -> list[tuple[Path, Path]]:
        stems = list_ade20k(str(self.root), self.split)
        pairs = [(self.root / "images" / self.split / f"{s}.jpg", self.root / "annotations" / self.split / f"{s}.png")
                 for s in stems]
        missing = [str(a.relative_to(self.root)) for _, a in pairs if not a.is_file()]
        if missing:
            raise ValueError(f"ade20k: {len(missing)} image(s) without annotation, e.g. {missing[:3]}")
        return pairs

    def _files(self, item: tuple[Path, Path]) -> list[Path]:
        return list(item)

    def _load(self, item: tuple[Path, Path]) -> Sample:
        image_path, label_path = item
        seg = ade20k_eval_labels(read_label(label_path)).astype(np.int64)  # 1..150 -> 0..149, 0 -> ignore
        return read_rgb(image_path), {"key": image_path.stem, "seg": seg}
