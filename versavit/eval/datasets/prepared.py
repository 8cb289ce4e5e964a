"""Benchmarks prepared by `versavit data prepare` (versavit.data.prepare.benchmarks, and the RefCOCO family's
refseg splits of versavit.data.prepare.training): one shard dataset per split, local or s3://, read by URL.

    <url>/<split>/manifest.json + shard-*.tar     (or <url>/manifest.json: one split, the source's default)

Seg benchmarks carry sem.png in the evaluation convention already (255 = ignore); depth benchmarks carry the
published 16-bit codes and their scale, to which the benchmark's depth caps and, on its evaluation split, its
evaluation crop are applied here, as the published-layout readers do. Samples come in shard order, one process,
so every pass yields the same order (feature caches rely on it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from versavit import storage
from versavit.data.codecs import decode_rle
from versavit.data.loader import shard_pipeline
from versavit.data.prepare.benchmarks import DEPTH_LAYOUTS
from versavit.data.shards import MANIFEST, Manifest, read_manifest
from versavit.eval.datasets.base import BenchmarkReader, Sample


def is_prepared(url: str) -> bool:
    """Whether `url` is a prepared split (a folder, local or s3://, holding manifest.json)."""
    return storage.exists(storage.join(url, MANIFEST))


def _image(sample: dict[str, Any]) -> np.ndarray:
    for name in ("rgb.jpg", "rgb.png", "jpg", "png"):
        if name in sample:
            return sample[name]
    raise KeyError(f"prepared sample {sample.get('__key__')} has no image")


class _ShardReader(BenchmarkReader):
    """Common part: a manifest instead of a folder layout; the digest is the shards' content digest."""

    def _open(self, url: str, split: str) -> None:
        self.url = url.rstrip("/")
        self.root = self.url  # type: ignore[assignment]  # shards, not a file layout: no super().__init__
        self.split = split
        self.manifest: Manifest = read_manifest(self.url)
        self.items = []
        if self.manifest.num_samples == 0:
            raise ValueError(f"{self.name}: the prepared split at {self.url} holds no samples")

    def __len__(self) -> int:
        return self.manifest.num_samples

    def __getitem__(self, index: int) -> Sample:
        raise TypeError(f"a prepared benchmark ({self.name}) is a stream of shards: iterate over it")

    def digest(self) -> str:
        """The shards' content digest (manifest) plus what this reader does to them (caps, crop): a local and an
        s3:// copy of the same shards share their feature and target caches."""
        ident = {"reader": type(self).__name__, "name": self.name, "split": self.split,
                 "settings": self._settings(), "data": self.manifest.digest}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"root": self.url, "prepared": True, "data_digest": self.manifest.digest}

    def _samples(self) -> Iterator[dict[str, Any]]:
        yield from shard_pipeline(self.manifest.shard_urls(), split_by_node=False)


class PreparedBenchmark(_ShardReader):
    """A seg or depth benchmark split prepared into shards; class facts come from its published-layout reader."""

    def __init__(self, url: str, split: str, like: type[BenchmarkReader], eval_crop: bool | None = None) -> None:
        for attr in ("name", "tasks", "num_classes", "class_names", "ignore_index", "min_depth", "max_depth"):
            setattr(self, attr, getattr(like, attr))
        layout = DEPTH_LAYOUTS.get(self.name) if "depth" in self.tasks else None
        self.crop: Callable[[int, int], np.ndarray] | None = layout.crop if layout else None
        self.eval_crop = bool(layout and split in layout.eval_splits) if eval_crop is None else eval_crop
        self._open(url, split)

    def _settings(self) -> dict[str, Any]:
        if "depth" not in self.tasks:
            return {}
        return {"eval_crop": self.eval_crop, "min": self.min_depth, "max": self.max_depth}

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            meta = sample.get("json") or {}
            target: dict[str, Any] = {"key": meta.get("key", sample["__key__"])}
            if "sem.png" in sample:
                target["seg"] = sample["sem.png"].astype(np.int64)
            if "depth" in sample:
                depth = sample["depth"].astype(np.float32)
                valid = sample["depth_valid"] & (depth > self.min_depth) & (depth < self.max_depth)
                if self.eval_crop and self.crop is not None:
                    valid &= self.crop(*depth.shape)
                target["depth"], target["valid"] = depth, valid
            yield _image(sample), target


class PreparedRefSeg(_ShardReader):
    """A RefCOCO-family split prepared into refseg shards (the training refseg format): every sample's referred
    objects become queries, one per sentence.

    A sample holds either one referred object (mask.png, json expression: `versavit.data.convert.convert_refcoco`,
    one sample per sentence) or `objects` with an RLE `segmentation` (or ids into inst.png) and an `expression`
    (or a list of `sentences`). emb.npy, when the text embeddings were precomputed, is used where it has one row
    per query; otherwise the evaluator embeds the sentences with the run's embedder."""

    tasks = ("refseg",)

    def __init__(self, url: str, dataset: str, split: str) -> None:
        self.name = dataset
        self.dataset = dataset
        self._open(url, split)

    def _settings(self) -> dict[str, Any]:
        return {"dataset": self.dataset}

    @staticmethod
    def _queries(sample: dict[str, Any], meta: dict[str, Any]) -> tuple[list[np.ndarray], list[str], list[Any]]:
        objects = meta.get("objects") or []
        masks: list[np.ndarray] = []
        sentences: list[str] = []
        ref_ids: list[Any] = []
        if "mask.png" in sample:
            mask = np.asarray(sample["mask.png"]) > 0
            texts = meta.get("sentences") or [meta.get("expression") or (objects[0].get("expression", "")
                                                                         if objects else "")]
            for text in texts:
                masks.append(mask)
                sentences.append(str(text))
                ref_ids.append(meta.get("ref_id"))
            return masks, sentences, ref_ids
        for obj in objects:
            if obj.get("segmentation") is not None:
                mask = decode_rle(obj["segmentation"])
            elif "inst.png" in sample:
                mask = sample["inst.png"] == obj["id"]
            else:
                continue
            texts = obj.get("sentences") or ([obj["expression"]] if obj.get("expression") else [])
            for text in texts:
                masks.append(mask)
                sentences.append(str(text.get("sent", "") if isinstance(text, dict) else text))
                ref_ids.append(obj.get("ref_id", meta.get("ref_id")))
        return masks, sentences, ref_ids

    def __iter__(self) -> Iterator[Sample]:
        for sample in self._samples():
            meta = sample.get("json") or {}
            masks, sentences, ref_ids = self._queries(sample, meta)
            target: dict[str, Any] = {"key": sample["__key__"], "masks": masks, "sentences": sentences,
                                      "ref_ids": ref_ids}
            if "emb.npy" in sample:
                emb = np.atleast_2d(np.asarray(sample["emb.npy"], np.float32))
                if emb.shape[0] == len(masks):
                    target["embeddings"] = emb
            yield _image(sample), target
