"""The training sources of `versavit data prepare` (placeholder: being written)."""

from versavit.data.prepare.base import Source

TRAINING_SOURCES: list[Source] = []
