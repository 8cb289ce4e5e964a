"""The assembled VersaViT model: one backbone, a head per task, a loss per task.

`forward(task, batch)` runs exactly one task (the trainer cycles tasks per micro-step, the same
task on every rank), so only that task's head sees gradients in that micro-step. What trains is
data: `set_trainable(patterns)` (versavit.config.trainable) freezes everything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from versavit.config import trainable
from versavit.config.schema import TASKS, WARMUP_TRAINABLE, LossConfig, ModelConfig, SynergyConfig
from versavit.losses import DepthLoss, SegmentationLoss
from versavit.models.backbone import VisionBackbone
from versavit.models.heads.caption import CaptionHead
from versavit.models.heads.depth import DepthHead
from versavit.models.heads.refseg import RefSegHead
from versavit.models.synergy import SynergyModule

HEADS_GROUP_PREFIXES = ("heads.depth.", "heads.refseg.", "synergy.")  # trained at lr_heads; the rest at lr_backbone


class VersaViT(nn.Module):
    def __init__(self, backbone: VisionBackbone, heads: dict[str, nn.Module], depth_layers: list[int],
                 loss: LossConfig | None = None, depth_target: str = "depth",
                 synergy: SynergyModule | None = None, synergy_weight: float = 0.0):
        super().__init__()
        self.depth_target = depth_target  # the space the depth head is trained in: depth or disparity
        loss = loss or LossConfig()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.depth_layers = list(depth_layers)
        self.depth_loss = DepthLoss(loss.depth_ssi, loss.depth_gm, loss.gm_scales)
        self.seg_loss = SegmentationLoss(loss.seg_bce, loss.seg_dice)
        self.synergy = synergy  # optional cross-task regulariser (training only, never exported)
        self.synergy_weight = synergy_weight

    @classmethod
    def build(cls, cfg: ModelConfig, tasks: list[str] | tuple[str, ...] = TASKS, loss: LossConfig | None = None,
              dtype: torch.dtype = torch.float32, synergy: SynergyConfig | None = None) -> VersaViT:
        """Backbone (random or pretrained) plus the heads of `tasks`, sizes from the config; the synergy
        module when `synergy.enabled` (built last, so the other tensors' init does not depend on it)."""
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
        module = None
        if synergy is not None and synergy.enabled:
            module = SynergyModule(dim, [t for t in TASKS if t in tasks], synergy).to(dtype)
        return cls(backbone, heads, layers, loss, depth_target=cfg.heads.depth.target, synergy=module,
                   synergy_weight=synergy.weight if module is not None else 0.0)

    def prepare_training(self, cfg: ModelConfig) -> VersaViT:
        """Gradient checkpointing as `cfg` asks (ViT blocks: model.backbone.gradient_checkpointing; caption LLM
        layers: model.heads.caption.gradient_checkpointing) and training mode for every module, whatever path
        loaded it (from_pretrained returns eval mode, where transformers never checkpoints).

        Frozen modules train too: gradients still flow through a frozen LLM to the warm-up's projector, and only
        a module in training mode recomputes instead of keeping its activations. Nothing in the model behaves
        differently in training mode otherwise (dropout rates 0, no batch norm)."""
        self.backbone.set_gradient_checkpointing(cfg.backbone.gradient_checkpointing)
        if "caption" in self.heads:
            self.heads["caption"].set_gradient_checkpointing(cfg.heads.caption.gradient_checkpointing)
        return self.train()

    # ---------------------------------------------------------------- parameter sets
    @staticmethod
    def group_of(name: str) -> str:
        """Optimiser group of a parameter: "heads" (dense heads, synergy module: lr_heads, 1e-4 in the paper)
        or "backbone" (ViT, caption projector, LLM: lr_backbone, 1e-5)."""
        return "heads" if name.startswith(HEADS_GROUP_PREFIXES) else "backbone"

    def backbone_group(self) -> list[nn.Parameter]:
        """ViT + caption projector + LLM: trained at lr_backbone (1e-5 in the paper)."""
        return [p for n, p in self.named_parameters() if self.group_of(n) == "backbone"]

    def heads_group(self) -> list[nn.Parameter]:
        """Dense heads (depth, referring segmentation) and the synergy module: trained at lr_heads (1e-4)."""
        return [p for n, p in self.named_parameters() if self.group_of(n) == "heads"]

    def set_trainable(self, patterns: list[str]) -> dict[str, list[nn.Parameter]]:
        """Train exactly what `patterns` select (versavit.config.trainable), freeze the rest.

        The synergy module, when present, always trains: a frozen random discriminator would be noise.
        Returns the trainable parameters by optimiser group ({"backbone": [...], "heads": [...]}).
        """
        names = [n for n, _ in self.named_parameters()]
        chosen = trainable.select(patterns, names, self.backbone.depth)
        chosen |= {n for n in names if n.startswith("synergy.")}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "heads": []}
        for name, p in self.named_parameters():
            p.requires_grad_(name in chosen)
            if name in chosen:
                groups[self.group_of(name)].append(p)
        return groups

    def freeze_for_warmup(self) -> list[nn.Parameter]:
        """VersaViT's warm-up set: only the projector trains (ViT and LLM frozen). Returns the trainable set."""
        if "caption" not in self.heads:
            raise ValueError("the warm-up stage needs the caption head")
        return [p for ps in self.set_trainable(WARMUP_TRAINABLE).values() for p in ps]

    # ---------------------------------------------------------------------- forward
    def forward(self, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise for one task's batch, and floats to log (the task's loss terms).

        With the synergy module the loss is `task loss + synergy_weight * synergy loss`; the task loss alone
        is then in parts["task_loss"] and the module's terms under "synergy/...".
        """
        loss, parts, pooled = self._task_forward(task, batch)
        if self.synergy is None:
            return loss, parts
        syn, syn_parts = self.synergy(pooled, task)
        return loss + self.synergy_weight * syn, {**parts, **syn_parts, "task_loss": float(loss.detach())}

    def _task_forward(self, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float], Any]:
        """(loss, parts, pooled final-layer features [B, D] or None when no synergy module needs them)."""
        dtype = self.backbone.dtype
        pool = self.synergy is not None
        if task == "caption":
            images = [im.to(dtype) for im in batch["image"]] if isinstance(batch["image"], list) \
                else list(batch["image"].to(dtype))
            out = self.backbone(images, merged=True)
            res = self.heads["caption"](out.merged, batch["question"], batch["answer"])
            # a merge unit is 4 final-layer patch vectors side by side: back to [4n, D] before the mean
            pooled = torch.stack([m.reshape(-1, self.backbone.embed_dim).mean(0) for m in out.merged]) \
                if pool else None
            return res.loss, {"answer_tokens": float(res.num_answer_tokens)}, pooled
        images = batch["image"].to(dtype)
        size = tuple(images.shape[-2:])
        if task == "depth":
            out = self.backbone(images, layers=self.depth_layers)
            pred = self.heads["depth"]([out.layers[layer] for layer in self.depth_layers], size)
            loss, parts = self.depth_loss(pred, batch["target"], batch["valid"])
        elif task == "refseg":
            out = self.backbone(images)
            logits = self.heads["refseg"](out.maps, batch["text_embedding"].to(dtype), size)
            loss, parts = self.seg_loss(logits, batch["mask"])
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {list(self.heads)}")
        return loss, parts, out.maps.mean(dim=(-2, -1)) if pool else None

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
