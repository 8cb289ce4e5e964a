"""Mask/region descriptions: the texts that become referring expressions of pseudo-labelled masks.

The paper used DAM-3B (Describe Anything), which transformers does not ship, so describers sit
behind a small protocol: a batch of regions (image + box, optionally the mask and the dataset's
class label) in, one short text per region out. Two implementations:

- `ClassLabelDescriber`: the dataset's class label ("person", "cube"); the default
  (`labeling.teachers.describer: null`) and the fallback whenever a model returns nothing.
- `ImageTextDescriber`: any image-text-to-text model of transformers (LLaVA, Qwen2-VL, ...),
  loaded with `from_pretrained`, shown a crop around the region with everything outside the
  mask dimmed (a cheap stand-in for DAM's focal prompt), and asked for a short phrase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from versavit.labeling.runtime import chunks, inference_dtype, load_failed, resolve_device

CLASS_LABEL = "class-label"
DEFAULT_PROMPT = "Describe the highlighted object with a short referring phrase."
CONTEXT = 0.25  # crop margin around the box, as a fraction of its size: some context helps naming
DIM = 0.35  # brightness kept outside the mask


@dataclass
class Region:
    """One thing to describe: the whole image, its box (x0, y0, x1, y1 pixels), mask and class label."""

    image: np.ndarray
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    label: str | None = None


@runtime_checkable
class Describer(Protocol):
    """Regions -> one text each (same order)."""

    name: str

    def describe(self, regions: list[Region]) -> list[str]: ...


def class_label(obj: dict) -> str:
    """The dataset's class name of an annotated object ('object' when it has none).

    `shape` is the synthetic world's class (its CLASSES are the shapes).
    """
    for key in ("label", "category", "class_name", "name", "shape"):
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return "object"


class ClassLabelDescriber:
    """The class label as the description: free, and what the data already knows."""

    name = CLASS_LABEL

    def describe(self, regions: list[Region]) -> list[str]:
        return [r.label or "object" for r in regions]


def focus_crop(region: Region, context: float = CONTEXT, dim: float = DIM) -> np.ndarray:
    """The region's box plus a margin, with pixels outside the mask dimmed ([h, w, 3] uint8)."""
    img = region.image
    h, w = img.shape[:2]
    x0, y0, x1, y1 = region.box
    mx, my = (x1 - x0) * context, (y1 - y0) * context
    c0, r0 = max(0, int(np.floor(x0 - mx))), max(0, int(np.floor(y0 - my)))
    c1, r1 = min(w, int(np.ceil(x1 + mx))), min(h, int(np.ceil(y1 + my)))
    if c1 - c0 < 2 or r1 - r0 < 2:  # degenerate box: show the whole image
        c0, r0, c1, r1 = 0, 0, w, h
    crop = img[r0:r1, c0:c1].astype(np.float32)
    if region.mask is not None and region.mask.shape == img.shape[:2]:
        inside = region.mask[r0:r1, c0:c1].astype(bool)
        if inside.any():
            crop[~inside] *= dim
    return crop.round().clip(0, 255).astype(np.uint8)


def clean_text(text: str) -> str:
    """First line, no surrounding quotes or trailing period: a phrase, not a paragraph."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.strip().strip("\"'").rstrip(".").strip()


class ImageTextDescriber:
    """An image-text-to-text model (AutoModelForImageTextToText + AutoProcessor) describing regions.

    Greedy decoding, so labels are reproducible. Empty outputs fall back to the class label.
    """

    def __init__(self, model_id: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 24):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name = model_id
        self.model_id = model_id
        self.batch_size = batch_size
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device, dtype)
        try:
            self.processor = AutoProcessor.from_pretrained(model_id)
            model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=self.dtype)
        except Exception as exc:
            raise load_failed("describer", model_id, exc) from exc
        self.model = model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:  # decoder-only generation needs the prompts aligned at the right end
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self._text = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def describe(self, regions: list[Region]) -> list[str]:
        from PIL import Image

        texts: list[str] = []
        for part in chunks(regions, self.batch_size):
            crops = [Image.fromarray(focus_crop(r)) for r in part]
            inputs = self.processor(images=crops, text=[self._text] * len(crops), return_tensors="pt",
                                    padding=True)
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            new = generated[:, inputs["input_ids"].shape[1]:]
            decoded = self.processor.batch_decode(new, skip_special_tokens=True)
            texts += [clean_text(t) or r.label or "object" for t, r in zip(decoded, part, strict=True)]
        return texts


def load_describer(model_id: str | None, device: str = "auto", dtype: str = "auto",
                   batch_size: int = 8) -> Describer:
    """`teachers.describer`: None (or "class-label") = class labels, else an image-text-to-text model."""
    if model_id is None or model_id == CLASS_LABEL:
        return ClassLabelDescriber()
    return ImageTextDescriber(model_id, device=device, dtype=dtype, batch_size=batch_size)
