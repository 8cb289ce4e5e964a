"""Sharded, resumable labelling jobs: `label_dataset(kind, input, output, cfg, shard_index, num_shards)`.

A job reads an input dataset (folder with manifest.json) and writes an output dataset with the
same shard layout: output shard i holds input shard i's samples with the teacher's fields added
or replaced and every other field copied byte for byte, so the output is a complete dataset that
the next job (or training) reads on its own.

Scale-out and restarts:
- worker i of n takes input shards i, i+n, i+2n, ... (shards[i::n]);
- each output shard is committed atomically (ShardWriter), then `<output>/done/shard-NNNNNN.json`
  records what was done (input digest, teacher signature, counts, output digest);
- a rerun skips every shard whose done record matches the input shard's sha256 and the teacher
  signature, so an interrupted job redoes only what is missing, and a changed teacher redoes all;
- manifest finalisation: after its own shards, every worker lists the done records, and the one
  that sees all of them writes `<output>/manifest.json`. Done records are written before that
  check, so the last worker to finish always sees the complete set (storage is strongly
  consistent: local files, S3, MinIO); if two workers finish together both write the same
  manifest (its `created` is the latest done record's time, not the clock), atomically.
  `finalize_dataset` (CLI `--finalize`) writes it on its own, e.g. after moving done records.

`labeling.use_ground_truth`: True keeps a label the sample already carries (the synthetic
world's exact depth, instance masks and expressions; SA-1B's masks; RefCOCO's expressions) and
teachers fill only what is missing; False has the teachers replace them. Embeddings are always
computed: no source carries them.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from versavit import storage
from versavit.config.schema import LabelingConfig
from versavit.data import codecs
from versavit.data.done import done_names as _done_names
from versavit.data.done import done_url, manifest_from_records
from versavit.data.done import output_shards as _output_shards
from versavit.data.done import read_done_records as _read_records
from versavit.data.done import remove_stale_manifest as _remove_stale_manifest
from versavit.data.loader import CorruptionStats, open_shards
from versavit.data.shards import MANIFEST, Manifest, ShardInfo, ShardWriter, read_manifest
from versavit.labeling.describe import CLASS_LABEL, DESCRIBE_PROMPTING, Region, class_label, load_describer

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("depth", "masks", "describe", "embed")
IMAGE_FIELDS = ("rgb.jpg", "rgb.png", "jpg", "jpeg", "png")
_ONE_SHARD = 2**31  # a ShardWriter that never rolls over: output shard i = input shard i

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------ samples


@dataclass
class Item:
    """One sample in flight: the output fields (raw bytes), the decoded input and its JSON."""

    key: str
    raw: dict[str, bytes]
    sample: dict[str, Any]
    meta: dict[str, Any]
    meta_changed: bool = False

    @property
    def image(self) -> np.ndarray:
        for name in IMAGE_FIELDS:
            if name in self.sample:
                return self.sample[name]
        raise KeyError(f"sample {self.key} has no image")

    @property
    def objects(self) -> list[dict]:
        return self.meta.get("objects") or []

    def out(self) -> dict[str, Any]:
        fields = dict(self.raw)
        if self.meta_changed:
            fields["json"] = codecs.encode_json(self.meta)
        return {"__key__": self.key, **fields}


def object_mask(item: Item, index: int) -> np.ndarray | None:
    """The mask of objects[index]: RLE in the JSON, the instance map, or the single-object mask.png."""
    obj = item.objects[index]
    if isinstance(obj.get("segmentation"), dict):
        return codecs.decode_rle(obj["segmentation"])
    if "inst.png" in item.sample and "id" in obj:
        return item.sample["inst.png"] == obj["id"]
    if "mask.png" in item.sample and len(item.objects) == 1:
        return item.sample["mask.png"] > 0
    return None


def valid_box(obj: dict) -> tuple[float, float, float, float] | None:
    box = obj.get("bbox")
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    x0, y0, x1, y1 = (float(v) for v in box)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def object_text(obj: dict) -> tuple[str, bool]:
    """The text to embed for an object and whether it is a real expression (not the class label)."""
    expr = obj.get("expression")
    if isinstance(expr, str) and expr.strip():
        return expr.strip(), True
    return class_label(obj), False


# ------------------------------------------------------------------------------------ labelers


class Labeler:
    """Adds one kind of label to batches of items; loads its teacher on first use only, on `labeling.device`
    in the teachers' "auto" precision (bf16 on GPUs that support it, else fp32: versavit.labeling.runtime)."""

    kind = ""

    def __init__(self, cfg: LabelingConfig, teacher: Any = None):
        self.cfg = cfg
        self._teacher = teacher
        self.load_seconds = 0.0  # kept out of images/s: loading is a one-off, not throughput

    @property
    def teacher(self) -> Any:
        if self._teacher is None:
            start = time.perf_counter()
            self._teacher = self.load()
            self.load_seconds += time.perf_counter() - start
        return self._teacher

    def load(self) -> Any:
        raise NotImplementedError

    @property
    def signature(self) -> dict[str, Any]:
        """What determines the output (from the config, so it is known before loading anything)."""
        raise NotImplementedError

    def label(self, items: list[Item]) -> Counter:
        raise NotImplementedError


