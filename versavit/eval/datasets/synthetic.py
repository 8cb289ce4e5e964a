"""The synthetic world's shards as a benchmark (the tiny configuration's default): every task at once.

    seg     sem.png class ids of versavit.data.synthetic.CLASSES (255 = ignore)
    depth   depth.png in metres (z-depth), valid where the code is non-zero
    refseg  one query per object: its instance mask (inst.png == id), its expression, and its text
            embedding from emb.npy when the dataset has been through `versavit label embed`
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from versavit import storage
from versavit.data.loader import shard_pipeline
from versavit.data.shards import read_manifest
from versavit.data.synthetic import CLASSES, IGNORE_INDEX
from versavit.eval.datasets.base import BenchmarkReader, Sample


class SyntheticWorld(BenchmarkReader):
    """Synthetic-world shard dataset (<workdir>/data/synthetic/<split>, a folder with manifest.json)."""

    name = "synthetic"
    tasks = ("seg", "depth", "refseg")
    num_classes = len(CLASSES)
    class_names = CLASSES
    ignore_index = IGNORE_INDEX
    max_depth = 10.0  # the back wall stands at 8.5-10 m

    def __init__(self, url: str, split: str = "val", embeddings_url: str | None = None) -> None:
        """url: the rendered world's split (exact ground truth); embeddings_url: a labelled copy of the same
        split whose emb.npy are attached by sample key (its depth may be a teacher's, never used here)."""
        self.url = url.rstrip("/")
        self.root = self.url  # type: ignore[assignment]  # shards, not a file layout: no super().__init__
        self.split = split
        self.manifest = read_manifest(self.url)
        self.items = []
        self.embeddings = read_manifest(embeddings_url) if embeddings_url else None
        self.has_embeddings = "emb.npy" in (self.embeddings or self.manifest).fields

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getitem__(self, index: int) -> Sample:
        raise TypeError("the synthetic benchmark is a stream of shards: iterate over it")

    def digest(self) -> str:
        # images and ground truth only: the cached features and targets do not depend on the embeddings
        return self.manifest.digest

    def describe(self) -> dict:
        return super().describe() | {"root": storage.join(self.url), "embeddings": self.has_embeddings,
                                     "embeddings_from": self.embeddings.url if self.embeddings else None}

    def _embeddings_by_key(self) -> dict[str, np.ndarray]:
        if self.embeddings is None:
            return {}
        return {s["__key__"]: np.atleast_2d(s["emb.npy"]).astype(np.float32)
                for s in shard_pipeline(self.embeddings.shard_urls(), split_by_node=False) if "emb.npy" in s}

    def __iter__(self) -> Iterator[Sample]:
        extra = self._embeddings_by_key()
        # in shard order, one process: the same order on every call (caches and figures rely on it)
        pipeline = shard_pipeline(self.manifest.shard_urls(), split_by_node=False)
        for sample in pipeline:
            image = sample.get("rgb.jpg", sample.get("rgb.png"))
            meta = sample.get("json") or {}
            target: dict = {"key": sample["__key__"]}
            if "sem.png" in sample:
                target["seg"] = sample["sem.png"].astype(np.int64)
            if "depth" in sample:
                kind = (meta.get("depth") or {}).get("kind", "depth")
                depth, valid = sample["depth"], sample["depth_valid"] & (sample["depth"] > 0)
                if kind == "disparity":  # a relabelled copy may store disparity: evaluate in metres anyway
                    depth = np.where(valid, 1.0 / np.maximum(depth, 1e-6), 0).astype(np.float32)
                target["depth"], target["valid"] = depth.astype(np.float32), valid
            objects = meta.get("objects") or []
            if "inst.png" in sample and objects:
                target["masks"] = [sample["inst.png"] == o["id"] for o in objects]
                target["sentences"] = [o.get("expression", "") for o in objects]
                if sample["__key__"] in extra:
                    target["embeddings"] = extra[sample["__key__"]]
                elif "emb.npy" in sample:
                    target["embeddings"] = np.atleast_2d(sample["emb.npy"]).astype(np.float32)
            yield image, target
