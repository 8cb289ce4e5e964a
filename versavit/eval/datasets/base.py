"""What every benchmark reader provides: `(image, target)` samples plus the facts an evaluator needs.

    image   [H, W, 3] uint8 RGB
    target  a dict; by task:
            seg     "seg": [H, W] int64 class ids in [0, num_classes), IGNORE_INDEX (255) = ignore
            depth   "depth": [H, W] float32 metres, "valid": [H, W] bool (evaluated pixels)
            refseg  "masks": list of [H, W] bool, "sentences": list of str (one per referred object),
                    optionally "embeddings": [n, dim] float32 (precomputed text embeddings)
            every   "key": a stable sample id

Readers of on-disk layouts are local-folder readers; the synthetic reader and the readers of prepared benchmarks
(versavit.eval.datasets.prepared: what `versavit data prepare` writes) stream shards from any URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from versavit.data.codecs import decode_png
from versavit.eval.metrics import IGNORE_INDEX

Sample = tuple[np.ndarray, dict[str, Any]]


class BenchmarkReader:
    """Base class: subclasses set the class attributes and implement `_items` / `_load`."""

    name: str = ""
    tasks: tuple[str, ...] = ()
    num_classes: int = 0
    class_names: tuple[str, ...] = ()
    ignore_index: int = IGNORE_INDEX
    min_depth: float = 1e-3
    max_depth: float = 10.0

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            from versavit.storage import StorageError

            raise StorageError(f"{self.name}: dataset root {str(self.root)!r} is not a folder; expected the "
                               f"published layout ({type(self).__doc__.splitlines()[0]}) or the shards `versavit "
                               "data prepare` writes (<root>/<split>/manifest.json)", kind="missing")
        self.items: list[Any] = self._items()
        if not self.items:
            raise ValueError(f"{self.name}: no samples found for split {split!r} under {self.root}")

    # -- to implement
    def _items(self) -> list[Any]:
        raise NotImplementedError

    def _load(self, item: Any) -> Sample:
        raise NotImplementedError

    def _files(self, item: Any) -> list[Path]:
        """The files of one sample (for the digest)."""
        return []

    # -- common
    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Sample]:
        for item in self.items:
            yield self._load(item)

    def __getitem__(self, index: int) -> Sample:
        return self._load(self.items[index])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "root": str(self.root), "samples": len(self),
                "tasks": list(self.tasks), "num_classes": self.num_classes}

    def digest(self) -> str:
        """Identity of the data read (file names, sizes, modification times, reader settings), for cache keys.

        Stat-based, not content-based: hashing every image of ADE20k would cost more than reading it once."""
        h = hashlib.sha256(json.dumps({"reader": type(self).__name__, "split": self.split,
                                       "settings": self._settings()}, sort_keys=True).encode())
        for item in self.items:
            for f in self._files(item):
                st = f.stat()
                h.update(f"{f.relative_to(self.root)}:{st.st_size}:{int(st.st_mtime)};".encode())
        return h.hexdigest()[:32]

    def _settings(self) -> dict[str, Any]:
        return {}


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    """A label PNG as stored (palette indices for VOC-style palette PNGs, 16-bit kept 16-bit)."""
    return decode_png(path.read_bytes())


def depth_from_png(path: Path, divisor: float) -> tuple[np.ndarray, np.ndarray]:
    """16-bit depth PNG -> (metres float32, valid = code > 0)."""
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        codes = np.asarray(img).astype(np.int64)
    if codes.ndim != 2:
        raise ValueError(f"{path}: depth PNG must be single-channel, got shape {codes.shape}")
    return (codes / divisor).astype(np.float32), codes > 0
