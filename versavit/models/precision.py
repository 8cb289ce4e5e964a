"""The precision a run computes in: `train.precision` bf16 / fp32, or `auto` resolved on this machine.

bf16 is fast only where the hardware computes it: GPUs with bf16 support, and CPUs whose oneDNN has
native bf16 kernels (AVX-512). On an AVX2-only CPU every bf16 convolution falls back to a slow path:
the tiny config's DPT head (fwd + bwd, batch 8 at 224 px) took 45-80 s in bf16 against 1.9 s in fp32
on an AVX2 AMD EPYC, so `auto` takes fp32 there.
"""

from __future__ import annotations

import torch


def resolve_precision(precision: str) -> str:
    """"bf16" or "fp32": `precision` itself, or what `auto` means on this machine."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def precision_dtype(precision: str) -> torch.dtype:
    """The parameter dtype of `precision` (`auto` resolved first)."""
    return torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32
