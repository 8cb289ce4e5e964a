"""Caption / VQA: next-token cross-entropy averaged over the answer tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def answer_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean CE of predicting token t+1 from position t, over positions whose label is not -100.

    logits [B, T, V], labels [B, T] (already -100 outside the answers). Returns (loss, #tokens).
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    count = int((shift_labels != IGNORE).sum())
    if count == 0:  # keeps the graph (and DeepSpeed's hooks) alive on an empty batch
        return shift_logits.sum() * 0.0, 0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="mean"), count
