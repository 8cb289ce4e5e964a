"""Zero-shot relative depth with the multi-task model's own DPT head (paper Table 9 protocol).

The head predicts relative depth or disparity (model.heads.depth.target) up to an unknown scale and shift.
Per image, the prediction is aligned to the ground truth by least squares (scale and shift) in that same
space (ground-truth depth inverted for disparity), then brought back to metres (disparity inverted, clamped
to the dataset's depth range) and scored on the valid pixels: AbsRel and delta1 (RMSE too, for reference).
Images are resized to the head's training resolution; the prediction comes out at the label's own size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from versavit.data.tasks import image_tensor
from versavit.eval.datasets.base import BenchmarkReader
from versavit.eval.metrics import DepthMeter, align_scale_shift
from versavit.models.multitask import VersaViT

EXAMPLES = 4


def aligned_depth(pred: torch.Tensor, gt_depth: torch.Tensor, valid: torch.Tensor, space: str,
                  min_depth: float, max_depth: float) -> torch.Tensor:
    """Align one [H, W] prediction (in `space`: depth or disparity) to the ground truth; return metres."""
    if space not in ("depth", "disparity"):
        raise ValueError(f"space must be 'depth' or 'disparity', got {space!r}")
    pred = pred.double()
    gt = gt_depth.double()
    target = torch.where(valid, 1.0 / gt.clamp_min(1e-12), torch.zeros_like(gt)) if space == "disparity" else gt
    scale, shift = align_scale_shift(pred, target, valid)
    aligned = scale * pred + shift
    if space == "disparity":
        aligned = 1.0 / aligned.clamp_min(1.0 / max_depth)
    return aligned.clamp(min_depth, max_depth).float()


@torch.inference_mode()
def evaluate_zeroshot_depth(model: VersaViT, reader: BenchmarkReader, resolution: int, space: str,
                            batch_size: int = 8, device: torch.device | str | None = None,
                            label: str = "") -> dict[str, Any]:
    """AbsRel / delta1 / RMSE of the model's depth head on `reader` after per-image scale-and-shift alignment."""
    from versavit.progress import progress_bar

    if "depth" not in model.heads:
        raise ValueError("the model has no depth head")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    meter = DepthMeter()
    examples: dict[str, list[np.ndarray]] = {"image": [], "gt": [], "valid": [], "pred": []}
    lo, hi = reader.min_depth, reader.max_depth
    pending: list[tuple[np.ndarray, dict[str, Any]]] = []

    def run() -> None:
        x = torch.stack([image_tensor(img, (resolution, resolution)) for img, _ in pending]).to(device)
        out = model.backbone(x, layers=model.depth_layers)
        feats = [out.layers[layer] for layer in model.depth_layers]
        for i, (image, target) in enumerate(pending):
            gt = torch.from_numpy(np.asarray(target["depth"], np.float32))
            valid = torch.from_numpy(np.asarray(target["valid"], bool)) & (gt > lo) & (gt < hi)
            pred = model.heads["depth"]([f[i:i + 1] for f in feats], tuple(gt.shape))[0].float().cpu()
            depth = aligned_depth(pred, gt, valid, space, lo, hi)
            meter.update(depth, gt, valid)
            if len(examples["pred"]) < EXAMPLES:
                for k, v in (("image", image), ("gt", gt.numpy()), ("valid", valid.numpy()), ("pred", depth.numpy())):
                    examples[k].append(np.asarray(v))
        pending.clear()

    with progress_bar() as bar:
        task = bar.add_task(f"zero-shot depth {label} {reader.name}/{reader.split}", total=len(reader))
        for n, sample in enumerate(reader, 1):
            if "depth" not in sample[1]:
                continue
            pending.append(sample)
            if len(pending) == batch_size:
                run()
            bar.update(task, completed=n)
        if pending:
            run()
    return {"metrics": meter.compute(), "examples": examples, "space": space, "resolution": resolution}
