"""COCO captions in Karpathy's splits (the image-text retrieval benchmark), read from the published layout or from
prepared shards.

    <root>/dataset_coco.json            Karpathy's split file (or <root>/karpathy/dataset_coco.json)
    <root>/val2014/COCO_val2014_*.jpg   (and train2014/ for the train split)

Layout and schema: versavit.data.prepare.coco_karpathy (which the published-layout reader shares): an image's path
is <filepath>/<filename>, its captions the sentences' "raw" strings; the evaluation split is "test" (5,000 images,
25,010 captions). A sample's target: "key" (<filepath>/<filename>), "cocoid" and "captions" (every raw caption of
the image, whitespace-stripped): each caption's image is its positive for text -> image retrieval, and an image
is found for image -> text when any of its captions is (versavit.eval.retrieval).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from versavit.data.prepare.coco_karpathy import (
    SPLITS,
    Record,
    images_root,
    parse_record,
    parse_split_file,
    split_entries,
    split_file,
)
from versavit.eval.datasets.base import BenchmarkReader, Sample, read_rgb
from versavit.eval.datasets.prepared import _image, _ShardReader

TASKS = ("retrieval",)


class CocoKarpathy(BenchmarkReader):
    """COCO Karpathy splits, the published layout (dataset_coco.json + val2014/, train2014/)."""

    name = "coco-karpathy"
    tasks = TASKS

    def __init__(self, root: str | Path, split: str = "test") -> None:
        if split not in SPLITS:
            raise ValueError(f"coco-karpathy split must be one of {list(SPLITS)}, got {split!r}")
        self._split_file = split_file(str(root))
        super().__init__(images_root(self._split_file), split)

    def _items(self) -> list[Record]:
        text = Path(self._split_file).read_text()
        self._split_sha = hashlib.sha256(text.encode()).hexdigest()[:16]
        items, missing = [], []
        for entry in split_entries(parse_split_file(text, self._split_file), self.split):
            try:
                record = parse_record(entry)
            except ValueError as exc:
                raise ValueError(f"coco-karpathy: {self._split_file}: {exc}") from None
            if not (self.root / record[0]).is_file():
                missing.append(record[0])
            items.append(record)
        if missing:
            raise ValueError(f"coco-karpathy: {len(missing)} image(s) of the {self.split} split are missing under "
                             f"{self.root}, e.g. {missing[:3]} (unzip val2014.zip / train2014.zip there)")
        return items

    def _files(self, item: Record) -> list[Path]:
        return [self.root / item[0]]

    def _settings(self) -> dict[str, Any]:
        return {"split_file": self._split_sha}  # a changed split file changes the digest

    def _load(self, item: Record) -> Sample:
        key, cocoid, captions, _ = item
        return read_rgb(self.root / key), {"key": key, "cocoid": cocoid, "captions": list(captions)}


class PreparedCocoKarpathy(_ShardReader):
    """COCO Karpathy prepared by `versavit data prepare coco-karpathy` (captions in each sample's json)."""

    name = "coco-karpathy"
    tasks = TASKS

    def __init__(self, url: str, split: str = "test") -> None:
        self._open(url, split)

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            meta = sample.get("json") or {}
            captions = meta.get("captions")
            if not captions:
                raise ValueError(f"coco-karpathy: prepared sample {sample['__key__']} in {self.url} has no captions; "
                                 "prepare it with `versavit data prepare coco-karpathy`")
            yield _image(sample), {"key": meta.get("key", sample["__key__"]), "cocoid": meta.get("cocoid", -1),
                                   "captions": [str(c) for c in captions]}
