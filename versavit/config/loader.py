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


def _list_index(items: list, key: str, text: str, where: str) -> int:
    """A list level of an override: an index (`train.recipe.1`) or a `name` (`train.recipe.coarse`)."""
    if key.lstrip("-").isdigit() and -len(items) <= int(key) < len(items):
        return int(key) % len(items)
    named = [i for i, item in enumerate(items) if isinstance(item, dict) and item.get("name") == key]
    if len(named) != 1:
        raise ConfigError(f"override {text!r}: {where} is a list of {len(items)}; {key!r} is neither an index "
                          "nor the name of one of its entries")
    return named[0]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override into the nested dict (creating levels; pydantic judges the keys).

    A list level takes an index or an entry's `name`: `train.recipe.coarse.max_steps=5`.
    """
    for text in overrides:
        keys, value = parse_override(text)
        node: Any = data
        for i, key in enumerate(keys):
            where = ".".join(keys[:i])
            if isinstance(node, list):
                key = _list_index(node, key, text, where)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {where} is a value ({node!r}), not a section")
            if i == len(keys) - 1:
                node[key] = value
                break
            child = node[key] if isinstance(node, list) else node.get(key)
            if child is None:
                child = node[key] = {}
            node = child
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: sections merge key by key, anything else (values, lists) is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


# Keys of earlier layouts and where they live now: named in the "unknown key" message.
MOVED_KEYS = {
    "seed": "train.seed (model init, data order), eval.seed (probes), data.synthetic.seed (the world)",
    "train.warmup.lr": "train.warmup.lr_backbone and train.warmup.lr_heads",
    "train.warmup.micro_batch": "train.warmup.batch_size.caption",
    "train.multitask.optim": "train.optim, shared by every stage (the learning rates: train.multitask.lr_backbone, "
                             "train.multitask.lr_heads)",
    "train.multitask.resolution": "train.resolution",
    **{f"train.multitask.loss_weights.{k}": f"train.loss.{k}"
       for k in ("depth_ssi", "depth_gm", "gm_scales", "seg_bce", "seg_dice")},
}


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}): {exc.error_count()} problem(s)"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        is_key = path.endswith(".[key]")  # a key of a mapping with fixed keys (e.g. tasks): an unknown key too
        if err["type"] == "extra_forbidden" or is_key:
            path = path.removesuffix(".[key]")
            expected = f"; expected {msg.removeprefix('Input should be ')}" if is_key else ""
            msg = f"unknown key (check spelling{expected}; `versavit config show` lists the valid keys)"
            if path in MOVED_KEYS:
                msg = f"unknown key: moved to {MOVED_KEYS[path]}"
        shown = "" if err["type"] in ("missing",) or is_key or isinstance(value, dict) else f" = {value!r}"
        shown = re.sub(r"(\w+://)[^/@\s'\"]+@", r"\1***@", shown)  # never echo credentials
        lines.append(f"  {path}{shown}: {msg}")
    return "\n".join(lines)


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML config file as a dict. A top-level `base: other.yaml` (relative to this file) is loaded first
    and this file deep-merged over it, so e.g. a recipe file names only what it changes."""
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
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {str(p)!r}: base must be the path of another config file, got {base!r}")
    base_path = (p.parent / base).resolve()
    chain = (*_chain, p.resolve())
    if base_path in chain:
        raise ConfigError(f"config file {str(p)!r}: base {base!r} leads back to itself "
                          f"({' -> '.join(str(c) for c in (*chain, base_path))})")
    return deep_merge(load_yaml(base_path, chain), data)


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
