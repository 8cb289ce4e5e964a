"""Synergy losses: discriminator / classifier cross-entropies, accuracies, DSN orthogonality."""

from __future__ import annotations

import pytest
import torch

from versavit.losses.synergy import orthogonality_loss, synergy_loss


def test_synergy_loss_parts_and_orthogonality() -> None:
    target = torch.tensor([1, 1])
    logits = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss, parts = synergy_loss(logits, logits, a, a, target, specific_weight=0.0, orthogonal_weight=0.0)
    assert parts["synergy/disc_acc"] == 0.5 and parts["synergy/spec_acc"] == 0.5
    assert loss.item() == pytest.approx(parts["synergy/disc_loss"], rel=1e-6)
    # codes uncorrelated over the batch: 0; the same code on both sides: > 0
    inv = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert orthogonality_loss(inv, torch.tensor([[0.0, 1.0], [0.0, -3.0]])) == 0
    assert orthogonality_loss(a, a) > 0.5
