"""Task views of decoded shard samples, and the per-task training streams.

A shard sample may carry annotations for several tasks (the synthetic world carries all of
them); each task takes what it needs, at the recipe's resolution:

    caption  image at dynamic resolution (<= caption_max^2 pixels), a question and its answer, from the
             stage's text source: scene caption, dense region text, VQA pairs, or a mix (VersaViT)
    depth    image R x R, target map in the head's space (depth or disparity), valid mask
    refseg   image R x R, the mask of one referred object, its precomputed text embedding

Random choices (which QA pair, which object) depend only on (seed, sample key, stream position),
so a resumed run sees exactly what the uninterrupted run saw.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from versavit.config.schema import RunConfig
from versavit.data.codecs import decode_rle
from versavit.data.inputs import task_urls
from versavit.data.loader import CorruptionStats, loader_workers, make_loader, shard_pipeline
from versavit.data.shards import resolve_shards

CAPTION_PROMPT = "Describe the image."
DENSE_PROMPT = "Describe each object from left to right."
TEXT_SOURCES = ("caption", "dense", "vqa", "mixed")


def sample_rng(seed: int, sample: dict[str, Any]) -> np.random.Generator:
    key = zlib.crc32(str(sample.get("__key__", "")).encode())
    return np.random.default_rng([seed, key, int(sample.get("__ordinal__", 0))])


def _image(sample: dict[str, Any]) -> np.ndarray:
    for name in ("rgb.jpg", "rgb.png", "jpg", "jpeg", "png"):
        if name in sample:
            return sample[name]
    raise KeyError(f"sample {sample.get('__key__')} has no image field")


def image_tensor(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, h, w] float in [0, 1], resized with antialiasing."""
    t = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    if tuple(t.shape[1:]) != tuple(size):
        t = F.interpolate(t[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return t.clamp_(0, 1)


def _nearest(array: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(array))
    if tuple(t.shape) == (size, size):
        return t
    dtype = t.dtype
    out = F.interpolate(t[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0]
    return out.to(dtype)


def depth_view(sample: dict[str, Any], resolution: int, target: str = "depth") -> dict[str, torch.Tensor]:
    """Depth task: image, target map in the head's space, valid mask, all R x R."""
    if "depth" not in sample:
        raise KeyError(f"sample {sample.get('__key__')} has no depth map")
    kind = ((sample.get("json") or {}).get("depth") or {}).get("kind", "depth")
    depth = _nearest(sample["depth"], resolution).float()
    valid = _nearest(sample["depth_valid"], resolution).bool() & (depth > 0)
    if kind != target:  # depth <-> disparity (relative): the reciprocal on valid pixels
        depth = torch.where(valid, 1.0 / depth.clamp_min(1e-6), torch.zeros_like(depth))
    return {"image": image_tensor(_image(sample), (resolution, resolution)), "target": depth, "valid": valid}


def refseg_view(sample: dict[str, Any], resolution: int, seed: int = 0) -> dict[str, Any]:
    """Referring segmentation: one object's mask and the embedding of its referring expression."""
    meta = sample.get("json") or {}
    emb = sample.get("emb.npy")
    if emb is None:
        raise KeyError(f"sample {sample.get('__key__')} has no text embeddings (emb.npy): "
                       "run `versavit label embed` on this dataset first")
    emb = np.atleast_2d(emb)
    objects = meta.get("objects") or []
    if objects and ("inst.png" in sample or all("segmentation" in o for o in objects)):
        k = int(sample_rng(seed, sample).integers(len(objects)))
        # an object's own RLE is exact where masks overlap; the instance map keeps the visible part
        seg = objects[k].get("segmentation")
        mask = decode_rle(seg) if seg is not None else sample["inst.png"] == objects[k]["id"]
        expression = objects[k]["expression"]
    elif "mask.png" in sample:
        k, mask, expression = 0, sample["mask.png"] > 0, meta.get("expression", "")
    else:
        raise KeyError(f"sample {sample.get('__key__')} has neither instances + objects nor mask.png")
    if k >= len(emb):
        raise ValueError(f"sample {sample.get('__key__')}: {len(emb)} embeddings for object {k}")
    return {"image": image_tensor(_image(sample), (resolution, resolution)),
            "mask": _nearest(mask.astype(np.uint8), resolution).float(),
            "text_embedding": torch.from_numpy(emb[k].astype(np.float32)), "expression": expression}


def dense_text(meta: dict[str, Any]) -> str | None:
    """Region-level text: every object's referring expression and attributes, left to right.

    Finer-grained than the scene caption (one statement per region, each tied to a location through its
    relational expression): SAILViT's "dense caption" data, built from the world's own annotations.
    """
    objects = [o for o in meta.get("objects") or [] if o.get("expression")]
    if not objects:
        return None

    def x(o: dict[str, Any]) -> float:
        return float((o.get("center_uv") or o.get("bbox") or [0.0])[0])

    regions = []
    for o in sorted(objects, key=x):
        attrs = " ".join(str(o[k]) for k in ("size", "color", "shape") if o.get(k))
        expression = o["expression"][:1].upper() + o["expression"][1:]
        regions.append(f"{expression}: {attrs}." if attrs else f"{expression}.")
    return " ".join(regions)


def text_pairs(meta: dict[str, Any], source: str = "mixed") -> list[tuple[str, str]]:
    """The (question, answer) pairs a sample offers for a text source (see TEXT_SOURCES)."""
    if source not in TEXT_SOURCES:
        raise ValueError(f"unknown caption text source {source!r}; expected one of {TEXT_SOURCES}")
    caption = [(CAPTION_PROMPT, meta["caption"])] if meta.get("caption") else []
    vqa = [(qa["question"], qa["answer"]) for qa in meta.get("qa", [])]
    vqa += [(c["question"], c["answer"]) for c in meta.get("conversations", [])]
    if source == "caption":
        return caption
    if source == "vqa":
        return vqa
    if source == "dense":
        dense = dense_text(meta)
        return [(DENSE_PROMPT, dense)] if dense else []
    return caption + vqa


def caption_view(sample: dict[str, Any], min_side: int, max_side: int, seed: int = 0,
                 source: str = "mixed", factor: int = 28) -> dict[str, Any]:
    """Caption / VQA: the image at dynamic resolution (sides multiples of `factor`: the backbone's patch x 2x2
    merge, 28 or 32 for SigLIP2) plus one (question, answer) pair of `source`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    meta = sample.get("json") or {}
    pairs = text_pairs(meta, source)
    if not pairs:
        raise KeyError(f"sample {sample.get('__key__')} has no {source} text"
                       + (" (no caption or question/answer)" if source == "mixed" else ""))
    question, answer = pairs[int(sample_rng(seed, sample).integers(len(pairs)))]
    rgb = _image(sample)
    h, w = smart_resize(rgb.shape[0], rgb.shape[1], factor=factor, min_pixels=min_side * min_side,
                        max_pixels=max_side * max_side)
    return {"image": image_tensor(rgb, (h, w)), "question": question, "answer": answer}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack same-shaped tensors; keep lists for strings and variable-size images."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        same = isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values)
        out[key] = torch.stack(values) if same else values
    return out


def _worker_skip(worker: int, num_workers: int, batches_done: int, batch_size: int) -> int:
    # The DataLoader takes batches from its workers round-robin, so worker w produced every
    # num_workers-th batch starting at w.
    mine = batches_done // num_workers + (1 if worker < batches_done % num_workers else 0)
    return mine * batch_size


def task_view_fn(cfg: RunConfig, task: str, caption_source: str = "mixed"):  # -> Callable[[dict], dict]
    res = cfg.train.resolution
    seed = cfg.train.seed
    if task == "depth":
        return functools.partial(depth_view, resolution=res.depth, target=cfg.model.heads.depth.target)
    if task == "refseg":
        return functools.partial(refseg_view, resolution=res.refseg, seed=seed)
    if task == "caption":
        return functools.partial(caption_view, min_side=res.caption_min, max_side=res.caption_max, seed=seed,
                                 source=caption_source, factor=cfg.model.backbone.resize_factor)
    raise ValueError(f"unknown task {task!r}")


def task_batches(cfg: RunConfig, task: str, batch_size: int, batches_done: int = 0, seed_offset: int = 0,
                 num_workers: int | None = None, caption_source: str = "mixed",
                 stage: str | None = None) -> Iterator[dict[str, Any]]:
    """An endless, resumable stream of collated batches of `task` (resampled shards).

    `batches_done` batches are skipped (cheaply, before decoding): the data position on resume.
    `caption_source` picks the caption task's text (TEXT_SOURCES).
    """
    workers = loader_workers(cfg.data.num_workers, training=True) if num_workers is None else num_workers
    stats = CorruptionStats(cfg.data.max_corrupt_fraction, cfg.data.min_samples_before_corrupt_check, name=task)
    pipeline = shard_pipeline(
        resolve_shards(task_urls(cfg, task, stage=stage)), stats=stats, resampled=True,
        seed=cfg.train.seed * 1000 + seed_offset, shuffle_buffer=cfg.data.shuffle_buffer,
        transform=task_view_fn(cfg, task, caption_source),
        skip=functools.partial(_worker_skip, batches_done=batches_done, batch_size=batch_size),
        verify_fraction=TRAIN_VERIFY_FRACTION,
    )
    return TaskStream(iter(make_loader(pipeline, num_workers=workers, batch_size=batch_size, collate_fn=collate)),
                      stats)


# the fraction of shards whose sha256 a training stream checks against manifest.json as it reads them
TRAIN_VERIFY_FRACTION = 0.05


class TaskStream:
    """A task's batch iterator plus its lost-sample counters (`stats`: CorruptionStats, shared with workers)."""

    def __init__(self, batches: Iterator[dict[str, Any]], stats: CorruptionStats):
        self.batches = batches
        self.stats = stats

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self.batches)
