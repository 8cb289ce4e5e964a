"""The MLLM of the VQA evaluation: a frozen vision backbone, then the caption head's projector and causal LM.

The language side is versavit's caption head (versavit.models.heads.caption.CaptionHead: the 2x2-merge MLP
projector, the Qwen chat-template prompt with the projected visual tokens in place of <|image_pad|>, the answer-only
cross-entropy and greedy generation), built fresh: `CaptionHead.build` from `model.heads.caption` with the LLM of
`eval.vqa.llm` (paper: Qwen/Qwen3-8B) or, without one, the caption head's own LLM (`model.heads.caption.llm`; None in
the tiny configuration: a tiny random Qwen3 with the tiny tokenizer). The backbone is never trained: its parameters
are frozen, it stays in eval mode and runs without autograd; only its final-layer 2x2 merge units reach the
projector (`VisionBackbone.forward(images, merged=True)`).

Saved as a versavit export with a caption head (`VersaViT.save_pretrained`: backbone/, caption/{projector, llm,
tokenizer}, versavit.json) plus `vqa.json` (image sizes, generation length, where the backbone came from), so that
`VqaModel.load` (and the lmms-eval adapter) restore exactly the model that was scored.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from versavit.eval.vqa.data import vqa_image
from versavit.models.heads.caption import IGNORE_INDEX, CaptionHead, CaptionOutput

META_FILE = "vqa.json"


class VqaModel(nn.Module):
    """Frozen backbone + caption head (projector + LLM); images go in as [H, W, 3] uint8 arrays."""

    def __init__(self, backbone: nn.Module, head: CaptionHead, min_side: int, max_side: int,
                 max_new_tokens: int = 16) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.head = head
        self.min_side, self.max_side = int(min_side), int(max_side)
        self.max_new_tokens = int(max_new_tokens)
        self.cache_limit = 0
        self._cache: dict[tuple, torch.Tensor] = {}
        self.backbone.eval()

    def train(self, mode: bool = True) -> VqaModel:
        """Training mode for the head only: the frozen backbone always runs as it is evaluated."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.head.projector.fc1.weight.device

    @property
    def factor(self) -> int:
        """Image sides are multiples of this: the backbone's patch x merge (28; 32 for SigLIP2)."""
        return int(self.backbone.patch_size * self.backbone.merge_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        # bf16 on a GPU that has it (an 8B LLM); fp32 on the CPU
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def cache_features(self, limit: int) -> None:
        """Keep the visual features of up to `limit` images (0: none, and forget those kept): the backbone is
        frozen, so an image seen again (the next epoch, another question about it) gives the same features."""
        self.cache_limit = int(limit)
        if not limit:
            self._cache.clear()

    @staticmethod
    def _image_key(image: np.ndarray) -> tuple[tuple[int, ...], int, int]:
        # the pixels' own digest: sample keys of two datasets may coincide, their images not
        a = np.ascontiguousarray(image)
        return a.shape, zlib.crc32(a.tobytes()), zlib.adler32(a.tobytes())

    @torch.no_grad()
    def visual(self, images: Sequence[np.ndarray | None]) -> list[torch.Tensor]:
        """Per image its 2x2 merge units [n_i, 4D] (fp32, no autograd: the backbone is frozen); None (a question
        without an image) gives no visual token."""
        keys = [self._image_key(im) if self.cache_limit and im is not None else None for im in images]
        todo = [i for i, (im, k) in enumerate(zip(images, keys, strict=True))
                if im is not None and (k is None or k not in self._cache)]
        found: dict[int, torch.Tensor] = {i: torch.zeros(0, self.head.projector.fc1.in_features, device=self.device)
                                          for i, im in enumerate(images) if im is None}
        if todo:
            tensors = [vqa_image(np.asarray(images[i]), self.min_side, self.max_side, self.factor).to(self.device)
                       for i in todo]
            dtype = next(self.backbone.parameters()).dtype
            with self._autocast():
                merged = self.backbone([t.to(dtype) for t in tensors], merged=True).merged
            for i, m in zip(todo, merged, strict=True):
                found[i] = m.float()
                if keys[i] is not None and len(self._cache) < self.cache_limit:
                    self._cache[keys[i]] = found[i].cpu()  # host memory: a GPU's is the LLM's
        return [found[i] if i in found else self._cache[keys[i]].to(self.device) for i in range(len(images))]

    def loss(self, images: Sequence[np.ndarray], questions: Sequence[str], answers: Sequence[str]) -> CaptionOutput:
        """The caption head's answer-token cross-entropy on one batch."""
        visual = self.visual(images)
        with self._autocast():
            return self.head(visual, list(questions), list(answers))

    @torch.no_grad()
    def answer(self, images: Sequence[np.ndarray | None], questions: Sequence[str],
               max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers, one per (image, question)."""
        visual = self.visual(images)
        with self._autocast():
            return self.head.generate(visual, list(questions), max_new_tokens or self.max_new_tokens)

    @torch.no_grad()
    def loglikelihood(self, image: np.ndarray | None, context: str, continuation: str) -> tuple[float, bool]:
        """log p(continuation | image, context) summed over the continuation's tokens, and whether greedy decoding
        would produce exactly those tokens (lmms-eval's `loglikelihood` contract)."""
        visual = self.visual([image])
        with self._autocast():
            out = self.head(visual, [context], [continuation], return_logits=True)
        assert out.logits is not None and out.labels is not None
        labels, logits = out.labels[0], out.logits[0].float()
        # logits[t] predicts labels[t + 1]; the last supervised token is the closing <|im_end|>, not the continuation
        positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()[:-1]
        if positions.numel() == 0:
            return 0.0, True
        targets = labels[positions + 1]
        logp = F.log_softmax(logits[positions], dim=-1).gather(-1, targets[:, None]).sum()
        greedy = bool((logits[positions].argmax(-1) == targets).all())
        return float(logp), greedy

    # ------------------------------------------------------------------------------------------
    # persistence

    def save(self, path: str | Path, **meta: Any) -> Path:
        """Write the model as a versavit export with a caption head, plus vqa.json (sizes and `meta`)."""
        from versavit.models.multitask import VersaViT

        root = Path(path)
        VersaViT(self.backbone, {"caption": self.head}, depth_layers=[]).save_pretrained(str(root))
        doc = {"min_side": self.min_side, "max_side": self.max_side, "max_new_tokens": self.max_new_tokens, **meta}
        (root / META_FILE).write_text(json.dumps(doc, indent=1))
        return root

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> VqaModel:
        """A model written by `save`, in eval mode on `device`."""
        from versavit.config.schema import ModelConfig
        from versavit.models.multitask import VersaViT

        root = Path(path)
        if not (root / META_FILE).is_file():
            raise ValueError(f"{str(root)!r} is not a saved VQA model (no {META_FILE}); the vqa evaluator writes "
                             "one per backbone under <out_dir>/vqa/<benchmark>-<backbone>/model")
        meta = json.loads((root / META_FILE).read_text())
        # head sizes of the export come from its own files; ModelConfig() only fills the dense heads, not loaded
        export = VersaViT.from_export(str(root), ModelConfig(), heads=["caption"])
        model = cls(export.backbone, export.heads["caption"], meta["min_side"], meta["max_side"],
                    meta.get("max_new_tokens", 16))
        return model.to(device).eval()


__all__ = ["META_FILE", "VqaModel"]
