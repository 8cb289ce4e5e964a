"""Heads of the paper's size (issue 14, item 4): configs/paper.yaml's DPT head, projector and referring-segmentation
head within 5% of the paper's 37.0M / 35.0M / 4.8M, built on the meta device (no memory, no weights).

The paper counts M = 2^20 parameters: its ViT-H "644.5M" is exactly Qwen2-VL-7B's visual module (tower + merger,
675.8M) in those units, checked below. Every head is also within 5% of the figure read as 10^6."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from versavit.config import load_config
from versavit.models.heads.caption import Projector
from versavit.models.heads.depth import DepthHead
from versavit.models.heads.refseg import RefSegHead

# one worker runs the module (make test: xdist), so its module fixtures are built once
pytestmark = pytest.mark.xdist_group("head_sizes")

ROOT = Path(__file__).resolve().parents[2]
MI = 2**20
QWEN3_1_7B_HIDDEN = 2048  # Qwen/Qwen3-1.7B config.json hidden_size: the projector's output
QWEN2_VL_7B_LLM_HIDDEN = 3584  # Qwen/Qwen2-VL-7B-Instruct: its merger's output
PAPER = {"depth": 37.0, "projector": 35.0, "refseg": 4.8}  # RECIPE.md, in the paper's M


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_heads() -> dict[str, int]:
    cfg = load_config(ROOT / "configs/paper.yaml", [])
    heads, dim = cfg.model.heads, cfg.model.backbone.embed_dim
    layers = len(heads.depth.layers or [0, 0, 0])  # three uniformly spaced layers by default
    with torch.device("meta"):
        return {"depth": _count(DepthHead(heads.depth, embed_dim=dim, num_layers=layers)),
                "projector": _count(Projector(4 * dim, heads.caption.projector_hidden, QWEN3_1_7B_HIDDEN)),
                "refseg": _count(RefSegHead(heads.refseg, embed_dim=dim))}


def test_the_paper_counts_in_units_of_2_to_the_20() -> None:
    cfg = load_config(ROOT / "configs/paper.yaml", [])
    b = cfg.model.backbone
    vision = Qwen2VLVisionConfig(depth=b.depth, embed_dim=b.embed_dim, num_heads=b.num_heads,
                                 mlp_ratio=int(b.mlp_ratio), hidden_size=QWEN2_VL_7B_LLM_HIDDEN)
    with torch.device("meta"):
        n = _count(Qwen2VisionTransformerPretrainedModel._from_config(vision))
    assert n == 675_759_104
    assert round(n / MI, 1) == 644.5  # RECIPE.md: "644.5 M"


@pytest.mark.parametrize("head", sorted(PAPER))
def test_paper_size_heads_match_the_paper(paper_heads: dict[str, int], head: str) -> None:
    n, paper = paper_heads[head], PAPER[head]
    print(f"{head}: {n} = {n / 1e6:.2f}M = {n / MI:.2f} x 2^20 (paper {paper}M)")
    assert abs(n / MI / paper - 1) <= 0.05, (head, n / MI, paper)
    assert abs(n / 1e6 / paper - 1) <= 0.05, (head, n / 1e6, paper)


def test_tiny_heads_stay_tiny() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", [])
    heads, dim = cfg.model.heads, cfg.model.backbone.embed_dim
    with torch.device("meta"):
        sizes = [_count(DepthHead(heads.depth, embed_dim=dim, num_layers=3)),
                 _count(Projector(4 * dim, heads.caption.projector_hidden, heads.caption.tiny_llm_hidden)),
                 _count(RefSegHead(heads.refseg, embed_dim=dim))]
    assert max(sizes) < 500_000, sizes
