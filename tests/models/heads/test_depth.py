"""Depth head: shapes, gradients to every layer map, and that a tiny head can fit a fixed target."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from versavit.config.schema import DepthHeadConfig  # noqa: E402
from versavit.models.heads.depth import DepthHead, depth_anything_config  # noqa: E402

EMBED = 24


def _head(num_layers: int = 3, features: int = 16) -> DepthHead:
    torch.manual_seed(0)
    return DepthHead(DepthHeadConfig(features=features), embed_dim=EMBED, num_layers=num_layers)


@pytest.mark.parametrize(("grid", "out_size"), [((4, 4), (56, 56)), ((4, 6), (56, 84)), ((6, 4), (84, 56)),
                                                ((4, 6), (50, 70))])
def test_shapes_square_and_non_square(grid: tuple[int, int], out_size: tuple[int, int]) -> None:
    head = _head()
    feats = [torch.randn(2, EMBED, *grid) for _ in range(3)]
    out = head(feats, out_size)
    assert out.shape == (2, *out_size)
    assert (out >= 0).all(), "depth/disparity output must be non-negative"


def test_gradient_reaches_every_map() -> None:
    head = _head()
    feats = [torch.randn(1, EMBED, 4, 6, requires_grad=True) for _ in range(3)]
    head(feats, (56, 84)).square().mean().backward()
    for i, f in enumerate(feats):
        assert f.grad is not None and f.grad.abs().sum() > 0, f"no gradient to map {i}"
    assert all(p.grad is not None for p in head.parameters())


def test_wrong_number_of_maps_and_mismatched_sizes() -> None:
    head = _head()
    with pytest.raises(ValueError, match="expects 3"):
        head([torch.randn(1, EMBED, 4, 4)] * 2, (56, 56))
    with pytest.raises(ValueError, match="1 to 4"):
        DepthHead(DepthHeadConfig(features=16), embed_dim=EMBED, num_layers=5)
    with pytest.raises(ValueError, match="differ"):
        head([torch.randn(1, EMBED, 4, 4), torch.randn(1, EMBED, 4, 4), torch.randn(1, EMBED, 4, 6)], (56, 56))


def test_config_follows_depth_anything_large() -> None:
    cfg = depth_anything_config(DepthHeadConfig(features=256), 1280, 4)
    assert list(cfg.neck_hidden_sizes) == [256, 512, 1024, 1024]
    assert list(cfg.reassemble_factors) == [4, 2, 1, 0.5]
    three = depth_anything_config(DepthHeadConfig(features=256), 1280, 3)
    assert list(three.neck_hidden_sizes) == [256, 512, 1024] and list(three.reassemble_factors) == [4, 2, 1]
    out = _head(num_layers=4)([torch.randn(1, EMBED, 4, 6) for _ in range(4)], (56, 84))  # 4 maps work too
    assert out.shape == (1, 56, 84)


def test_fits_fixed_target() -> None:
    head = _head()
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, EMBED, 2, 3, generator=gen) for _ in range(3)]
    # Smooth non-negative target (random 5x7 field upsampled), like a disparity map.
    target = F.interpolate(torch.rand(2, 1, 5, 7, generator=gen), size=(28, 42), mode="bilinear")[:, 0]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(head(feats, (28, 42)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses
