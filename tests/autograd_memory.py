"""What autograd keeps for backward, measured independently of versavit.train.trace (the tests compare the two)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def saved_bytes(model: torch.nn.Module, fn: Callable[[], Any]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())
