"""Mask/region descriptions: the texts that become referring expressions of pseudo-labelled masks.

Describers sit behind a small protocol: a batch of regions (image + box, optionally the mask and the
dataset's class label) in, one short text per region out. `load_describer(labeling.teachers.describer)`
picks one:

- null / "class-label" -> `ClassLabelDescriber`: the dataset's class label ("person", "cube"). It is
  also the fallback text whenever a model returns nothing for a region.
- a DAM checkpoint (the paper's describer: the id/folder name says DAM, e.g. `nvidia/DAM-3B`, or its
  config.json names Describe Anything) -> `DamDescriber`: the region's mask is DAM's focal prompt.
  DAM is not part of transformers; it runs through the `describe-anything` package (`nvidia/DAM-3B`)
  or the checkpoint's own remote code (`nvidia/DAM-3B-Self-Contained`, loaded with
  `trust_remote_code=True`: naming a DAM checkpoint is the opt-in). It needs a CUDA GPU. When it
  does not load, one line says why and what to do: there is no silent fall back to class labels.
- any other image-text-to-text model of transformers -> `ImageTextDescriber`, greedy decoding, in one
  of two modes (`mode`, "auto" by default):
  - "box-prompt" (auto for the Qwen-VL family: qwen2_vl, qwen2_5_vl, qwen3_vl): the whole image,
    resized within a pixel budget, with the box written into the prompt in the family's grounding
    convention (`box_text`: Qwen2-VL `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` in [0, 1000),
    Qwen2.5-VL absolute pixels of the resized input, Qwen3-VL relative [0, 1000));
  - "focus-crop" (auto for every other model): a crop around the region with everything outside the
    mask dimmed (a cheap stand-in for DAM's focal prompt), and a request for a short phrase.
  The Qwen-VL family's inputs are built from its image processor and tokenizer (what its processor
  does), because transformers' Qwen2VLProcessor needs torchvision for its video part, which the
  labeller image does not install.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from versavit.labeling.runtime import chunks, inference_dtype, load_failed, resolve_device
from versavit.weights import local_model_path

CLASS_LABEL = "class-label"
DESCRIBE_PROMPTING = 2  # bump when the prompt, crop or box convention changes: label records made before are redone
DEFAULT_PROMPT = "Describe the highlighted object with a short referring phrase."
DEFAULT_BOX_PROMPT = "Describe the object in the region {box} with a short referring phrase."
CONTEXT = 0.25  # crop margin around the box, as a fraction of its size: some context helps naming
DIM = 0.35  # brightness kept outside the mask
# Pixel budget of the whole image in box-prompt mode: Qwen2.5-VL's cookbook setting (1280 28x28
# patches, ~1 MP); the checkpoint's own max_pixels caps it further.
DEFAULT_MAX_PIXELS = 1280 * 28 * 28

Mode = Literal["auto", "box-prompt", "focus-crop"]
MODES: tuple[str, ...] = ("auto", "box-prompt", "focus-crop")

# config.model_type -> grounding convention of the Qwen-VL family
QWEN_VL_FAMILIES: dict[str, str] = {
    "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "qwen3_vl_moe": "qwen3-vl",
}
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_IMAGE_PAD = "<|image_pad|>"


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


def first_sentence(text: str) -> str:
    """The first sentence of a paragraph (DAM describes in detail; the first sentence names the region)."""
    return re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)[0] if text.strip() else ""


# --------------------------------------------------------------------------------------------
# the box in the prompt: the Qwen-VL family's grounding conventions


def box_text(family: str, box: tuple[float, float, float, float], image_hw: tuple[int, int],
             input_hw: tuple[int, int] | None = None) -> str:
    """The box (x0, y0, x1, y1 pixels of an image of size `image_hw`) as `family` reads boxes in text.

    - qwen2-vl: `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`, coordinates normalised to [0, 1000)
      (Qwen2-VL report, arXiv:2409.12191, data format, "Visual Grounding"; rounding as QwenLM's
      qwen-vl-finetune/tools/process_bbox.ipynb `convert_to_qwen2vl_format`, clipped to 999).
    - qwen2.5-vl: absolute pixel coordinates of the *resized* input image (`input_hw`, what the
      image processor's smart_resize gives), written as its grounding JSON `{"bbox_2d": [x1, y1, x2, y2]}`
      (Qwen2.5-VL report, arXiv:2502.13923, and the cookbook cookbooks/spatial_understanding.ipynb;
      confirmed by the Qwen team in QwenLM/Qwen3-VL issues #866 and #940; rounding and clipping as
      `convert_to_qwen25vl_format` in the same notebook).
    - qwen3-vl: back to relative coordinates, same JSON: "changed from the absolute coordinates used
      in Qwen2.5-VL to relative coordinates ranging from 0 to 1000" (Qwen3-VL's notes, quoted in
      QwenLM/Qwen3-VL issue #1741; Alibaba Cloud's docs say 0 to 999, hence the clip to 999).
    transformers' processors and chat templates carry no box convention: boxes are plain prompt text
    (plus the two special tokens of Qwen2-VL's vocabulary), so the convention lives here.
    """
    h, w = image_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    if family in ("qwen2-vl", "qwen3-vl"):
        def rel(v: float, size: int) -> int:
            return max(0, min(999, round(v / size * 1000)))

        n = (rel(x0, w), rel(y0, h), rel(x1, w), rel(y1, h))
        if family == "qwen2-vl":
            return f"<|box_start|>({n[0]},{n[1]}),({n[2]},{n[3]})<|box_end|>"
        return json.dumps({"bbox_2d": list(n)})
    if family == "qwen2.5-vl":
        rh, rw = input_hw or image_hw

        def absolute(v: float, size: int, new: int) -> int:
            return max(0, min(new - 1, round(v * new / size)))

        a = [absolute(x0, w, rw), absolute(y0, h, rh), absolute(x1, w, rw), absolute(y1, h, rh)]
        return json.dumps({"bbox_2d": a})
    raise ValueError(f"no box convention for {family!r}; known: {sorted(set(QWEN_VL_FAMILIES.values()))}")


def resolve_mode(mode: str, family: str | None, model_id: str) -> str:
    """"auto" -> box-prompt for the Qwen-VL family, focus-crop otherwise; box-prompt needs a known convention."""
    if mode not in MODES:
        raise ValueError(f"unknown describer mode {mode!r}; expected one of {list(MODES)}")
    if mode == "auto":
        return "box-prompt" if family else "focus-crop"
    if mode == "box-prompt" and not family:
        raise ValueError(f"describer {model_id!r}: box-prompt mode needs a model with a known box convention "
                         f"(model_type {sorted(QWEN_VL_FAMILIES)}); use mode focus-crop")
    return mode


def qwen_input_hw(h: int, w: int, image_processor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The size a Qwen-VL image processor feeds the model: smart_resize within min(budget, its max_pixels)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    size = image_processor.size  # {shortest,longest}_edge = min/max pixels (a SizeDict in transformers 5)

    def pixels(key: str, legacy: str) -> int:
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        return int(value if value is not None else getattr(image_processor, legacy))

    lo, hi = pixels("shortest_edge", "min_pixels"), pixels("longest_edge", "max_pixels")
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    return smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=max(lo, min(hi, int(max_pixels))))


# --------------------------------------------------------------------------------------------
# image-text-to-text models of transformers


class _ProcessorInputs:
    """Any model with an AutoProcessor and a chat template: the focus crop and a fixed prompt."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.prompt = prompt
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:  # decoder-only generation needs the prompts aligned at the right end
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self._text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def prompt_text(self, region: Region) -> str:
        return self.prompt

    def build(self, regions) -> dict:
        from PIL import Image

        crops = [Image.fromarray(focus_crop(r)) for r in regions]
        inputs = self.processor(images=crops, text=[self._text] * len(crops), return_tensors="pt", padding=True)
        return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.processor.batch_decode(ids, skip_special_tokens=True)


class _QwenInputs:
    """The Qwen-VL family's processor, rebuilt from its image processor and tokenizer.

    What Qwen2VLProcessor does for images (one `<|image_pad|>` per merged patch, `mm_token_type_ids`
    marking them), without its video processor, which needs torchvision. The image is resized here
    (smart_resize within the budget), so the coordinates of the box prompt refer to exactly the pixels
    the model sees.
    """

    def __init__(self, model, image_processor, tokenizer, family: str, mode: str, prompt: str, max_pixels: int):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.family, self.mode, self.prompt, self.max_pixels = family, mode, prompt, max_pixels
        self.merge = int(image_processor.merge_size)
        self.patch = int(image_processor.patch_size)
        self.image_token_id = tokenizer.convert_tokens_to_ids(_QWEN_IMAGE_PAD)
        if self.image_token_id != model.config.image_token_id:
            raise ValueError(f"tokenizer's {_QWEN_IMAGE_PAD} is id {self.image_token_id}, the model expects "
                             f"{model.config.image_token_id}")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pass_token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
        default_system = family in ("qwen2-vl", "qwen2.5-vl")  # their templates add one; Qwen3-VL's does not
        self._chatml_system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if default_system else ""

    def _image(self, region: Region) -> np.ndarray:
        return region.image if self.mode == "box-prompt" else focus_crop(region)

    def _resized(self, img: np.ndarray):
        from PIL import Image

        h, w = qwen_input_hw(img.shape[0], img.shape[1], self.image_processor, self.max_pixels)
        return Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC), (h, w)

    def prompt_text(self, region: Region) -> str:
        """The user text for one region (in box-prompt mode, with its box in the family's convention)."""
        if self.mode != "box-prompt":
            return self.prompt
        img_hw = region.image.shape[:2]
        input_hw = qwen_input_hw(img_hw[0], img_hw[1], self.image_processor, self.max_pixels)
        return self.prompt.replace("{box}", box_text(self.family, region.box, img_hw, input_hw))

    def chat(self, text: str) -> str:
        """One user turn (image, then text) in the checkpoint's chat template, else Qwen's ChatML."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if isinstance(rendered, str) and rendered.count(_QWEN_IMAGE_PAD) == 1:
                return rendered
        return f"{self._chatml_system}<|im_start|>user\n{_QWEN_IMAGE}{text}<|im_end|>\n<|im_start|>assistant\n"

    def build(self, regions) -> dict:
        images, texts = [], []
        for r in regions:
            image, (h, w) = self._resized(self._image(r))
            images.append(image)
            n_tokens = (h // self.patch) * (w // self.patch) // self.merge**2
            texts.append(self.chat(self.prompt_text(r)).replace(_QWEN_IMAGE_PAD, _QWEN_IMAGE_PAD * n_tokens))
        # the images already have the processor's size (multiples of patch * merge, within its pixel
        # range), so do_resize=False changes nothing but makes the coordinates' frame certain
        vision = self.image_processor(images=images, do_resize=False, return_tensors="pt")
        expected = [[1, im.height // self.patch, im.width // self.patch] for im in images]
        if vision["image_grid_thw"].tolist() != expected:  # pragma: no cover - a processor we do not know
            raise RuntimeError(f"image grid {vision['image_grid_thw'].tolist()} != {expected}")
        text = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                  "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        if self.pass_token_types:
            inputs["mm_token_type_ids"] = (text["input_ids"] == self.image_token_id).long()
        return inputs

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


class ImageTextDescriber:
    """An image-text-to-text model (AutoModelForImageTextToText) describing regions.

    `mode`: "box-prompt" (whole image, box in the prompt; Qwen-VL family only), "focus-crop" (crop
    with the outside dimmed) or "auto" (box-prompt for the Qwen-VL family, else focus-crop).
    `prompt`: the request; in box-prompt mode it must contain `{box}`. Greedy decoding, so labels are
    reproducible. Empty outputs fall back to the class label.
    """

    def __init__(self, model_id: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 prompt: str | None = None, max_new_tokens: int = 24, mode: Mode = "auto",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.name = model_id
        self.model_id = model_id
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device, dtype)
        if mode not in MODES:
            raise ValueError(f"unknown describer mode {mode!r}; expected one of {list(MODES)}")
        try:
            model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=self.dtype)
        except Exception as exc:
            raise load_failed("describer", model_id, exc) from exc
        self.family = QWEN_VL_FAMILIES.get(model.config.model_type)
        self.mode = resolve_mode(mode, self.family, model_id)
        self.prompt = prompt or (DEFAULT_BOX_PROMPT if self.mode == "box-prompt" else DEFAULT_PROMPT)
        if self.mode == "box-prompt" and "{box}" not in self.prompt:
            raise ValueError(f"box-prompt mode needs a prompt with {{box}}; got {self.prompt!r}")
        try:
            if self.family:
                image_processor = AutoImageProcessor.from_pretrained(model_id)
                tokenizer = AutoTokenizer.from_pretrained(model_id)
                self.inputs = _QwenInputs(model, image_processor, tokenizer, self.family, self.mode, self.prompt,
                                          max_pixels)
            else:
                self.inputs = _ProcessorInputs(AutoProcessor.from_pretrained(model_id), self.prompt)
        except Exception as exc:
            raise load_failed("describer", model_id, exc) from exc
        self.model = model.to(self.device).eval()

    def prompt_text(self, region: Region) -> str:
        """The request the model gets for `region` (with its box in box-prompt mode)."""
        return self.inputs.prompt_text(region)

    @torch.inference_mode()
    def describe(self, regions: list[Region]) -> list[str]:
        texts: list[str] = []
        for part in chunks(regions, self.batch_size):
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in self.inputs.build(part).items()}
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            decoded = self.inputs.decode(generated[:, inputs["input_ids"].shape[1]:])
            texts += [clean_text(t) or r.label or "object" for t, r in zip(decoded, part, strict=True)]
        return texts


# --------------------------------------------------------------------------------------------
# DAM (Describe Anything, arXiv:2504.16072): the paper's describer, outside transformers

DAM_QUERY = "<image>\nDescribe the masked region in detail."  # the query of DAM's examples (dam_with_sam.py)
DAM_CONV_MODE = "v1"
DAM_PROMPT_MODE = "full+focal_crop"  # DAM's "focal_prompt": the full image plus a crop around the mask
_DAM_NAME = re.compile(r"(?:^|[_\-.])dam(?:$|[_\-.\d])|describe[_\-]?anything", re.IGNORECASE)
_DAM_HELP = ("nvidia/DAM-3B needs the describe-anything package (pip install "
             "git+https://github.com/NVlabs/describe-anything); nvidia/DAM-3B-Self-Contained loads through its "
             "own remote code; both need a CUDA GPU. Or set labeling.teachers.describer to a Qwen2-VL-family "
             "model (e.g. Qwen/Qwen2-VL-7B-Instruct), or null for class labels")


def _local_config(model_id: str) -> dict | None:
    path = Path(model_id) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def is_dam(model_id: str) -> bool:
    """Whether `model_id` names a Describe Anything checkpoint (the opt-in to run its remote code).

    Its last path component says DAM (`nvidia/DAM-3B`, `.../dam_3b_v1_self_contained`), or a local
    config.json's architectures/model_type/auto_map name Describe Anything; a local config.json of
    an image-text-to-text model transformers knows (a fine-tuned Qwen2-VL called "dam-...") is not DAM.
    """
    cfg = _local_config(model_id)
    if cfg is not None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        fields = [str(cfg.get("model_type", "")), *map(str, cfg.get("architectures") or []),
                  *map(str, (cfg.get("auto_map") or {}).values())]
        if any(_DAM_NAME.search(f) for f in fields):
            return True
        if cfg.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and "auto_map" not in cfg:
            return False
    return bool(_DAM_NAME.search(model_id.rstrip("/").rsplit("/", 1)[-1]))


def dam_failed(model_id: str, reason: str) -> RuntimeError:
    """One line: the checkpoint, why it did not load, and what to do."""
    reason = " ".join(reason.split())
    return RuntimeError(f"could not load the describer teacher {model_id!r} (Describe Anything): {reason}. "
                        f"{_DAM_HELP}.")


def _why(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(f"{exc.__class__.__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_dam(model_id: str, device: torch.device):
    """DAM's inference object (`get_description(image, mask, query, ...)`), from whichever loader fits.

    A checkpoint with remote code (config.json's auto_map: DAM-3B-Self-Contained) loads with
    `AutoModel.from_pretrained(..., trust_remote_code=True)` + `init_dam(...)`, as its model card shows;
    one without (nvidia/DAM-3B) through the describe-anything package's `DescribeAnythingModel`.
    A hub id whose config is not local tries the package first when it is installed, else remote code.
    """
    cfg = _local_config(model_id)
    remote = cfg is not None and "auto_map" in cfg
    try:
        from dam import DescribeAnythingModel  # the describe-anything package
    except ImportError as exc:
        DescribeAnythingModel, package_missing = None, _why(exc)
    else:
        package_missing = ""
    reasons = []
    if remote or (cfg is None and DescribeAnythingModel is None):
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(model_id, trust_remote_code=True, dtype=torch.float16)
            return model.to(device).init_dam(conv_mode=DAM_CONV_MODE, prompt_mode=DAM_PROMPT_MODE)
        except Exception as exc:
            reasons.append(f"its remote code did not load ({_why(exc)})")
    if not remote:
        if DescribeAnythingModel is None:
            reasons.append(f"the describe-anything package is not installed ({package_missing})")
        else:
            try:
                return DescribeAnythingModel(model_path=model_id, conv_mode=DAM_CONV_MODE,
                                             prompt_mode=DAM_PROMPT_MODE).to(device)
            except Exception as exc:
                reasons.append(f"describe-anything could not load it ({_why(exc)})")
    raise dam_failed(model_id, "; ".join(reasons))


def region_mask(region: Region) -> np.ndarray:
    """The region's mask ([h, w] bool), or its box filled when it has none."""
    h, w = region.image.shape[:2]
    if region.mask is not None and region.mask.shape == (h, w) and region.mask.any():
        return region.mask.astype(bool)
    mask = np.zeros((h, w), bool)
    x0, y0, x1, y1 = region.box
    mask[max(0, int(np.floor(y0))):max(0, int(np.ceil(y1))), max(0, int(np.floor(x0))):max(0, int(np.ceil(x1)))] = True
    if not mask.any():
        mask[:] = True
    return mask


class DamDescriber:
    """DAM-3B describing each region from its mask (the focal prompt), greedy; first sentence kept.

    DAM's inference code moves its inputs with `.cuda()` and runs in fp16, so it needs a CUDA device.
    """

    def __init__(self, model_id: str, device: str = "auto", prompt: str = DAM_QUERY, max_new_tokens: int = 64):
        self.name = model_id
        self.model_id = model_id
        self.query = prompt if "<image>" in prompt else f"<image>\n{prompt}"
        self.max_new_tokens = max_new_tokens
        try:
            self.device = resolve_device(device)
        except RuntimeError as exc:
            raise dam_failed(model_id, str(exc)) from exc
        if self.device.type != "cuda":
            raise dam_failed(model_id, f"DAM's inference code runs on CUDA only, and the device is {self.device}")
        self.dam = load_dam(model_id, self.device)

    def describe(self, regions: list[Region]) -> list[str]:
        from PIL import Image

        texts = []
        for r in regions:
            mask = Image.fromarray(region_mask(r).astype(np.uint8) * 255)
            out = self.dam.get_description(Image.fromarray(r.image), mask, self.query, streaming=False,
                                           temperature=0.0, top_p=1.0, num_beams=1,
                                           max_new_tokens=self.max_new_tokens)
            texts.append(clean_text(first_sentence(str(out))) or r.label or "object")
        return texts


def load_describer(model_id: str | None, device: str = "auto", dtype: str = "auto",
                   batch_size: int = 8, mode: Mode = "auto") -> Describer:
    """`teachers.describer`: None (or "class-label") = class labels; a DAM checkpoint = `DamDescriber`;
    else an image-text-to-text model (`ImageTextDescriber`, `mode` as there)."""
    if model_id is None or model_id == CLASS_LABEL:
        return ClassLabelDescriber()
    model_id = local_model_path(model_id)  # a staged s3:// checkpoint (weights.url): this node's copy
    if is_dam(model_id):
        return DamDescriber(model_id, device=device)
    return ImageTextDescriber(model_id, device=device, dtype=dtype, batch_size=batch_size, mode=mode)
