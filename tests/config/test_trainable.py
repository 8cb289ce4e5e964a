"""Trainable parameter patterns: globs, ViT block slices, shortcuts, exclusions, typos caught."""

from __future__ import annotations

import pytest

from versavit.config.trainable import check_pattern, select

NAMES = [
    "backbone.tower.patch_embed.proj.weight",
    *[f"backbone.tower.blocks.{i}.{p}" for i in range(4) for p in ("attn.qkv.weight", "mlp.fc1.weight")],
    "backbone.tower.merger.mlp.0.weight",
    "heads.caption.projector.fc1.weight",
    "heads.caption.llm.model.embed_tokens.weight",
    "heads.depth.head.conv1.weight",
]


def blocks(*idx: int, part: str = "") -> set[str]:
    return {n for n in NAMES for i in idx if n.startswith(f"backbone.tower.blocks.{i}.{part}")}


def test_top_k_blocks_and_shortcuts() -> None:
    assert select(["backbone.blocks[-2:]"], NAMES, 4) == blocks(2, 3)
    assert select(["backbone.blocks[0]"], NAMES, 4) == blocks(0)
    assert select(["backbone.blocks[1:3].attn.*"], NAMES, 4) == blocks(1, 2, part="attn")
    assert select(["projector"], NAMES, 4) == {"heads.caption.projector.fc1.weight"}
    assert select(["llm"], NAMES, 4) == {"heads.caption.llm.model.embed_tokens.weight"}


def test_merger_never_trains_and_exclusions_apply() -> None:
    everything = select(["*"], NAMES, 4)
    assert "backbone.tower.merger.mlp.0.weight" not in everything
    assert everything == set(NAMES) - {"backbone.tower.merger.mlp.0.weight"}
    vit = select(["vit"], NAMES, 4)
    assert vit == {n for n in NAMES if n.startswith("backbone.") and "merger" not in n}
    assert select(["*", "!llm", "!heads.depth.*"], NAMES, 4) == vit | {"heads.caption.projector.fc1.weight"}


@pytest.mark.parametrize("pattern", ["heads.dpeth.*", "backbone.blocks[7:]", "!nothing.*"])
def test_a_pattern_that_selects_nothing_is_an_error(pattern: str) -> None:
    with pytest.raises(ValueError, match="selects no parameter"):
        select(["*", pattern], NAMES, 4)


@pytest.mark.parametrize("pattern", ["backbone.blocks[a:]", "backbone.blocks[-2:]attn", "", "!"])
def test_bad_syntax(pattern: str) -> None:
    with pytest.raises(ValueError):
        check_pattern(pattern)


def test_an_index_outside_the_vit_is_an_error() -> None:
    with pytest.raises(ValueError, match="4 blocks"):
        select(["backbone.blocks[4]"], NAMES, 4)
