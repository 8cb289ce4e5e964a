"""Where and in what precision a teacher runs, and how its weights are found.

Every teacher loads with `from_pretrained(path_or_hub_id)`, so a real run (hub id, or a folder
mirrored into the cluster) and a test (a tiny random model saved to a temp dir) take one path. A run with
`weights.url` set passes staged URLs (`versavit.weights.resolve`); each teacher turns its ref into a local
folder with `versavit.weights.local_model_path` first (an s3:// checkpoint is copied once per node).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> the GPU when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"labeling.device={device!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


def inference_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """bf16 on GPUs that support it, fp32 otherwise.

    CPUs are left at fp32 under "auto": bf16 matmuls are only fast on CPUs with AMX/avx512_bf16,
    and a slower teacher is the wrong default on the 2-core machines the tiny config targets.
    """
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if dtype in ("fp32", "float32"):
        return torch.float32
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, bf16 or fp32")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + size]


def load_failed(what: str, model_id: str, exc: BaseException) -> RuntimeError:
    """One message that names the teacher, the id and what to check (offline machines mostly)."""
    return RuntimeError(
        f"could not load the {what} teacher {model_id!r}: {exc.__class__.__name__}: {exc}. Pass a local folder "
        "(save_pretrained layout), a hub id reachable from this machine (HF_HUB_OFFLINE / HF_HOME), or stage it "
        "once with `versavit weights stage` (weights.url)."
    )
