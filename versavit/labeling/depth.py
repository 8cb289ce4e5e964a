"""Depth teacher: Depth-Anything(-V2) through transformers' `DepthAnythingForDepthEstimation`.

Depth-Anything predicts *relative inverse depth* (disparity, up to an unknown scale and shift),
so its maps are stored with kind "disparity"; the depth loss converts when it trains on depth.
Preprocessing follows Depth-Anything-V2's own inference code (not the HF processor): the shorter
side goes to `input_size` (518), the other keeps the aspect ratio, both rounded to a multiple of
the patch size 14, bicubic, ImageNet normalisation. Done in torch, so it batches on the GPU.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from versavit.labeling.runtime import chunks, inference_dtype, load_failed, resolve_device
from versavit.weights import local_model_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 14
KIND = "disparity"


def network_size(height: int, width: int, input_size: int = 518, multiple: int = PATCH) -> tuple[int, int]:
    """The (h, w) the network sees: shorter side -> input_size, aspect kept, multiples of 14.

    Depth-Anything-V2's "lower_bound" resize: round each side to the nearest multiple, but round
    up instead when that would fall below input_size.
    """
    scale = input_size / min(height, width)

    def fit(x: float) -> int:
        y = round(x / multiple) * multiple
        return int(y if y >= input_size else math.ceil(x / multiple) * multiple)

    return fit(height * scale), fit(width * scale)


class DepthTeacher:
    """Batched relative-disparity prediction at the image's own size.

    >>> teacher = DepthTeacher("depth-anything/Depth-Anything-V2-Large-hf")
    >>> [disparity] = teacher.predict([rgb])  # float32 [H, W], >= 0, larger = closer
    """

    kind = KIND

    def __init__(self, model_id: str, input_size: int = 518, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 8):
        from transformers import DepthAnythingForDepthEstimation

        self.model_id = model_id
        self.input_size = input_size
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device, dtype)
        path = local_model_path(model_id)  # a staged s3:// checkpoint: this node's copy
        try:
            model = DepthAnythingForDepthEstimation.from_pretrained(path, dtype=self.dtype)
        except Exception as exc:
            raise load_failed("depth", model_id, exc) from exc
        self.model = model.to(self.device).eval()
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def signature(self) -> dict:
        """What determines the labels (recorded in done records and the manifest)."""
        return {"teacher": self.model_id, "input_size": self.input_size, "kind": KIND}

    def _prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        h, w = images[0].shape[:2]
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        x = F.interpolate(x, size=network_size(h, w, self.input_size), mode="bicubic", align_corners=False)
        return ((x.clamp_(0, 1) - self._mean) / self._std).to(self.dtype)

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """[H, W, 3] uint8 images -> float32 [H, W] disparity maps (non-negative), in input order."""
        out: list[np.ndarray | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(images):  # only same-sized images stack into one batch
            by_size[img.shape[:2]].append(i)
        for (h, w), idx in by_size.items():
            for part in chunks(idx, self.batch_size):
                pred = self.model(pixel_values=self._prepare([images[i] for i in part])).predicted_depth
                pred = F.interpolate(pred.float()[:, None], size=(h, w), mode="bilinear", align_corners=False)
                pred = pred[:, 0].clamp_min_(0).cpu().numpy()
                for i, p in zip(part, pred, strict=True):
                    out[i] = p
        return out  # type: ignore[return-value]
