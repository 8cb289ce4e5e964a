"""Evaluation metrics: semantic-segmentation mIoU, depth errors, referring-segmentation IoUs.

Conventions (those of mmsegmentation and of the depth toolboxes DINOv2 evaluates with):
- mIoU: one confusion matrix over the whole split, IoU per class, mean over the classes that occur
  (in prediction or ground truth); pixels labelled `ignore_index` count nowhere.
- depth: RMSE, AbsRel and delta1 per image over its valid pixels, then the mean over images.
- referring segmentation: cIoU = sum of intersections / sum of unions over all referred objects;
  mIoU = mean of the per-object IoUs.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE_INDEX = 255
DELTA1 = 1.25


# ------------------------------------------------------------------------------------------------
# semantic segmentation


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; ignored pixels dropped."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    bad = (target < 0) | (target >= num_classes) | (pred < 0) | (pred >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"labels outside [0, {num_classes}) that are not ignore_index={ignore_index}: "
                         f"{sorted(set(target[bad].tolist()) | set(pred[bad].tolist()))[:8]}")
    return torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU [C] (float64); NaN for a class absent from both prediction and ground truth."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


class SegmentationMeter:
    """Accumulates a confusion matrix over batches; `compute()` -> mIoU, pixel accuracy, per-class IoU."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred: class ids [..., H, W] (or logits [B, C, H, W]); target: ids of the same spatial shape."""
        if pred.is_floating_point():
            pred = pred.argmax(1)
        self.conf += confusion_matrix(pred.cpu(), target.cpu(), self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float | list[float]]:
        iou = iou_from_confusion(self.conf)
        total = int(self.conf.sum())
        present = ~torch.isnan(iou)
        return {
            "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
            "acc": float(self.conf.diag().sum()) / total if total else float("nan"),
            "iou_per_class": [None if np.isnan(v) else float(v) for v in iou.tolist()],
        }


# ------------------------------------------------------------------------------------------------
# depth


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """RMSE (metres), AbsRel = mean |p - g| / g and delta1 = share of max(p/g, g/p) < 1.25, over the valid
    pixels of ONE image (gt > 0 is required on them). NaN for an image without valid pixels."""
    pred, gt = pred.double().reshape(-1), gt.double().reshape(-1)
    keep = gt > 0 if valid is None else valid.reshape(-1).bool() & (gt > 0)
    if not bool(keep.any()):
        return {"rmse": float("nan"), "absrel": float("nan"), "delta1": float("nan")}
    p, g = pred[keep], gt[keep]
    ratio = torch.maximum(p / g, g / p.clamp_min(1e-12))
    return {
        "rmse": float(torch.sqrt(((p - g) ** 2).mean())),
        "absrel": float(((p - g).abs() / g).mean()),
        "delta1": float((ratio < DELTA1).double().mean()),
    }


class DepthMeter:
    """Per-image depth errors, averaged over the images that have valid pixels."""

    keys = ("rmse", "absrel", "delta1")

    def __init__(self) -> None:
        self.per_image: list[dict[str, float]] = []

    def update(self, pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """pred, gt, valid: [H, W] or a batch [B, H, W]."""
        if pred.dim() == 2:
            pred, gt = pred[None], gt[None]
            valid = None if valid is None else valid[None]
        for i in range(pred.shape[0]):
            errors = depth_errors(pred[i], gt[i], None if valid is None else valid[i])
            if not np.isnan(errors["rmse"]):
                self.per_image.append(errors)

    def compute(self) -> dict[str, float]:
        if not self.per_image:
            return dict.fromkeys(self.keys, float("nan")) | {"images": 0}
        return {k: float(np.mean([e[k] for e in self.per_image])) for k in self.keys} | {"images": len(self.per_image)}


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor,
                      valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares scale s and shift t minimising sum over valid pixels of (s * pred + t - target)^2.

    pred, target, valid: [B, H, W] (or [H, W]); returns s, t of shape [B] (or scalars). The closed form of
    MiDaS / Depth Anything's evaluation; a degenerate image (constant prediction) gets s = 0, t = mean target.
    """
    squeeze = pred.dim() == 2
    if squeeze:
        pred, target, valid = pred[None], target[None], valid[None]
    m = valid.double()
    p, g = pred.double() * m, target.double() * m
    a00, a01, a11 = (p * p).sum((1, 2)), p.sum((1, 2)), m.sum((1, 2))
    b0, b1 = (p * g).sum((1, 2)), g.sum((1, 2))
    det = a00 * a11 - a01 * a01
    ok = det.abs() > 1e-12 * (a00 * a11).clamp_min(1e-30)
    det_safe = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (a11 * b0 - a01 * b1) / det_safe, torch.zeros_like(det))
    shift = torch.where(ok, (-a01 * b0 + a00 * b1) / det_safe, b1 / a11.clamp_min(1))
    return (scale[0], shift[0]) if squeeze else (scale, shift)


# ------------------------------------------------------------------------------------------------
# referring segmentation


class MaskMeter:
    """Referring segmentation: cumulative IoU (cIoU) and mean per-object IoU (mIoU) of binary masks."""

    def __init__(self) -> None:
        self.inter = 0
        self.union = 0
        self.ious: list[float] = []

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> float:
        """One object's predicted and true masks (bool [H, W]); returns its IoU (1 when both are empty)."""
        pred, gt = pred.bool(), gt.bool()
        inter, union = int((pred & gt).sum()), int((pred | gt).sum())
        self.inter += inter
        self.union += union
        iou = inter / union if union else 1.0
        self.ious.append(iou)
        return iou

    def compute(self) -> dict[str, float]:
        return {"ciou": self.inter / self.union if self.union else float("nan"),
                "miou": float(np.mean(self.ious)) if self.ious else float("nan"),
                "objects": len(self.ious)}
