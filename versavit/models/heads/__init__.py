"""The three task heads on the ViT: caption/VQA (projector + LLM), depth (DPT), referring segmentation (SAM)."""

from versavit.models.heads.caption import CAPTION_INSTRUCTION, CaptionHead, CaptionOutput, Projector
from versavit.models.heads.depth import DepthHead
from versavit.models.heads.refseg import RefSegHead

__all__ = ["CAPTION_INSTRUCTION", "CaptionHead", "CaptionOutput", "DepthHead", "Projector", "RefSegHead"]
