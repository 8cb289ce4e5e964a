"""Depth head: a DPT head (reassemble, fuse, upsample) on several backbone layers -> dense map at input size.

Reuses transformers' Depth-Anything neck and head (`DepthAnythingNeck`, `DepthAnythingDepthEstimationHead`).
They take any number of maps (one reassemble layer and one fusion block per map), so the paper's three layers
go in as three maps, resampled like Depth-Anything-V2-Large's levels (x4, x2, x1, x0.5 of the patch grid) cut
to the number of layers. With three layers the coarse x0.5 level is the one dropped: the fine levels carry the
detail a dense map needs, and the deepest layer still enters at x1. Reassemble channels: `cfg.out_channels`,
or by default Depth-Anything-V2-Large's pattern [f, 2f, 4f, 4f] (f = cfg.features) cut the same way.

Paper size (configs/paper.yaml): features 256 (Depth-Anything-V2-L's), every level at 1024 channels (its deep
levels' width) -> 38.42M parameters on ViT-H's 1280-wide maps = 36.6 x 2^20, the paper's "37.0M" (the paper
counts M = 2^20: its ViT-H's "644.5M" is Qwen2-VL-7B's 675.8M visual parameters). The default
[256, 512, 1024] would give 14.95M; Depth-Anything-V2-L's own four-level head on ViT-H, 31.67M.
Which backbone blocks feed the head (cfg.layers, 1-based, or the backbone's `uniform_layers(3)`) is the
assembled model's business; this head only takes the maps, shallow to deep.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import DepthAnythingConfig
from transformers.models.depth_anything.modeling_depth_anything import (
    DepthAnythingDepthEstimationHead,
    DepthAnythingNeck,
)

from versavit.config.schema import DepthHeadConfig

PATCH_SIZE = 14
_CHANNEL_MULTIPLIERS = (1, 2, 4, 4)  # Depth-Anything-V2-L: [256, 512, 1024, 1024] for features 256
_FACTORS = (4, 2, 1, 0.5)


def depth_anything_config(cfg: DepthHeadConfig, embed_dim: int, num_layers: int) -> DepthAnythingConfig:
    """The DepthAnythingConfig of the neck and head for `num_layers` maps of `embed_dim` channels."""
    if not 1 <= num_layers <= len(_FACTORS):
        raise ValueError(f"depth head takes 1 to {len(_FACTORS)} layers, got {num_layers}")
    f = cfg.features
    channels = list(cfg.out_channels) if cfg.out_channels else [m * f for m in _CHANNEL_MULTIPLIERS[:num_layers]]
    if len(channels) != num_layers:
        raise ValueError(f"depth head: out_channels {channels} has {len(channels)} entries for {num_layers} layers")
    return DepthAnythingConfig(
        reassemble_hidden_size=embed_dim,
        neck_hidden_sizes=channels,
        reassemble_factors=list(_FACTORS[:num_layers]),
        fusion_hidden_size=f,
        head_hidden_size=32,
        head_in_index=-1,
        patch_size=PATCH_SIZE,
        depth_estimation_type="relative",
        max_depth=1,
    )


class DepthHead(nn.Module):
    """DPT head: `forward(features, out_size)` maps per-layer [B, D, h, w] maps to a non-negative [B, H, W]
    relative depth or disparity map (cfg.target; the loss is scale-and-shift invariant either way)."""

    def __init__(self, cfg: DepthHeadConfig, embed_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.target = cfg.target
        self.config = depth_anything_config(cfg, embed_dim, num_layers)
        self.neck = DepthAnythingNeck(self.config)
        self.head = DepthAnythingDepthEstimationHead(self.config)
        # Softplus instead of Depth-Anything's final ReLU: still non-negative, but no pixel starts with a
        # dead gradient, which matters when the head is trained from scratch for few steps.
        self.head.activation2 = nn.Softplus()
        # The deepest fusion block gets no residual input, so its first residual unit is never run (as in DPT
        # and Depth-Anything); dropping it keeps every parameter trainable (2*9*f^2 weights).
        self.neck.fusion_stage.layers[0].residual_layer1 = nn.Identity()

    def forward(self, features: list[Tensor], out_size: tuple[int, int]) -> Tensor:
        """features: `num_layers` maps [B, D, h, w] (shallow to deep); returns [B, H, W] at `out_size`."""
        if len(features) != self.num_layers:
            raise ValueError(f"depth head expects {self.num_layers} feature maps, got {len(features)}")
        batch, _, h, w = features[0].shape
        tokens = []
        for fmap in features:
            if fmap.shape[2:] != (h, w):
                raise ValueError(f"feature maps differ in size: {tuple(fmap.shape[2:])} vs {(h, w)}")
            seq = fmap.flatten(2).transpose(1, 2)  # [B, h*w, D]
            # The neck drops token 0 (a ViT's CLS token); a zero token stands in for it.
            tokens.append(torch.cat([seq.new_zeros(batch, 1, seq.shape[-1]), seq], dim=1))
        fused = self.neck(tokens, patch_height=h, patch_width=w)
        depth = self.head(fused, patch_height=h, patch_width=w)  # [B, 14h, 14w]
        if tuple(depth.shape[-2:]) != tuple(out_size):
            depth = nn.functional.interpolate(depth.unsqueeze(1), size=tuple(out_size), mode="bilinear",
                                              align_corners=False).squeeze(1)
        return depth
