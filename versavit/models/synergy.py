"""VITRON-style cross-task synergy module (seeds/003, "Cross-task Synergy Learning"), as a regulariser.

    pooled backbone features f (one vector per image)
      -> LayerNorm -> invariant projection  z_inv -> GRL -> discriminator -> which task?   (adversarial)
                   -> specific projection   z_spec ------> classifier    -> which task?   (cooperative)
      + soft orthogonality between z_inv and z_spec

The discriminator learns to tell the task from z_inv; the gradient-reversal layer (GRL) hands the
backbone and the invariant projection the negated gradient, so they learn to make the task unreadable
from the shared features. The task-specific side has both a classifier and an orthogonality term: the
classifier is what makes z_spec task-specific (without a consumer it would carry nothing, and the
orthogonality term alone is trivially met by z_spec = 0), and the orthogonality term keeps the task
information it gathers out of the subspace that z_inv uses (Domain Separation Networks' difference loss).

The module is a training-time regulariser only: exports do not contain it.
"""

from __future__ import annotations

import torch
from torch import nn

from versavit.config.schema import SynergyConfig
from versavit.losses.synergy import synergy_loss


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001 - autograd ctx
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad.neg() * ctx.scale, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the incoming gradient by -scale (Ganin & Lempitsky, 2015)."""
    return _GradReverse.apply(x, scale)


class SynergyModule(nn.Module):
    def __init__(self, in_dim: int, tasks: list[str], cfg: SynergyConfig):
        super().__init__()
        if len(tasks) < 2:
            raise ValueError(f"the synergy discriminator needs at least two tasks, got {tasks}")
        self.tasks = list(tasks)
        self.grl_scale = cfg.grl_scale
        self.specific_weight, self.orthogonal_weight = cfg.specific_weight, cfg.orthogonal_weight
        n, d = len(tasks), cfg.dim
        self.norm = nn.LayerNorm(in_dim)
        self.invariant = nn.Linear(in_dim, d)
        self.specific = nn.Linear(in_dim, d)
        self.discriminator = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, n))
        self.classifier = nn.Linear(d, n)

    def forward(self, pooled: torch.Tensor, task: str, reverse: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """pooled: [B, D] features of one task's batch. `reverse=False` drops the GRL (for tests)."""
        x = self.norm(pooled.to(self.norm.weight.dtype))
        z_inv, z_spec = self.invariant(x), self.specific(x)
        disc_in = grad_reverse(z_inv, self.grl_scale) if reverse else z_inv
        target = torch.full((pooled.shape[0],), self.tasks.index(task), dtype=torch.long, device=pooled.device)
        return synergy_loss(self.discriminator(disc_in), self.classifier(z_spec), z_inv, z_spec, target,
                            self.specific_weight, self.orthogonal_weight)
