"""Model sizes small enough for tests on 2 cores (the tiny config's structure, fewer and narrower layers)."""

from __future__ import annotations

TINY_MODEL = [
    "model.backbone.embed_dim=32", "model.backbone.depth=3", "model.backbone.num_heads=2",
    "model.backbone.mlp_ratio=2.0",
    "model.heads.caption.projector_hidden=32", "model.heads.caption.tiny_llm_hidden=32",
    "model.heads.caption.tiny_llm_layers=1", "model.heads.caption.max_text_tokens=48",
    "model.heads.depth.features=16",
    "model.heads.refseg.decoder_dim=32", "model.heads.refseg.decoder_depth=1",
    "model.heads.refseg.decoder_heads=2",
    "train.resolution={caption_max: 56, caption_min: 28, depth: 56, refseg: 56}",
]