class DepthLabeler(Labeler):
    kind = "depth"

    def load(self) -> Any:
        from versavit.labeling.depth import DepthTeacher

        t = self.cfg.teachers
        return DepthTeacher(t.depth, t.depth_input_size, device=self.cfg.device, batch_size=self.cfg.batch_size)

    @property
    def signature(self) -> dict[str, Any]:
        return {"teacher": self.cfg.teachers.depth, "input_size": self.cfg.teachers.depth_input_size,
                "kind": "disparity", "use_ground_truth": self.cfg.use_ground_truth}

    def label(self, items: list[Item]) -> Counter:
        counts: Counter = Counter()
        todo = [it for it in items if not (self.cfg.use_ground_truth and "depth.png" in it.raw)]
        counts["kept"] = len(items) - len(todo)
        if todo:
            for it, disparity in zip(todo, self.teacher.predict([it.image for it in todo]), strict=True):
                png, scale = codecs.encode_depth(disparity)
                it.raw["depth.png"] = png
                # Relative inverse depth: the loss aligns scale and shift, the kind says which space.
                it.meta["depth"] = {"scale": scale, "kind": "disparity", "relative": True,
                                    "source": self.cfg.teachers.depth}
                it.meta_changed = True
        counts["labelled"] = len(todo)
        return counts


class MaskLabeler(Labeler):
    kind = "masks"

    def load(self) -> Any:
        from versavit.labeling.masks import MaskTeacher

        return MaskTeacher(self.cfg.teachers.masks, device=self.cfg.device, batch_size=self.cfg.batch_size)

    @property
    def signature(self) -> dict[str, Any]:
        return {"teacher": self.cfg.teachers.masks, "prompt": "box", "use_ground_truth": self.cfg.use_ground_truth}

    @staticmethod
    def has_masks(item: Item) -> bool:
        objs = item.objects
        return ("inst.png" in item.raw or "mask.png" in item.raw
                or bool(objs) and all(isinstance(o.get("segmentation"), dict) for o in objs))

    def label(self, items: list[Item]) -> Counter:
        counts: Counter = Counter()
        todo: list[tuple[Item, list[int]]] = []
        for it in items:
            if self.cfg.use_ground_truth and self.has_masks(it):
                counts["kept"] += 1
                continue
            prompted = [i for i, o in enumerate(it.objects) if valid_box(o)]
            counts["objects_without_box"] += len(it.objects) - len(prompted)
            if prompted:
                todo.append((it, prompted))
            else:
                counts["no_boxes"] += 1
        if not todo:
            return counts
        boxes = [np.array([valid_box(it.objects[i]) for i in idx], np.float32) for it, idx in todo]
        results = self.teacher.predict([it.image for it, _ in todo], boxes)
        for (it, idx), (masks, scores) in zip(todo, results, strict=True):
            self._store(it, idx, masks, scores)
            counts["labelled"] += 1
            counts["objects"] += len(idx)
        return counts

    def _store(self, it: Item, idx: list[int], masks: np.ndarray, scores: np.ndarray) -> None:
        for i, mask, score in zip(idx, masks, scores, strict=True):
            obj = it.objects[i]
            obj["segmentation"] = codecs.encode_rle(mask)
            obj["mask_score"] = round(float(score), 4)
            obj["mask_source"] = self.cfg.teachers.masks
        it.meta_changed = True
        if "mask.png" in it.raw and len(it.objects) == 1:  # single referred object: keep its convention
            it.raw["mask.png"] = codecs.encode_png(masks[0].astype(np.uint8) * 255)
            return
        # Instance map for readers that go by inst.png + objects[].id; painted largest first so a
        # small object in front of a big one stays visible (RLE in the JSON keeps the overlaps).
        inst = np.zeros(it.image.shape[:2], np.uint16)
        for j in sorted(range(len(idx)), key=lambda j: -int(masks[j].sum())):
            inst[masks[j]] = int(it.objects[idx[j]].get("id", idx[j] + 1))
        it.raw["inst.png"] = codecs.encode_png(inst)


