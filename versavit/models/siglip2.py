"""SigLIP2 (NaFlex) as a VersaViT backbone kind (`model.backbone.kind: siglip2`): the paper's Table 6 comparison.

transformers' `Siglip2VisionModel` takes each image at its own resolution as a row-major sequence of flattened
16x16 patches, padded to the longest image of the batch (`pixel_attention_mask` marks the real patches,
`spatial_shapes` gives each image's patch grid, to which the learned 16x16 position grid is resized). This module
holds the SigLIP2 mechanics `versavit.models.backbone.Siglip2Backbone` runs: patchify [0, 1] images exactly like
transformers' Siglip2ImageProcessor (mean = std = 0.5, each patch flattened as (row, col, channel)), one pass
returning the hidden states of the requested encoder layers, and the 2x2 merge of neighbouring patches that the
caption projector reads (as Qwen2-VL's merger does: 4 x D wide).

Features are the encoder layers' outputs, the final one included: the tower's `post_layernorm` and attention-
pooling `head` (SigLIP2's contrastive readout) are not on VersaViT's path, like Qwen-VL's merger; they stay in
the module, frozen, so checkpoints load and save unchanged. Image sides must be multiples of 32 (patch 16 x 2x2
merge): the data pipeline resizes to `model.backbone.resize_factor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.siglip2.configuration_siglip2 import Siglip2Config, Siglip2VisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionModel

from versavit.config.schema import PATCH_SIZES, BackboneConfig

KIND = "siglip2"
PATCH_SIZE = PATCH_SIZES[KIND]
MERGE_SIZE = 2
IMAGE_MEAN = (0.5, 0.5, 0.5)  # Siglip2ImageProcessor: rescale to [0, 1], then (x - 0.5) / 0.5
IMAGE_STD = (0.5, 0.5, 0.5)
VISION_MODEL_TYPE = "siglip2_vision_model"  # a Siglip2VisionModel folder (what save_pretrained writes)
FULL_MODEL_TYPE = "siglip2"  # a full Siglip2Model (e.g. google/siglip2-so400m-patch16-naflex): its vision_model.*
WEIGHT_PREFIXES = ("vision_model.",)
UNUSED = ("post_layernorm", "head")  # the contrastive readout: never run, frozen
TOWER_CLASS = Siglip2VisionModel
VISION_CONFIG_CLASS = Siglip2VisionConfig
FULL_CONFIG_CLASS = Siglip2Config


def vision_config(cfg: BackboneConfig) -> Siglip2VisionConfig:
    """The transformers config of a from-scratch tower of `cfg`'s sizes (no pooling head: VersaViT reads the
    patch tokens; a loaded checkpoint keeps its own)."""
    return Siglip2VisionConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=round(cfg.embed_dim * cfg.mlp_ratio), patch_size=PATCH_SIZE, vision_use_head=False,
    )


def check_tower(tower: Siglip2VisionModel) -> None:
    if not isinstance(tower, Siglip2VisionModel):
        raise TypeError(f"expected transformers' Siglip2VisionModel, got {type(tower).__name__}")
    if tower.config.patch_size != PATCH_SIZE or tower.config.num_channels != 3:
        raise ValueError(f"VersaViT expects SigLIP2 with patch {PATCH_SIZE} on RGB, the tower has patch "
                         f"{tower.config.patch_size}, {tower.config.num_channels} channels")


def unused_modules(tower: Siglip2VisionModel) -> list[nn.Module]:
    return [getattr(tower, name) for name in UNUSED if hasattr(tower, name)]


def patchify(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[0, 1] images [3, H_i, W_i] (sides multiples of 16) -> the tower's inputs: normalised patches
    [B, L, 16*16*3] (row-major, each flattened as (row, col, channel) like Siglip2ImageProcessor; zero padding to
    the longest image's L), pixel_attention_mask [B, L] (1 = a real patch) and spatial_shapes [B, 2] (h_i, w_i)."""
    p = PATCH_SIZE
    grids = [(im.shape[-2] // p, im.shape[-1] // p) for im in images]
    length = max(h * w for h, w in grids)
    first = images[0]
    dtype = first.dtype if first.is_floating_point() else torch.float32
    pixels = first.new_zeros((len(images), length, p * p * 3), dtype=dtype)
    mask = torch.zeros(len(images), length, dtype=torch.long, device=first.device)
    # statistics made per call (not buffers): a bf16 cast of the module must not round them
    mean = torch.tensor(IMAGE_MEAN, dtype=dtype, device=first.device).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=dtype, device=first.device).view(3, 1, 1)
    for i, (image, (h, w)) in enumerate(zip(images, grids, strict=True)):
        x = (image.to(dtype) - mean) / std
        # [3, h, p, w, p] -> [h, w, p(row), p(col), 3]
        x = x.reshape(3, h, p, w, p).permute(1, 3, 2, 4, 0)
        pixels[i, : h * w] = x.reshape(h * w, p * p * 3)
        mask[i, : h * w] = 1
    shapes = torch.tensor(grids, dtype=torch.long, device=first.device)
    return pixels, mask, shapes


def encode(tower: Siglip2VisionModel, pixels: torch.Tensor, mask: torch.Tensor, shapes: torch.Tensor,
           keep: set[int]) -> dict[int, torch.Tensor]:
    """Hidden states [B, L, D] of layers `keep` (0 = the patch + position embeddings, i = the i-th encoder
    layer's output), as transformers' `output_hidden_states` gives them; post_layernorm and head are not run.
    The layers are called as the tower calls them, so gradient checkpointing (training mode) applies."""
    hidden = tower.embeddings(pixels, shapes)
    attention_mask = create_bidirectional_mask(config=tower.config, inputs_embeds=hidden, attention_mask=mask)
    out = {0: hidden} if 0 in keep else {}
    last = max(keep)
    for i, layer in enumerate(tower.encoder.layers, start=1):
        if i > last:
            break
        hidden = layer(hidden, attention_mask)
        if i in keep:
            out[i] = hidden
    return out


def to_maps(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major tokens of same-size images [B, >= h*w, D] -> maps [B, D, h, w]."""
    return tokens[:, : h * w].reshape(tokens.shape[0], h, w, tokens.shape[-1]).permute(0, 3, 1, 2)


def merge_units(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One image's row-major tokens [h*w, D] -> its 2x2 merge units [h*w/4, 4*D]: units in raster order of the
    h/2 x w/2 grid, inside a unit top-left, top-right, bottom-left, bottom-right (VisionBackbone's layout)."""
    m, d = MERGE_SIZE, tokens.shape[-1]
    x = tokens.reshape(h // m, m, w // m, m, d).permute(0, 2, 1, 3, 4)
    return x.reshape(h * w // (m * m), m * m * d)
