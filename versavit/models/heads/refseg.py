"""Referring-segmentation head: SAM-style neck + text prompt encoder + SAM mask decoder -> mask logits.

    final-layer map [B, D, h, w] -> neck (1x1 conv, LN2d, 3x3 conv, LN2d; SAM's vision neck) -> [B, C, h, w]
    text embedding [B, text_dim] (offline, e.g. Qwen3-Embedding-8B) -> MLP -> k sparse prompt tokens [B, k, C]
    SAM two-way mask decoder (IoU + mask output tokens, single mask) -> [B, 4h, 4w] -> bilinear -> [B, H, W]

Reused from transformers: `SamVisionNeck` and `SamMaskDecoder` (weights named as in SAM). Our own: the random
Fourier positional encoding, so that it is computed for any h x w grid (SAM's assumes its fixed 64x64 grid),
and the text prompt encoder (SAM has none).

Paper size (configs/paper.yaml): SAM's sizes (decoder 256 wide, 2 two-way blocks, 8 heads, MLP 2048; SAM
ViT-H's neck 1280 -> 256) and a text prompt encoder of hidden width 128 (prompt_hidden): 5.02M parameters =
4.79 x 2^20, the paper's "4.8M" (which counts M = 2^20; SAM's own neck + prompt encoder + mask decoder are
4.98M = 4.75 x 2^20). The decoder has one mask token and no IoU head (neither would train), so it is 0.55M
under SAM's; a prompt encoder as wide as the decoder (prompt_hidden None) would bring the head to 5.61M.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import SamMaskDecoderConfig, SamVisionConfig
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamVisionNeck

from versavit.config.schema import RefSegHeadConfig

NUM_TEXT_TOKENS = 2
_PE_SEED = 0  # fixed, so every rank and every rebuild has the same Fourier basis (it is not trained)


class PositionEmbeddingRandom(nn.Module):
    """SAM's random Fourier features: [sin, cos](2*pi * coords @ G), G ~ N(0, scale^2), coords in [-1, 1].

    Both axes are normalised by the grid's longer side, so a cell has the same encoding step along x and y on a
    non-square grid (as in SAM, whose non-square images are padded to a square).
    """

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(_PE_SEED)
        self.register_buffer("gaussian", scale * torch.randn(2, num_pos_feats, generator=gen))

    def forward(self, size: tuple[int, int]) -> Tensor:
        """Dense encoding [2 * num_pos_feats, h, w] of an h x w grid."""
        h, w = size
        g = self.gaussian
        side = max(h, w)
        y = (torch.arange(h, device=g.device, dtype=g.dtype) + 0.5) / side
        x = (torch.arange(w, device=g.device, dtype=g.dtype) + 0.5) / side
        coords = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1)  # [h, w, 2] as (x, y), like SAM
        proj = 2 * math.pi * ((2 * coords - 1) @ g)
        return torch.cat([proj.sin(), proj.cos()], dim=-1).permute(2, 0, 1)


class TextPromptEncoder(nn.Module):
    """Text embedding [B, text_dim] -> `num_tokens` sparse prompt tokens [B, num_tokens, C]: an MLP of hidden
    width `hidden` (default C)."""

    def __init__(self, text_dim: int, dim: int, num_tokens: int = NUM_TEXT_TOKENS, hidden: int | None = None) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        hidden = dim if hidden is None else hidden
        # LayerNorm first: sentence embeddings are often L2-normalised, i.e. tiny per component.
        self.norm = nn.LayerNorm(text_dim)
        self.fc1 = nn.Linear(text_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_tokens * dim)
        # Per-token LayerNorm last: SAM's point prompts enter the decoder at unit scale (Fourier features plus
        # N(0, 1) type embeddings), a bare Linear output is ~5x smaller and the text barely steers the decoder.
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, text: Tensor) -> Tensor:
        out = self.fc2(self.act(self.fc1(self.norm(text))))
        return self.out_norm(out.view(text.shape[0], self.num_tokens, -1))


class _NoIoU(nn.Module):
    """Stands in for SAM's IoU-prediction MLP: the recipe has no IoU loss, so its weights would never train."""

    def __init__(self, num_outputs: int) -> None:
        super().__init__()
        self.num_outputs = num_outputs

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.num_outputs)


class RefSegHead(nn.Module):
    """`forward(feature_map, text_embedding, out_size)` -> mask logits [B, H, W]."""

    def __init__(self, cfg: RefSegHeadConfig, embed_dim: int, num_text_tokens: int = NUM_TEXT_TOKENS) -> None:
        super().__init__()
        dim = cfg.decoder_dim
        if dim % 8:
            raise ValueError(f"decoder_dim ({dim}) must be divisible by 8 (SAM's mask upscaling goes to dim/8)")
        if (dim // 2) % cfg.decoder_heads:
            raise ValueError(f"decoder_heads ({cfg.decoder_heads}) must divide decoder_dim/2 ({dim // 2}): "
                             f"SAM's cross-attention runs at half width")
        self.text_dim = cfg.text_dim
        self.neck = SamVisionNeck(SamVisionConfig(hidden_size=embed_dim, output_channels=dim, num_attention_heads=1))
        self.pe = PositionEmbeddingRandom(dim // 2)
        self.prompt_encoder = TextPromptEncoder(cfg.text_dim, dim, num_text_tokens, cfg.prompt_hidden)
        self.no_mask_embed = nn.Embedding(1, dim)  # SAM's dense prompt when no mask is given
        dec_cfg = SamMaskDecoderConfig(
            hidden_size=dim, num_hidden_layers=cfg.decoder_depth, num_attention_heads=cfg.decoder_heads,
            mlp_dim=8 * dim,  # SAM: 2048 for 256
            num_multimask_outputs=0,  # one mask token: the expression names one object, no ambiguity outputs
        )
        dec_cfg._attn_implementation = "sdpa"  # a standalone config has none; sdpa == eager here, and faster
        self.decoder = SamMaskDecoder(dec_cfg)
        self.decoder.iou_prediction_head = _NoIoU(self.decoder.num_mask_tokens)

    def forward(self, feature_map: Tensor, text_embedding: Tensor, out_size: tuple[int, int]) -> Tensor:
        """feature_map [B, D, h, w] (final layer), text_embedding [B, text_dim] -> logits [B, *out_size]."""
        if text_embedding.shape != (feature_map.shape[0], self.text_dim):
            raise ValueError(f"text_embedding must be [B={feature_map.shape[0]}, {self.text_dim}], "
                             f"got {list(text_embedding.shape)}")
        batch, _, h, w = feature_map.shape
        image = self.neck(feature_map.permute(0, 2, 3, 1))  # SAM's neck takes channels-last
        dtype = image.dtype
        pe = self.pe((h, w)).to(dtype).unsqueeze(0).expand(batch, -1, -1, -1)
        sparse = self.prompt_encoder(text_embedding.to(dtype)).unsqueeze(1)  # [B, point_batch=1, k, C]
        dense = self.no_mask_embed.weight.to(dtype).view(1, -1, 1, 1).expand(batch, -1, h, w)
        masks, _ = self.decoder(image_embeddings=image, image_positional_embeddings=pe,
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                multimask_output=False)
        masks = masks[:, 0]  # [B, 1, 4h, 4w]
        return nn.functional.interpolate(masks, size=tuple(out_size), mode="bilinear", align_corners=False)[:, 0]