class DescribeLabeler(Labeler):
    kind = "describe"

    def load(self) -> Any:
        return load_describer(self.cfg.teachers.describer, device=self.cfg.device, batch_size=self.cfg.batch_size)

    @property
    def signature(self) -> dict[str, Any]:
        # the prompting version: texts made by an older way of asking (e.g. focus crop before the Qwen-VL box
        # prompt) are redone, not reused
        return {"teacher": self.cfg.teachers.describer or CLASS_LABEL, "use_ground_truth": self.cfg.use_ground_truth,
                "prompting": DESCRIBE_PROMPTING}

    def label(self, items: list[Item]) -> Counter:
        counts: Counter = Counter()
        regions: list[Region] = []
        targets: list[tuple[Item, int]] = []
        for it in items:
            h, w = it.image.shape[:2]
            for i, obj in enumerate(it.objects):
                if self.cfg.use_ground_truth and isinstance(obj.get("expression"), str) and obj["expression"]:
                    counts["kept"] += 1
                    continue
                mask = object_mask(it, i)
                box = valid_box(obj) or _mask_box(mask) or (0.0, 0.0, float(w), float(h))
                regions.append(Region(it.image, box, mask, class_label(obj)))
                targets.append((it, i))
        if not regions:
            return counts
        describer = self.teacher
        for (it, i), text in zip(targets, describer.describe(regions), strict=True):
            obj = it.objects[i]
            obj["expression"] = text
            obj["expression_source"] = describer.name
            if len(it.objects) == 1 and "expression" in it.meta:  # single-object samples mirror it on top
                it.meta["expression"] = text
            it.meta_changed = True
        counts["labelled"] = len(regions)
        return counts


def _mask_box(mask: np.ndarray | None) -> tuple[float, float, float, float] | None:
    if mask is None or not mask.any():
        return None
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


class EmbedLabeler(Labeler):
    kind = "embed"

    def load(self) -> Any:
        from versavit.labeling.embed import TextEmbedder

        return TextEmbedder(self.cfg.teachers.embedder, device=self.cfg.device)

    @property
    def signature(self) -> dict[str, Any]:
        return {"teacher": self.cfg.teachers.embedder, "normalized": True}

    def label(self, items: list[Item]) -> Counter:
        counts: Counter = Counter()
        texts: list[str] = []
        spans: list[tuple[Item, int, int]] = []
        for it in items:
            if it.objects:
                pairs = [object_text(o) for o in it.objects]
            elif isinstance(it.meta.get("expression"), str):
                pairs = [(it.meta["expression"], True)]
            else:
                counts["no_text"] += 1
                continue
            counts["class_label_texts"] += sum(not real for _, real in pairs)
            spans.append((it, len(texts), len(texts) + len(pairs)))
            texts += [t for t, _ in pairs]
        if not texts:
            return counts
        embedder = self.teacher
        emb = embedder.encode(texts)
        for it, start, stop in spans:
            # Row i is objects[i]'s expression (or the sample's one expression): float16 halves the bytes.
            it.raw["emb.npy"] = codecs.encode_npy(emb[start:stop], np.float16)
            it.meta["embedding"] = {"model": self.cfg.teachers.embedder, "dim": int(emb.shape[1]),
                                    "normalized": True, "field": "emb.npy", "rows": "objects"}
            it.meta_changed = True
        counts["labelled"] = len(spans)
        counts["texts"] = len(texts)
        return counts


LABELERS: dict[str, type[Labeler]] = {"depth": DepthLabeler, "masks": MaskLabeler, "describe": DescribeLabeler,
                                      "embed": EmbedLabeler}


