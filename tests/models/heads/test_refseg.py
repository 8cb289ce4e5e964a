"""Referring-segmentation head: shapes, positional encoding, text conditioning, learning to select by text."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from versavit.config.schema import RefSegHeadConfig  # noqa: E402
from versavit.models.heads.refseg import PositionEmbeddingRandom, RefSegHead  # noqa: E402

EMBED, TEXT = 16, 16
TINY = RefSegHeadConfig(text_dim=TEXT, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _head(cfg: RefSegHeadConfig = TINY) -> RefSegHead:
    torch.manual_seed(0)
    return RefSegHead(cfg, embed_dim=EMBED)


@pytest.mark.parametrize(("grid", "out_size"), [((4, 4), (56, 56)), ((4, 6), (56, 84)), ((6, 3), (84, 42)),
                                                ((4, 6), (30, 40))])
def test_shapes_square_and_non_square(grid: tuple[int, int], out_size: tuple[int, int]) -> None:
    out = _head()(torch.randn(2, EMBED, *grid), torch.randn(2, TEXT), out_size)
    assert out.shape == (2, *out_size)
    assert torch.isfinite(out).all()


def test_positional_encoding_non_square_and_fixed() -> None:
    pe = PositionEmbeddingRandom(8)
    enc = pe((3, 5))
    assert enc.shape == (16, 3, 5)
    # Same basis on every build (ranks agree without a broadcast), saved with the weights.
    assert torch.equal(enc, PositionEmbeddingRandom(8)((3, 5)))
    assert "gaussian" in pe.state_dict()
    # Cells of one grid are distinct; both axes share one scale (longer side), so the top-left 3x3 block of
    # a 3x5 grid differs from a 3x3 grid's encoding, while a 5x5 grid's top-left 3x5 block matches it.
    flat = enc.flatten(1).T
    assert torch.cdist(flat, flat).add(torch.eye(15) * 1e3).min() > 1e-3
    assert torch.allclose(pe((5, 5))[:, :3, :], enc, atol=1e-6)


def test_text_changes_mask() -> None:
    head = _head()
    fmap = torch.randn(1, EMBED, 4, 6)
    a = head(fmap, torch.randn(1, TEXT), (56, 84))
    b = head(fmap, torch.randn(1, TEXT), (56, 84))
    assert not torch.allclose(a, b, atol=1e-4)


def test_bad_text_shape_and_sizes() -> None:
    head = _head()
    with pytest.raises(ValueError, match="text_embedding"):
        head(torch.randn(2, EMBED, 4, 4), torch.randn(2, TEXT + 1), (56, 56))
    with pytest.raises(ValueError, match="divisible by 8"):
        RefSegHead(RefSegHeadConfig(text_dim=TEXT, decoder_dim=36, decoder_heads=2), embed_dim=EMBED)
    with pytest.raises(ValueError, match="decoder_heads"):
        RefSegHead(RefSegHeadConfig(text_dim=TEXT, decoder_dim=32, decoder_heads=3), embed_dim=EMBED)


def test_every_parameter_trains() -> None:
    head = _head()
    fmap = torch.randn(2, EMBED, 4, 6, requires_grad=True)
    head(fmap, torch.randn(2, TEXT), (56, 84)).sigmoid().mean().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert fmap.grad.abs().sum() > 0


GRID = 8


def _two_object_batch(n: int, gen: torch.Generator, signatures: torch.Tensor, texts: torch.Tensor):
    """Noise maps with two 3x3 objects (left and right half, random rows) carrying signature 0 and 1 in random
    sides; the text vector picks which object is the target mask."""
    fmap = torch.randn(n, EMBED, GRID, GRID, generator=gen) * 0.5
    masks = torch.zeros(n, 2, GRID, GRID)
    for b in range(n):
        rows = torch.randint(0, GRID - 2, (2,), generator=gen).tolist()
        cols = [int(torch.randint(0, GRID // 2 - 2, (1,), generator=gen)),
                GRID // 2 + int(torch.randint(0, GRID // 2 - 2, (1,), generator=gen))]
        order = torch.randperm(2, generator=gen).tolist()
        for obj, (r, c) in zip(order, zip(rows, cols, strict=True), strict=True):
            masks[b, obj, r:r + 3, c:c + 3] = 1
    fmap = fmap + torch.einsum("bkhw,kd->bdhw", masks, signatures)
    which = torch.randint(0, 2, (n,), generator=gen)
    return fmap, which, masks


def test_learns_to_select_object_by_text() -> None:
    head = _head()
    gen = torch.Generator().manual_seed(1)
    signatures, texts = torch.randn(2, EMBED, generator=gen) * 2, torch.randn(2, TEXT, generator=gen)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    out = (2 * GRID, 2 * GRID)
    losses = []
    for _ in range(150):
        fmap, which, masks = _two_object_batch(8, gen, signatures, texts)
        target = F.interpolate(masks[torch.arange(8), which][:, None], size=out)[:, 0]
        loss = F.binary_cross_entropy_with_logits(head(fmap, texts[which], out), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 / 4, losses

    # Held-out scenes: each text picks its own object (ignoring the text, IoU would be <= 0.5).
    fmap, _, masks = _two_object_batch(32, torch.Generator().manual_seed(99), signatures, texts)
    with torch.no_grad():
        for k in range(2):
            pred = head(fmap, texts[k].expand(32, -1), (GRID, GRID)) > 0
            tgt = masks[:, k] > 0
            iou = (pred & tgt).sum() / (pred | tgt).sum()
            assert iou > 0.8, f"text {k}: IoU {iou:.2f}"
