"""Mask teacher: SAM prompted with boxes (transformers `SamModel` + `SamProcessor`).

The image encoder (the expensive part) runs batched over images; the prompt encoder and mask
decoder then run once per image over all of its boxes. SAM returns three candidate masks per
prompt (multimask output, which resolves the whole/part ambiguity of a box); the one with the
highest predicted IoU is kept, and that score is returned with it.
"""

from __future__ import annotations

import numpy as np
import torch

from versavit.labeling.runtime import chunks, inference_dtype, load_failed, resolve_device
from versavit.weights import local_model_path


class MaskTeacher:
    """Boxes (x0, y0, x1, y1 in pixels) -> binary masks at the image size.

    >>> teacher = MaskTeacher("facebook/sam-vit-huge")
    >>> [(masks, scores)] = teacher.predict([rgb], [np.array([[10, 20, 110, 220]])])
    """

    def __init__(self, model_id: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8):
        from transformers import SamModel, SamProcessor

        self.model_id = model_id
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device, dtype)
        path = local_model_path(model_id)  # a staged s3:// checkpoint: this node's copy
        try:
            # Without torchvision, transformers picks the PIL backend of SAM's image processor.
            self.processor = SamProcessor.from_pretrained(path)
            model = SamModel.from_pretrained(path, dtype=self.dtype)
        except Exception as exc:
            raise load_failed("mask", model_id, exc) from exc
        self.model = model.to(self.device).eval()

    @property
    def signature(self) -> dict:
        return {"teacher": self.model_id, "prompt": "box", "select": "best predicted IoU of 3"}

    @torch.inference_mode()
    def predict(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image: (bool masks [n, H, W], predicted IoU [n]) for its n boxes (n may be 0)."""
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for part in chunks(list(range(len(images))), self.batch_size):
            todo = [i for i in part if len(boxes[i])]
            results = {i: (np.zeros((0, *images[i].shape[:2]), bool), np.zeros(0, np.float32)) for i in part}
            if todo:
                inputs = self.processor(images=[images[i] for i in todo], return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.device, self.dtype)
                embeddings = self.model.get_image_embeddings(pixels)
                for j, i in enumerate(todo):
                    results[i] = self._decode(embeddings[j:j + 1], np.asarray(boxes[i], np.float32),
                                              inputs["original_sizes"][j:j + 1],
                                              inputs["reshaped_input_sizes"][j:j + 1])
            out.extend(results[i] for i in part)
        return out

    def _decode(self, embedding: torch.Tensor, boxes: np.ndarray, original: torch.Tensor,
                reshaped: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        # Boxes move into the resized frame the encoder saw (what SamProcessor does for prompts).
        (h, w), (rh, rw) = original[0].tolist(), reshaped[0].tolist()
        scaled = boxes * np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
        prompt = torch.from_numpy(scaled)[None].to(self.device, self.dtype)
        result = self.model(image_embeddings=embedding, input_boxes=prompt, multimask_output=True)
        scores = result.iou_scores[0].float()  # [n, 3]
        best = scores.argmax(-1)
        logits = result.pred_masks[0].float()  # [n, 3, h', w']
        chosen = logits[torch.arange(len(best)), best][:, None]  # [n, 1, h', w']
        masks = self.processor.image_processor.post_process_masks(chosen[None].cpu(), original, reshaped)[0]
        return masks[:, 0].numpy().astype(bool), scores.gather(-1, best[:, None])[:, 0].cpu().numpy()