def make_labeler(kind: str, cfg: LabelingConfig, teacher: Any = None) -> Labeler:
    """The labeler of `kind`; `teacher` is a loaded teacher to use instead of loading one from cfg."""
    if kind not in LABELERS:
        raise ValueError(f"unknown label kind {kind!r}; expected one of {list(KINDS)}")
    return LABELERS[kind](cfg, teacher)


# ------------------------------------------------------------------------------------ shards


def _read_items(url: str, stats: CorruptionStats) -> Iterator[Item]:
    """Raw samples of one shard plus their decoded view; undecodable ones are skipped and counted."""

    def handler(exn: BaseException) -> bool:
        if isinstance(exn, storage.StorageError):
            raise exn  # an unreadable shard is not "done with 0 samples": fail, and a rerun retries it
        return stats.handler(exn)

    pipeline = wds.DataPipeline(
        wds.SimpleShardList([url]),
        functools.partial(open_shards, handler=handler),
        functools.partial(tar_file_expander, handler=stats.handler),
        functools.partial(group_by_keys, handler=stats.handler),
    )
    for raw in pipeline:
        try:
            sample = codecs.decode_sample(raw)
            if not any(name in sample for name in IMAGE_FIELDS):
                raise ValueError(f"sample {raw['__key__']} in {url} has no image field")
            meta = sample.get("json") or {}
            if not isinstance(meta, dict):
                raise ValueError(f"sample {raw['__key__']} in {url}: json is not an object")
        except Exception as exn:
            if stats.handler(exn):
                continue
            break
        stats.add_good()
        fields = {k: v for k, v in raw.items() if not k.startswith("__")}
        # The decoded JSON is edited in place by the labelers; the raw bytes stay until it changes.
        yield Item(key=raw["__key__"], raw=fields, sample=sample, meta=meta)


def _label_shard(index: int, in_url: str, output_url: str, labeler: Labeler, batch_size: int,
                 stats: CorruptionStats, on_batch: Callable[[int], None]) -> dict[str, Any]:
    counts: Counter = Counter()
    skipped_before = stats.skipped
    fields: set[str] = set()
    start, loading_before = time.perf_counter(), labeler.load_seconds
    with ShardWriter(output_url, samples_per_shard=_ONE_SHARD, start_index=index,
                     write_manifest=False) as writer:
        batch: list[Item] = []

        def flush() -> None:
            counts.update(labeler.label(batch))
            for it in batch:
                sample = it.out()
                fields.update(k for k in sample if not k.startswith("__"))
                writer.write(sample)
            counts["samples"] += len(batch)
            on_batch(len(batch))
            batch.clear()

        for item in _read_items(in_url, stats):
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    counts["corrupt"] = stats.skipped - skipped_before
    info = writer.shards[0] if writer.shards else None
    seconds = time.perf_counter() - start - (labeler.load_seconds - loading_before)
    return {"index": index, "shard": info.name if info else None, "num_samples": info.num_samples if info else 0,
            "sha256": info.sha256 if info else None, "bytes": info.bytes if info else 0,
            "fields": sorted(fields), "counts": dict(sorted(counts.items())), "seconds": round(seconds, 3)}


def _record_valid(record: dict | None, shard: ShardInfo, signature: dict, outputs: set[str]) -> bool:
    return (record is not None and record.get("input_sha256") == shard.sha256
            and record.get("signature") == signature
            and (record.get("shard") is None or record["shard"] in outputs))


# ------------------------------------------------------------------------------------ jobs


def finalize_dataset(kind: str, input_url: str, output_url: str, labeling_cfg: LabelingConfig,
                     input_manifest: Manifest | None = None) -> tuple[Manifest | None, list[int]]:
    """Write the output manifest if every input shard has a valid done record.

    Returns (manifest or None, indices of the shards still missing).
    """
    source = input_manifest or read_manifest(input_url)
    signature = make_labeler(kind, labeling_cfg).signature
    indices = list(range(len(source.shards)))
    present = _done_names(output_url)
    # Every worker ends here: a listing settles "not yet" without reading a record per shard.
    absent = [i for i in indices if f"shard-{i:06d}.json" not in present]
    if absent:
        return None, absent
    records = _read_records(output_url, indices, present)
    outputs = _output_shards(output_url)
    missing = [i for i in indices if not _record_valid(records.get(i), source.shards[i], signature, outputs)]
    if missing:
        return None, missing
    ordered = [records[i] for i in indices]
    totals: Counter = Counter()
    for r in ordered:
        totals.update(r["counts"])
    labels = dict(source.meta.get("labels") or {})
    labels[kind] = {**signature, "input": input_url.rstrip("/"), "input_digest": source.digest,
                    "counts": dict(sorted(totals.items()))}
    manifest = manifest_from_records(f"{source.name}+{kind}", ordered, {**source.meta, "labels": labels}, output_url)
    return manifest, []


