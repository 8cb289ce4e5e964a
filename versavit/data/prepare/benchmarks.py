"""The benchmark sources of `versavit data prepare` (placeholder: being written)."""

from versavit.data.prepare.base import Source

BENCHMARK_SOURCES: list[Source] = []
