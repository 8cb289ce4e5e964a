"""Depth: scale-and-shift-invariant loss + multi-scale gradient matching (MiDaS / Depth-Anything).

L_depth = w_ssi * L_ssi + w_gm * L_gm, where both compare maps normalised per image as
d^ = (d - median(d)) / mean|d - median(d)| over the valid pixels (RECIPE.md, supplementary 8.1).
"""

from __future__ import annotations

import torch
from torch import nn


def normalize_ssi(d: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image: subtract the median and divide by the mean absolute deviation (valid pixels).

    d, valid: [B, H, W]. Invalid pixels come out as 0.
    """
    out = torch.zeros_like(d)
    for i in range(d.shape[0]):  # medians over ragged valid sets: a loop over the (small) batch
        v = d[i][valid[i]]
        if v.numel() == 0:
            continue
        t = v.median()
        s = (v - t).abs().mean().clamp_min(eps)
        out[i] = torch.where(valid[i], (d[i] - t) / s, torch.zeros_like(d[i]))
    return out


def ssi_loss(pred_n: torch.Tensor, target_n: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean |pred^ - target^| over valid pixels, per image, averaged over images that have any."""
    per_pixel = (pred_n - target_n).abs() * valid
    counts = valid.flatten(1).sum(1)
    has = counts > 0
    if not has.any():
        return pred_n.sum() * 0.0
    return (per_pixel.flatten(1).sum(1)[has] / counts[has]).mean()


def gradient_matching_loss(pred_n: torch.Tensor, target_n: torch.Tensor, valid: torch.Tensor,
                           scales: int = 4) -> torch.Tensor:
    """Multi-scale gradient matching on the normalised residual (MiDaS), summed over K scales.

    At scale k the maps are subsampled by 2^k; |d/dx| and |d/dy| of the residual are summed over
    pixel pairs that are both valid, divided by the number of valid pixels (batch-based).
    """
    total = pred_n.new_zeros(())
    for k in range(scales):
        step = 2**k
        r = (pred_n - target_n)[:, ::step, ::step]
        m = valid[:, ::step, ::step].to(r.dtype)
        gx = (r[:, :, 1:] - r[:, :, :-1]).abs() * m[:, :, 1:] * m[:, :, :-1]
        gy = (r[:, 1:, :] - r[:, :-1, :]).abs() * m[:, 1:, :] * m[:, :-1, :]
        n = m.sum()
        if n > 0:
            total = total + (gx.sum() + gy.sum()) / n
    return total


class DepthLoss(nn.Module):
    """w_ssi * L_ssi + w_gm * L_gm on per-image normalised maps. Returns (total, parts)."""

    def __init__(self, w_ssi: float = 1.0, w_gm: float = 0.5, scales: int = 4):
        super().__init__()
        self.w_ssi, self.w_gm, self.scales = w_ssi, w_gm, scales

    def forward(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        pred = pred.float()
        pred_n = normalize_ssi(pred, valid)
        target_n = normalize_ssi(target.float(), valid)
        ssi = ssi_loss(pred_n, target_n, valid)
        gm = gradient_matching_loss(pred_n, target_n, valid, self.scales) if self.w_gm else pred.new_zeros(())
        total = self.w_ssi * ssi + self.w_gm * gm
        return total, {"ssi": float(ssi.detach()), "gm": float(gm.detach())}
