"""Referring segmentation with the multi-task model's own head: cIoU and mIoU over the referred objects.

Every (image, expression) query is scored: the image is resized to the head's training resolution, the
backbone runs once per image, the head once per expression; the logits come out at the label's own size
and a pixel is foreground where its logit is > 0. cIoU = cumulative intersection / cumulative union over
all queries (the RefCOCO convention), mIoU = mean per-query IoU.

Text embeddings come with the data (emb.npy of the synthetic world, written by `versavit label embed`) or
from `embed(sentences)` (the run's embedder, for RefCOCO). Without either the evaluation is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from versavit.data.tasks import image_tensor
from versavit.eval.datasets.base import BenchmarkReader
from versavit.eval.metrics import MaskMeter
from versavit.models.multitask import VersaViT

EXAMPLES = 4
QUERY_CHUNK = 16


class RefSegSkipped(Exception):
    """The referring-segmentation evaluation cannot run on this data (the message says why)."""


@torch.inference_mode()
def evaluate_refseg(model: VersaViT, reader: BenchmarkReader, resolution: int,
                    embed: Callable[[list[str]], np.ndarray] | None = None,
                    device: torch.device | str | None = None, label: str = "") -> dict[str, Any]:
    """cIoU / mIoU of the model's refseg head on `reader`; raises RefSegSkipped when embeddings are missing."""
    from versavit.progress import progress_bar

    if "refseg" not in model.heads:
        raise RefSegSkipped("the model has no refseg head")
    head = model.heads["refseg"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    meter = MaskMeter()
    examples: dict[str, list[Any]] = {"image": [], "gt": [], "pred": [], "sentence": [], "iou": []}
    with progress_bar() as bar:
        task = bar.add_task(f"refseg {label} {reader.name}/{reader.split}", total=len(reader))
        for n, (image, target) in enumerate(reader, 1):
            masks = target.get("masks") or []
            if not masks:
                continue
            emb = target.get("embeddings")
            if emb is None:
                if embed is None:
                    raise RefSegSkipped(f"{reader.name}/{reader.split} has no text embeddings (emb.npy): run "
                                        "`versavit label embed` on it, or evaluate with an embedder")
                emb = embed(list(target["sentences"]))
            emb = np.atleast_2d(np.asarray(emb, np.float32))
            if emb.shape[0] < len(masks):
                raise ValueError(f"{reader.name} sample {target.get('key')}: {emb.shape[0]} embeddings for "
                                 f"{len(masks)} queries")
            if emb.shape[1] != head.text_dim:
                raise RefSegSkipped(f"text embeddings of {reader.name} have dimension {emb.shape[1]}, the head "
                                    f"expects {head.text_dim} (model.heads.refseg.text_dim): another embedder")
            size = tuple(np.asarray(masks[0]).shape)
            fmap = model.backbone(image_tensor(image, (resolution, resolution))[None].to(device)).maps
            for start in range(0, len(masks), QUERY_CHUNK):
                text = torch.from_numpy(emb[start:start + QUERY_CHUNK]).to(device, fmap.dtype)
                logits = head(fmap.expand(len(text), -1, -1, -1), text, size).float().cpu()
                for j, pred in enumerate(logits > 0):
                    k = start + j
                    gt = torch.from_numpy(np.asarray(masks[k], bool))
                    iou = meter.update(pred, gt)
                    if k == 0 and len(examples["pred"]) < EXAMPLES:  # one query per image: varied examples
                        for key, value in (("image", image), ("gt", gt.numpy()), ("pred", pred.numpy()),
                                           ("sentence", target["sentences"][k]), ("iou", iou)):
                            examples[key].append(value)
            bar.update(task, completed=n)
    if not meter.ious:
        raise RefSegSkipped(f"{reader.name}/{reader.split} has no referred objects")
    return {"metrics": meter.compute(), "examples": examples, "resolution": resolution}
