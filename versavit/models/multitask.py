"""The assembled VersaViT model: one backbone, a head per task, a loss per task.

`forward(task, batch)` runs exactly one task (the trainer cycles tasks per micro-step, the same
task on every rank), so only that task's head sees gradients in that micro-step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from versavit.config.schema import TASKS, LossWeights, ModelConfig
from versavit.losses import DepthLoss, SegmentationLoss
from versavit.models.backbone import VisionBackbone
from versavit.models.heads.caption import CaptionHead
from versavit.models.heads.depth import DepthHead
from versavit.models.heads.refseg import RefSegHead


class VersaViT(nn.Module):
    def __init__(self, backbone: VisionBackbone, heads: dict[str, nn.Module], depth_layers: list[int],
                 weights: LossWeights | None = None, depth_target: str = "depth"):
        super().__init__()
        self.depth_target = depth_target  # the space the depth head is trained in: depth or disparity
        weights = weights or LossWeights()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.depth_layers = list(depth_layers)
        self.depth_loss = DepthLoss(weights.depth_ssi, weights.depth_gm, weights.gm_scales)
        self.seg_loss = SegmentationLoss(weights.seg_bce, weights.seg_dice)

    @classmethod
    def build(cls, cfg: ModelConfig, tasks: list[str] | tuple[str, ...] = TASKS, weights: LossWeights | None = None,
              dtype: torch.dtype = torch.float32) -> VersaViT:
        """Backbone (random or pretrained) plus the heads of `tasks`, sizes from the config."""
        backbone = VisionBackbone.build(cfg.backbone, dtype=dtype)
        backbone.set_gradient_checkpointing(cfg.backbone.gradient_checkpointing)
        dim = backbone.embed_dim
        heads: dict[str, nn.Module] = {}
        layers = cfg.heads.depth.layers or backbone.uniform_layers(3)
        bad = [layer for layer in layers if not 1 <= layer <= backbone.depth]
        if bad:
            raise ValueError(f"model.heads.depth.layers {bad} outside 1..{backbone.depth}")
        if "caption" in tasks:
            heads["caption"] = CaptionHead.build(cfg.heads.caption, vision_dim=dim, dtype=dtype)
        if "depth" in tasks:
            heads["depth"] = DepthHead(cfg.heads.depth, embed_dim=dim, num_layers=len(layers)).to(dtype)
        if "refseg" in tasks:
            heads["refseg"] = RefSegHead(cfg.heads.refseg, embed_dim=dim).to(dtype)
        return cls(backbone, heads, layers, weights, depth_target=cfg.heads.depth.target)

    # ---------------------------------------------------------------- parameter sets
    def backbone_group(self) -> list[nn.Parameter]:
        """ViT + caption projector + LLM: trained at lr_backbone (1e-5 in the paper)."""
        params = list(self.backbone.parameters())
        if "caption" in self.heads:
            params += list(self.heads["caption"].parameters())
        return params

    def heads_group(self) -> list[nn.Parameter]:
        """Dense heads (depth, referring segmentation): trained at lr_heads (1e-4)."""
        return [p for name, head in self.heads.items() if name != "caption" for p in head.parameters()]

    def freeze_for_warmup(self) -> list[nn.Parameter]:
        """Caption warm-up: only the projector trains (ViT and LLM frozen). Returns the trainable set."""
        if "caption" not in self.heads:
            raise ValueError("the warm-up stage needs the caption head")
        for p in self.parameters():
            p.requires_grad_(False)
        projector = list(self.heads["caption"].projector_parameters())
        for p in projector:
            p.requires_grad_(True)
        return projector

    # ---------------------------------------------------------------------- forward
    def forward(self, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        dtype = self.backbone.dtype
        if task == "caption":
            images = [im.to(dtype) for im in batch["image"]] if isinstance(batch["image"], list) \
                else list(batch["image"].to(dtype))
            out = self.backbone(images, merged=True)
            res = self.heads["caption"](out.merged, batch["question"], batch["answer"])
            return res.loss, {"answer_tokens": float(res.num_answer_tokens)}
        images = batch["image"].to(dtype)
        size = tuple(images.shape[-2:])
        if task == "depth":
            out = self.backbone(images, layers=self.depth_layers)
            pred = self.heads["depth"]([out.layers[layer] for layer in self.depth_layers], size)
            return self.depth_loss(pred, batch["target"], batch["valid"])
        if task == "refseg":
            out = self.backbone(images)
            logits = self.heads["refseg"](out.maps, batch["text_embedding"].to(dtype), size)
            return self.seg_loss(logits, batch["mask"])
        raise ValueError(f"unknown task {task!r}; expected one of {list(self.heads)}")

    # ----------------------------------------------------------------------- export
    def save_pretrained(self, path: str) -> None:
        """backbone/ (Hugging Face format, loadable by VisionBackbone.from_pretrained) + one folder per head."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(root / "backbone"))
        for name, head in self.heads.items():
            if name == "caption":
                head.save_pretrained(str(root / "caption"))
            else:
                (root / name).mkdir(exist_ok=True)
                torch.save(head.state_dict(), root / name / "head.pt")
        (root / "versavit.json").write_text(json.dumps({"heads": list(self.heads), "depth_layers": self.depth_layers,
                                                        "depth_target": self.depth_target}))

    @classmethod
    def from_export(cls, path: str, cfg: ModelConfig, heads: list[str] | None = None,
                    dtype: torch.dtype = torch.float32) -> VersaViT:
        """Load what `save_pretrained` wrote (a local folder): the backbone and the requested heads.

        Head sizes come from `cfg` (the run's model config); the export records which heads exist.
        """
        root = Path(path)
        meta_path = root / "versavit.json"
        if not meta_path.is_file():
            raise ValueError(f"{path} is not a versavit export (no versavit.json); point at <stage>/export")
        meta = json.loads(meta_path.read_text())
        wanted = meta["heads"] if heads is None else heads
        missing = [h for h in wanted if h not in meta["heads"]]
        if missing:
            raise ValueError(f"export {path} has no {missing} head(s); it has {meta['heads']}")
        backbone = VisionBackbone.from_pretrained(str(root / "backbone"), dtype=dtype)
        layers = meta["depth_layers"]
        built: dict[str, nn.Module] = {}
        for name in wanted:
            if name == "caption":
                built[name] = CaptionHead.from_pretrained(str(root / "caption"))
                continue
            head = DepthHead(cfg.heads.depth, embed_dim=backbone.embed_dim, num_layers=len(layers)) \
                if name == "depth" else RefSegHead(cfg.heads.refseg, embed_dim=backbone.embed_dim)
            head.load_state_dict(torch.load(root / name / "head.pt", map_location="cpu", weights_only=True))
            built[name] = head.to(dtype)
        return cls(backbone, built, layers, depth_target=meta.get("depth_target", cfg.heads.depth.target))
