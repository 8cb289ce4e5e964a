"""Linear probes on cached features: deterministic given a seed, able to learn, and the feature cache itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import eval_config

from versavit.eval.datasets import SyntheticWorld
from versavit.eval.features import FeatureSet, backbone_digest, cached_features
from versavit.eval.probe import LinearDepthHead, ProbeSettings, sig_loss, train_depth_probe, train_seg_probe
from versavit.models.backbone import VisionBackbone


def _feature_set(n: int, seed: int, dim: int = 12, grid: int = 4, res: int = 28, classes: int = 3) -> FeatureSet:
    """Random patch features whose labels and depth are (nearly) linear functions of them."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, dim, grid, grid)).astype(np.float16)
    w = np.random.default_rng(99).standard_normal((classes, dim))
    # targets from bilinearly upsampled linear scores: exactly what a probe with upsampled logits can fit
    scores = torch.from_numpy(np.einsum("cd,ndhw->nchw", w, feats.astype(np.float64))).float()
    scores = F.interpolate(scores, size=(res, res), mode="bilinear", align_corners=False)
    seg = scores.argmax(1).numpy().astype(np.uint8)
    seg[:, :2] = 255  # an ignored band
    depth = torch.exp(scores[:, 0] / 6 + 1.0).numpy().astype(np.float32)
    valid = np.ones_like(depth, bool)
    valid[:, -3:] = False
    return FeatureSet(feats, {"seg": seg, "depth": depth, "valid": valid}, None, {"resolution": res})


SETTINGS = ProbeSettings(epochs=4, lr=0.05, batch_size=8, seed=0)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("head", ["seg", "linear", "binned"])
def test_probe_is_deterministic_given_a_seed(head: str) -> None:
    train, val = _feature_set(21, 0), _feature_set(6, 1)  # 21 = 2 full batches + a remainder of 5

    def run(seed: int):
        s = ProbeSettings(**{**SETTINGS.__dict__, "seed": seed, "depth_head": "binned" if head == "binned" else
                             "linear", "depth_bins": 16})
        if head == "seg":
            return train_seg_probe(train, val, 3, s)
        return train_depth_probe(train, val, 0.1, 20.0, s)

    rng_before = torch.get_rng_state()
    first, second, other = run(0), run(0), run(1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    assert _same_state(first.state, second.state)
    assert first.metrics == second.metrics and first.history == second.history
    assert np.array_equal(first.examples["pred"], second.examples["pred"])
    assert not _same_state(first.state, other.state)


def test_probes_learn_linear_targets() -> None:
    train, val = _feature_set(64, 2), _feature_set(16, 3)
    settings = ProbeSettings(epochs=30, lr=0.05, batch_size=16, seed=0)
    seg = train_seg_probe(train, val, 3, settings)
    assert seg.metrics["miou"] > 0.75
    assert seg.history["epoch_loss"][-1] < seg.history["epoch_loss"][0]
    assert seg.examples["pred"].shape == (4, 28, 28)
    depth = train_depth_probe(train, val, 0.1, 20.0, settings)
    assert depth.metrics["absrel"] < 0.25 and depth.metrics["delta1"] > 0.6
    binned = train_depth_probe(train, val, 0.1, 20.0, ProbeSettings(**{**settings.__dict__, "depth_head": "binned",
                                                                        "depth_bins_space": "log"}))
    assert binned.metrics["absrel"] < 0.35


def test_depth_heads_and_sig_loss() -> None:
    head = LinearDepthHead(4, 0.5, 10.0, "binned", bins=5, bins_space="linear")
    assert head.centres.tolist() == pytest.approx([0.5, 2.875, 5.25, 7.625, 10.0])
    out = head.eval()(torch.randn(2, 4, 3, 3))
    assert out.shape == (2, 3, 3) and bool(((out >= 0.5) & (out <= 10.0)).all())
    log_head = LinearDepthHead(4, 0.1, 10.0, "binned", bins=3, bins_space="log")
    assert log_head.centres.tolist() == pytest.approx([0.1, 1.0, 10.0], rel=1e-5)
    linear = LinearDepthHead(4, 0.1, 10.0, "linear").eval()(torch.randn(2, 4, 3, 3))
    assert bool(((linear > 0) & (linear < 10.0)).all())
    gt = torch.rand(2, 5, 5) + 1
    valid = torch.ones_like(gt, dtype=torch.bool)
    assert float(sig_loss(gt, gt, valid)) == pytest.approx(0.0, abs=1e-5)
    # a pure scale error costs sqrt(0.15) * |log s|: scale-invariant up to the 0.15 term
    assert float(sig_loss(2 * gt, gt, valid)) == pytest.approx(np.sqrt(0.15) * np.log(2), rel=1e-4)
    assert float(sig_loss(gt, gt, torch.zeros_like(valid))) == 0.0


def test_feature_cache(eval_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = eval_config(eval_run)
    torch.manual_seed(0)
    backbone = VisionBackbone.build(cfg.model.backbone).eval()
    reader = SyntheticWorld(f"{eval_run}/data/synthetic/val")
    first = cached_features(backbone, reader, 56, tmp_path, batch_size=3)
    assert first.features.shape == (8, 32, 4, 4) and first.features.dtype == np.float16
    assert first.targets["seg"].shape == (8, 56, 56) and first.images.shape == (4, 56, 56, 3)
    assert first.meta["backbone_digest"] == backbone_digest(backbone)
    from versavit.data.tasks import image_tensor

    image, _ = next(iter(reader))
    with torch.inference_mode():
        direct = backbone(image_tensor(image, (56, 56))[None]).maps[0].numpy()
    np.testing.assert_allclose(first.features[0].astype(np.float32), direct, rtol=2e-3, atol=2e-3)

    def boom(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(backbone, "forward", boom)
    again = cached_features(backbone, reader, 56, tmp_path)
    assert np.array_equal(np.asarray(again.features), np.asarray(first.features))
    monkeypatch.undo()
    other = cached_features(backbone, reader, 28, tmp_path)  # another resolution: another entry
    assert other.features.shape == (8, 32, 2, 2)
    assert len(list((tmp_path / "features").iterdir())) == 2 and len(list((tmp_path / "targets").iterdir())) == 2
    assert not list(tmp_path.glob("*/*.tmp-*"))  # nothing half-written left behind
    with torch.no_grad():
        next(backbone.parameters()).add_(1.0)  # other weights: another digest, another entry
    cached_features(backbone, reader, 28, tmp_path)
    assert len(list((tmp_path / "features").iterdir())) == 3 and len(list((tmp_path / "targets").iterdir())) == 2

    # the probe on these cached features is deterministic too
    train = cached_features(backbone, SyntheticWorld(f"{eval_run}/data/synthetic/train"), 28, tmp_path)
    runs = [train_seg_probe(train, other, 5, ProbeSettings(epochs=2, batch_size=8, seed=3)) for _ in range(2)]
    assert _same_state(runs[0].state, runs[1].state) and runs[0].metrics == runs[1].metrics