def label_dataset(
    kind: str,
    input_url: str,
    output_url: str,
    labeling_cfg: LabelingConfig,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: Progress | None = None,
    *,
    teacher: Any = None,
    tracker: Any = None,
    run: Any = None,
    max_corrupt_fraction: float = 1.0,
) -> dict[str, Any]:
    """Label worker `shard_index` of `num_shards`'s slice of `input_url` into `output_url`.

    Returns counts: shards (total, mine, already done, processed), samples, labelled, kept,
    corrupt, images/s, and whether this worker wrote the final manifest.
    `progress(kind, images_done, images_total)` is called after every batch; `teacher` replaces
    the one the config names (tests, benchmarks); `tracker`/`run` get images/s per shard.
    `max_corrupt_fraction` < 1 stops the job once too much of the input is unreadable.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}")
    labeler = make_labeler(kind, labeling_cfg, teacher)
    signature = labeler.signature
    source = read_manifest(input_url)
    mine = list(range(len(source.shards)))[shard_index::num_shards]
    records = _read_records(output_url, mine)
    outputs = _output_shards(output_url)
    pending = [i for i in mine if not _record_valid(records.get(i), source.shards[i], signature, outputs)]
    total = sum(source.shards[i].num_samples for i in pending)
    if pending:
        storage.ensure_bucket(output_url)
        _remove_stale_manifest(output_url)
    stats = CorruptionStats(max_fraction=max_corrupt_fraction, min_samples=50)
    counts: Counter = Counter()
    done_images = 0
    seconds = 0.0

    def on_batch(n: int) -> None:
        nonlocal done_images
        done_images += n
        if progress is not None:
            progress(kind, done_images, total)

    if progress is not None:
        progress(kind, 0, total)
    for i in pending:
        result = _label_shard(i, source.shard_urls()[i], output_url, labeler, labeling_cfg.batch_size, stats,
                              on_batch)
        record = {"kind": kind, **result, "input_shard": source.shards[i].name,
                  "input_sha256": source.shards[i].sha256, "signature": signature, "finished": time.time()}
        storage.write_text(done_url(output_url, i), json.dumps(record, indent=1))
        counts.update(result["counts"])
        seconds += result["seconds"]
        ips = result["num_samples"] / max(result["seconds"], 1e-9)
        if tracker is not None and run is not None:
            tracker.log_metrics(run, {f"label_{kind}/images_per_s": ips, f"label_{kind}/samples": counts["samples"],
                                      f"label_{kind}/corrupt": counts["corrupt"]}, step=i)
        log.info("%s: shard %d done (%d samples, %.1f images/s)", kind, i, result["num_samples"], ips)
    stats.check(final=True)
    manifest, missing = finalize_dataset(kind, input_url, output_url, labeling_cfg, source)
    summary = {
        "kind": kind, "input": input_url, "output": output_url, "shards_total": len(source.shards),
        "shards_mine": len(mine), "shards_already_done": len(mine) - len(pending), "shards_processed": pending,
        **{k: counts.get(k, 0) for k in ("samples", "labelled", "kept", "corrupt")},
        "counts": dict(sorted(counts.items())), "seconds": round(seconds, 3),
        "images_per_s": round(counts["samples"] / seconds, 3) if seconds > 0 else 0.0,
        "teacher_load_s": round(labeler.load_seconds, 3),
        "finalized": manifest is not None, "shards_missing": missing,
        "manifest": storage.join(output_url, MANIFEST) if manifest is not None else None,
    }
    if tracker is not None and run is not None:
        tracker.log_metrics(run, {f"label_{kind}/images_per_s_total": summary["images_per_s"]}, step=len(pending))
    return summary
