"""Optimiser and schedule: AdamW over parameter groups, linear warm-up then cosine decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from versavit.config.schema import OptimConfig


def param_groups(named: dict[str, Iterable[nn.Parameter]], lrs: dict[str, float], weight_decay: float
                 ) -> list[dict]:
    """One AdamW group per name (e.g. "backbone", "heads"), trainable parameters only.

    Biases and norm weights (1-D tensors) get no weight decay, as usual for ViTs.
    """
    groups = []
    for name, params in named.items():
        trainable = [p for p in params if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        for suffix, ps, wd in (("", decay, weight_decay), ("_no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lrs[name], "weight_decay": wd, "name": name + suffix})
    if not groups:
        raise ValueError("no trainable parameters: check the stage's freezing settings")
    return groups


def build_optimizer(groups: list[dict], cfg: OptimConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """torch's AdamW; `fused` (default: on when CUDA is available) steps every parameter of a group in one CUDA
    kernel instead of a kernel per tensor op (foreach). DeepSpeed's ZeRO optimiser steps it on the fp32 partitions
    it moves to the GPU, so the model may still be on the CPU here. On a CPU the default foreach path stays."""
    if fused is None:
        fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)


def warmup_cosine(total_steps: int, warmup_ratio: float, schedule: str = "cosine"):  # -> Callable[[int], float]
    """LR multiplier at optimiser step s: linear warm-up over ceil(ratio * total), then cosine to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_ratio, cfg.schedule))
