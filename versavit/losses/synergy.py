"""Cross-task synergy losses (VITRON, seeds/003): task discrimination and soft subspace orthogonality."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def orthogonality_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||A^T B / n||_F^2 over a batch of n row-normalised codes (Domain Separation Networks' difference loss).

    A^T B sums, over the batch, the outer products of each sample's task-invariant and task-specific codes:
    it is 0 when every invariant feature, as a vector over the batch, is orthogonal to every specific one,
    i.e. the two codes carry uncorrelated information. One sample cannot reach 0 (a single outer product of
    unit vectors), so the term acts across the batch.
    """
    a = F.normalize(a.float(), dim=1)
    b = F.normalize(b.float(), dim=1)
    return (a.T @ b / a.shape[0]).pow(2).sum()


def synergy_loss(disc_logits: torch.Tensor, spec_logits: torch.Tensor, invariant: torch.Tensor,
                 specific: torch.Tensor, target: torch.Tensor, specific_weight: float = 1.0,
                 orthogonal_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """CE(discriminator) + specific_weight * CE(task classifier) + orthogonal_weight * orthogonality.

    The discriminator's CE is minimised by the discriminator itself; the gradient-reversal layer in front of
    it (versavit.models.synergy) turns the same term into "maximise" for the backbone. Returns the loss and
    floats to log: the discriminator's accuracy should fall towards chance (1 / number of tasks) as the
    shared features become task-agnostic; the classifier's should stay high.
    """
    disc = F.cross_entropy(disc_logits.float(), target)
    spec = F.cross_entropy(spec_logits.float(), target)
    orth = orthogonality_loss(invariant, specific)
    loss = disc + specific_weight * spec + orthogonal_weight * orth
    with torch.no_grad():
        parts = {
            "synergy/disc_loss": float(disc),
            "synergy/disc_acc": float((disc_logits.argmax(-1) == target).float().mean()),
            "synergy/spec_loss": float(spec),
            "synergy/spec_acc": float((spec_logits.argmax(-1) == target).float().mean()),
            "synergy/orth": float(orth),
        }
    return loss, parts
