"""Losses: hand-computed values and the invariances the recipe relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from versavit.losses import (
    DepthLoss,
    SegmentationLoss,
    answer_token_ce,
    dice_loss,
    gradient_matching_loss,
    normalize_ssi,
    ssi_loss,
    weighted_total,
)


def test_normalize_ssi_by_hand() -> None:
    d = torch.tensor([[[1.0, 2.0], [3.0, 10.0]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    # valid values 1, 2, 3: median 2, mean |d - 2| = (1 + 0 + 1) / 3
    n = normalize_ssi(d, valid)
    s = 2 / 3
    assert torch.allclose(n, torch.tensor([[[-1 / s, 0.0], [1 / s, 0.0]]]))


def test_ssi_loss_by_hand() -> None:
    pred = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    target = torch.tensor([[[0.0, 1.0, 2.0, 7.0]]])
    valid = torch.ones_like(pred, dtype=torch.bool)
    # pred: median of [0,1,2,3] (torch: lower median) = 1, MAD = (1+0+1+2)/4 = 1 -> [-1, 0, 1, 2]
    # target: median 1, MAD = (1+0+1+6)/4 = 2 -> [-0.5, 0, 0.5, 3]; |diff| = [.5, 0, .5, 1] -> mean 0.5
    loss = ssi_loss(normalize_ssi(pred, valid), normalize_ssi(target, valid), valid)
    assert loss.item() == pytest.approx(0.5)


def test_ssi_invariant_to_positive_affine_map_of_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(3, 16, 20, generator=g), torch.rand(3, 16, 20, generator=g) + 0.5
    valid = torch.rand(3, 16, 20, generator=g) > 0.2
    loss = DepthLoss()
    base, _ = loss(pred, target, valid)
    for a, b in [(3.0, 0.0), (0.25, 7.0), (11.0, -4.0)]:
        moved, _ = loss(a * pred + b, target, valid)
        assert moved.item() == pytest.approx(base.item(), rel=1e-4)
    flipped, _ = loss(-pred, target, valid)  # not invariant to a negative scale: the test can fail
    assert abs(flipped.item() - base.item()) > 1e-2


def test_gradient_matching_zero_for_identical_maps_and_by_hand() -> None:
    x = torch.rand(2, 12, 12)
    valid = torch.ones_like(x, dtype=torch.bool)
    assert gradient_matching_loss(x, x.clone(), valid, scales=4).item() == 0.0
    # residual r = [[0, 1], [0, 0]] at one scale: |dx| = 1 (row 0), |dy| = 1 (col 1) -> 2 / 4 pixels
    pred = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    target = torch.zeros(1, 2, 2)
    v = torch.ones(1, 2, 2, dtype=torch.bool)
    assert gradient_matching_loss(pred, target, v, scales=1).item() == pytest.approx(0.5)
    # invalid pixels break pairs: mask out (0,1) -> no valid pair touches the residual
    v[0, 0, 1] = False
    assert gradient_matching_loss(pred, target, v, scales=1).item() == 0.0


def test_depth_loss_weights_and_zero_at_optimum() -> None:
    target = torch.rand(2, 8, 8) + 1
    valid = torch.ones_like(target, dtype=torch.bool)
    total, parts = DepthLoss(1.0, 0.5, 4)(2 * target + 3, target, valid)
    assert total.item() == pytest.approx(0.0, abs=1e-5) and parts["ssi"] == pytest.approx(0, abs=1e-5)
    pred = torch.rand(2, 8, 8)
    total, parts = DepthLoss(1.0, 0.5, 4)(pred, target, valid)
    assert total.item() == pytest.approx(parts["ssi"] + 0.5 * parts["gm"], rel=1e-5)


def test_bce_dice_by_hand() -> None:
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # sigmoid(0) = .5 everywhere: BCE = ln 2; dice = 1 - (2*.5 + 1)/(2 + 1 + 1) = 0.5
    assert dice_loss(logits, target).item() == pytest.approx(0.5)
    total, parts = SegmentationLoss(2.0, 0.5)(logits, target)
    assert parts["bce"] == pytest.approx(math.log(2), rel=1e-5)
    assert total.item() == pytest.approx(2 * math.log(2) + 0.25, rel=1e-5)
    perfect = torch.where(target > 0, 20.0, -20.0)
    assert SegmentationLoss()(perfect, target)[0].item() < 1e-3


def test_answer_token_ce_counts_only_answer_tokens() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 4], labels[0, 5], labels[1, 3] = 3, 7, 2
    loss, n = answer_token_ce(logits, labels)
    manual = torch.stack([F.cross_entropy(logits[0, 3], torch.tensor(3)),
                          F.cross_entropy(logits[0, 4], torch.tensor(7)),
                          F.cross_entropy(logits[1, 2], torch.tensor(2))]).mean()
    assert n == 3 and loss.item() == pytest.approx(manual.item(), rel=1e-5)
    logits2 = logits.clone()
    logits2[0, 0] += 5  # a prompt position: its prediction is not scored
    assert answer_token_ce(logits2, labels)[0].item() == pytest.approx(loss.item())


def test_weighted_total() -> None:
    losses = {"caption": torch.tensor(3.0), "depth": torch.tensor(6.0)}
    assert weighted_total(losses, {"caption": 1 / 3, "depth": 0.5}).item() == pytest.approx(4.0)
    with pytest.raises(KeyError, match="depth"):
        weighted_total(losses, {"caption": 1.0})
