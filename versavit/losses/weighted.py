"""L_all = sum over tasks of lambda_task * L_task (lambdas 1/3 each in the paper)."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum of per-task losses; a task without a weight is an error, not a silent 0."""
    missing = [t for t in losses if t not in weights]
    if missing:
        raise KeyError(f"no loss weight for task(s) {missing}")
    return sum(weights[t] * loss for t, loss in losses.items())  # type: ignore[return-value]
