"""Metrics: exact on hand-made cases, and equal to torchmetrics (an independent implementation) on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from versavit.eval.metrics import (
    DepthMeter,
    MaskMeter,
    SegmentationMeter,
    align_scale_shift,
    confusion_matrix,
    depth_errors,
)


def test_miou_hand_made() -> None:
    # 3 classes, one ignored pixel; class 2 never occurs (neither predicted nor true) -> left out of the mean
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0]])
    meter = SegmentationMeter(num_classes=3)
    meter.update(pred, target)
    out = meter.compute()
    # the ignored pixel's prediction (2) counts nowhere. class 0: truth {00, 01, 12, 13}, prediction
    # {00, 10, 12, 13} -> I = 3, U = 5; class 1: truth {02, 03, 10}, prediction {01, 02, 03} -> I = 2, U = 4
    assert out["iou_per_class"][0] == pytest.approx(3 / 5)
    assert out["iou_per_class"][1] == pytest.approx(2 / 4)
    assert out["iou_per_class"][2] is None
    assert out["miou"] == pytest.approx((0.6 + 0.5) / 2)
    assert out["acc"] == pytest.approx(5 / 7)
    perfect = SegmentationMeter(3)
    perfect.update(target.clamp(max=2), target)
    assert perfect.compute()["miou"] == 1.0


def test_miou_logits_and_bad_labels() -> None:
    meter = SegmentationMeter(2)
    logits = torch.tensor([[[[2.0, -1.0]], [[0.0, 3.0]]]])  # [1, 2, 1, 2] -> argmax [[0, 1]]
    meter.update(logits, torch.tensor([[[0, 1]]]))
    assert meter.compute()["miou"] == 1.0
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_matches_torchmetrics(seed: int) -> None:
    from torchmetrics.classification import MulticlassJaccardIndex

    gen = torch.Generator().manual_seed(seed)
    c = 7
    reference = MulticlassJaccardIndex(num_classes=c, ignore_index=255, average="macro")
    meter = SegmentationMeter(c)
    for _ in range(3):  # accumulated over batches, as over a split
        target = torch.randint(0, c - 1, (4, 16, 16), generator=gen)  # class 6 absent from the truth
        target[torch.rand(target.shape, generator=gen) < 0.1] = 255
        pred = torch.where(torch.rand(target.shape, generator=gen) < 0.6, target.clamp(max=c - 1),
                           torch.randint(0, c, target.shape, generator=gen))
        reference.update(pred, target)
        meter.update(pred, target)
    assert meter.compute()["miou"] == pytest.approx(float(reference.compute()), abs=1e-6)


def test_depth_errors_hand_made() -> None:
    gt = torch.tensor([[1.0, 2.0], [4.0, 0.0]])
    pred = torch.tensor([[1.0, 3.0], [4.0, 9.0]])  # last pixel has no ground truth
    e = depth_errors(pred, gt)
    assert e["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert e["absrel"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert e["delta1"] == pytest.approx(2 / 3)  # 3/2 = 1.5 >= 1.25
    valid = torch.tensor([[True, False], [True, True]])
    assert depth_errors(pred, gt, valid)["rmse"] == 0.0
    assert math.isnan(depth_errors(pred, torch.zeros(2, 2))["rmse"])
    # delta1 boundary: ratio exactly 1.25 is not counted
    assert depth_errors(torch.tensor([1.25, 1.0]), torch.tensor([1.0, 1.25]))["delta1"] == 0.0


def test_depth_meter_matches_torchmetrics() -> None:
    from torchmetrics.regression import MeanAbsolutePercentageError, MeanSquaredError

    gen = torch.Generator().manual_seed(0)
    gt = torch.rand(5, 12, 12, generator=gen) * 9 + 0.5
    pred = gt * (1 + 0.3 * torch.randn(gt.shape, generator=gen)).clamp_min(0.1)
    valid = torch.rand(gt.shape, generator=gen) > 0.2
    meter = DepthMeter()
    meter.update(pred, gt, valid)
    out = meter.compute()
    rmse, absrel, delta1 = [], [], []
    for i in range(5):  # per image, then the mean over images
        p, g = pred[i][valid[i]], gt[i][valid[i]]
        rmse.append(float(MeanSquaredError(squared=False)(p, g)))
        absrel.append(float(MeanAbsolutePercentageError()(p, g)))  # |p - g| / |g| == AbsRel for g > 0
        delta1.append(float((torch.log(p / g).abs() < math.log(1.25)).float().mean()))  # another formulation
    assert out["images"] == 5
    assert out["rmse"] == pytest.approx(np.mean(rmse), rel=1e-5)
    assert out["absrel"] == pytest.approx(np.mean(absrel), rel=1e-5)
    assert out["delta1"] == pytest.approx(np.mean(delta1), abs=1e-6)


def test_align_scale_shift_exact_and_lstsq() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 8, 8, generator=gen)
    target = torch.stack([3.0 * pred[0] - 0.5, -2.0 * pred[1] + 4.0])
    valid = torch.ones_like(pred, dtype=torch.bool)
    s, t = align_scale_shift(pred, target, valid)
    assert s.tolist() == pytest.approx([3.0, -2.0]) and t.tolist() == pytest.approx([-0.5, 4.0])
    noisy = target + 0.1 * torch.randn(target.shape, generator=gen)
    valid[0, :2] = False
    s, t = align_scale_shift(pred, noisy, valid)
    for i in range(2):
        a = np.stack([pred[i][valid[i]].numpy(), np.ones(int(valid[i].sum()))], 1).astype(np.float64)
        sol, *_ = np.linalg.lstsq(a, noisy[i][valid[i]].numpy().astype(np.float64), rcond=None)
        assert [float(s[i]), float(t[i])] == pytest.approx(sol.tolist(), rel=1e-6)
    s0, t0 = align_scale_shift(torch.ones(4, 4), torch.full((4, 4), 2.0), torch.ones(4, 4, dtype=torch.bool))
    assert (float(s0), float(t0)) == (0.0, 2.0)  # a constant prediction: only the shift is determined


def test_ciou_miou_hand_made_and_torchmetrics() -> None:
    from torchmetrics.classification import BinaryJaccardIndex

    meter = MaskMeter()
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:2] = True  # 8 pixels
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:1] = True  # 4 pixels inside a
    assert meter.update(b, a) == pytest.approx(0.5)
    c = torch.zeros(4, 4, dtype=torch.bool)
    c[3, 3] = True
    assert meter.update(c, c) == 1.0
    out = meter.compute()
    assert out["ciou"] == pytest.approx((4 + 1) / (8 + 1))
    assert out["miou"] == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(3)
    meter = MaskMeter()
    reference = []
    for _ in range(6):
        gt, pred = torch.rand(16, 16, generator=gen) > 0.6, torch.rand(16, 16, generator=gen) > 0.5
        meter.update(pred, gt)
        reference.append(float(BinaryJaccardIndex()(pred.long(), gt.long())))
    assert meter.compute()["miou"] == pytest.approx(np.mean(reference), abs=1e-6)
