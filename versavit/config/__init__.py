"""Typed run configuration (pydantic v2): YAML files plus dotted command-line overrides."""

from versavit.config.loader import (
    ConfigError,
    apply_overrides,
    config_hash,
    config_to_dict,
    dump_yaml,
    load_config,
    load_config_text,
)
from versavit.config.schema import BENCHMARK_NAMES, TASKS, RunConfig

__all__ = [
    "BENCHMARK_NAMES",
    "TASKS",
    "ConfigError",
    "RunConfig",
    "apply_overrides",
    "config_hash",
    "config_to_dict",
    "dump_yaml",
    "load_config",
    "load_config_text",
]
