"""YAML files + dotted command-line overrides -> a validated `RunConfig`, or one clear error."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from versavit.config.schema import RunConfig


class ConfigError(ValueError):
    """A config that cannot run. The message names the dotted path, the value and what is expected."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], VALUE parsed as YAML, so 3 is int and [a, b] a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form dotted.path=value")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override {text!r} has an empty key in its dotted path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from exc
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override into the nested dict (creating levels; pydantic judges the keys)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(keys[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a value ({child!r}), not a section")
            node = child
        node[keys[-1]] = value
    return data


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}): {exc.error_count()} problem(s)"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; `versavit config show` lists the valid keys)"
        value = err.get("input")
        shown = "" if err["type"] in ("missing",) or isinstance(value, dict) else f" = {value!r}"
        shown = re.sub(r"(\w+://)[^/@\s'\"]+@", r"\1***@", shown)  # never echo credentials
        lines.append(f"  {path}{shown}: {msg}")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (configs/tiny.yaml is the default)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults), apply dotted overrides and validate everything."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    source = str(path) if path else "defaults"
    if overrides:
        source += " + overrides"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config_text(text: str, overrides: list[str] | None = None) -> RunConfig:
    """A config from YAML text (how KFP components receive the resolved config)."""
    data = yaml.safe_load(text) or {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, "config text")) from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_hash(cfg: RunConfig) -> str:
    """A short stable digest of the resolved config (for lineage tags and cache keys)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
