"""Models: the vision backbone wrapper, one module per head, and the assembled multi-task model.

Exports are resolved lazily so that importing a light submodule (e.g. `versavit.models.tokenizer`)
does not pay for importing transformers' vision models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from versavit.models.backbone import BackboneOutput, VisionBackbone

__all__ = ["BackboneOutput", "VisionBackbone"]

_EXPORTS = {"BackboneOutput": "versavit.models.backbone", "VisionBackbone": "versavit.models.backbone"}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
