"""Referring segmentation: w_bce * BCE + w_dice * Dice on mask logits (RECIPE.md: 2.0 and 0.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2|P.T| + s) / (|P| + |T| + s) per mask (P = sigmoid(logits)), averaged over the batch."""
    p = logits.float().sigmoid().flatten(1)
    t = target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


class SegmentationLoss(nn.Module):
    def __init__(self, w_bce: float = 2.0, w_dice: float = 0.5):
        super().__init__()
        self.w_bce, self.w_dice = w_bce, w_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        dice = dice_loss(logits, target)
        return self.w_bce * bce + self.w_dice * dice, {"bce": float(bce.detach()), "dice": float(dice.detach())}
