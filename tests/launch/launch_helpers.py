"""Helpers shared by the launcher tests: repo paths, the CRD schemas, cluster-style overrides."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = {"PyTorchJob": "kubeflow.org_pytorchjobs.yaml", "TrainJob": "trainer.kubeflow.org_trainjobs.yaml"}


CRD_DIR = ROOT / "manifests/crds"  # vendored, with their source commits (manifests/crds/README.md)


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    """openAPIV3Schema of the CRD's served version, made strict (see `strict`)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v.get("served", True))
    return strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Refuse unknown fields. The API server silently prunes them from custom objects, so a typo
    (or a field from another API version) would vanish instead of failing: the test must catch it."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            if isinstance(value, dict):
                strict(value)
            elif isinstance(value, list):
                for item in value:
                    strict(item)
    return schema


def cluster_overrides(backend: str) -> list[str]:
    return [f"launch.backend={backend}", "launch.secret_env.AWS_ACCESS_KEY_ID=minio-credentials/access-key",
            "launch.secret_env.AWS_SECRET_ACCESS_KEY=minio-credentials/secret-key"]




@functools.cache
def _crd_validator(kind: str) -> Any:
    import jsonschema

    schema = crd_schema(kind)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)  # once per kind: for these schemas it costs seconds, the validation milliseconds
    return cls(schema)


def validate_crd(obj: dict[str, Any], kind: str) -> None:
    """`jsonschema.validate(obj, crd_schema(kind))` without re-checking the schema on every call."""
    _crd_validator(kind).validate(obj)
