"""Gradient checkpointing of a transformers model, one switch for every tower and LLM versavit trains."""

from __future__ import annotations

from torch import nn


def set_hf_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute the layers' activations in backward (training mode only) instead of keeping them.

    Non-reentrant, so it works when the inputs do not require grad and with frozen parts (a frozen LLM the
    projector's gradient runs through). transformers >= 5 renamed gradient_* to activation_checkpointing_* (the
    old names warn); the old ones are the fallback."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - transformers 4.x
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # pragma: no cover - transformers 4.x
        model.gradient_checkpointing_disable()
