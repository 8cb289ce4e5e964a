"""Helpers of the `data prepare` tests: reading prepared shards back, editing inputs."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from versavit.data.loader import shard_pipeline
from versavit.data.shards import read_manifest, resolve_shards


def read(url: str) -> list[dict[str, Any]]:
    """Every sample of a prepared dataset, decoded, through the training reader."""
    return list(shard_pipeline(resolve_shards([url])))


def by_key(url: str) -> dict[str, dict[str, Any]]:
    return {s["__key__"]: s for s in read(url)}


def raw_field(url: str, field: str = "rgb.jpg") -> dict[str, bytes]:
    """key -> the stored bytes of `field` (to check that JPEG bytes pass through untouched)."""
    out = {}
    for shard in read_manifest(url).shard_urls():
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith("." + field):
                    out[m.name[:-len(field) - 1]] = tar.extractfile(m).read()
    return out


def rewrite_tar(path: Path, change: Callable[[str, bytes], bytes]) -> None:
    """Rewrite a tar in place, passing every member's bytes through `change(name, data)`."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in members:
            data = change(member.name, data)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
