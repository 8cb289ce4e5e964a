"""Tiny datasets with known damage for the corrupt-data fault tests (32 px samples)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from versavit.data import codecs
from versavit.data.shards import ShardWriter

SIZE = 32


def sample(i: int, seed: int = 0, drop: tuple[str, ...] = (), bad_image: bool = False,
           refseg: bool = False) -> dict[str, Any]:
    """Image, depth map and json; with `refseg`, also a referred object's mask and its text embedding."""
    rng = np.random.default_rng([seed, i])
    depth = rng.uniform(1, 20, (SIZE, SIZE)).astype(np.float32)
    png, scale = codecs.encode_depth(depth)
    meta: dict[str, Any] = {"index": i, "seed": seed, "depth": {"scale": scale, "kind": "depth"}}
    out = {
        "__key__": f"s{i:05d}",
        "rgb.png": b"this is not a png" if bad_image else codecs.encode_image(
            rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), "png"),
        "depth.png": png,
    }
    if refseg:
        meta["expression"] = "the square on the left"
        out["mask.png"] = codecs.encode_png((rng.uniform(size=(SIZE, SIZE)) > 0.5).astype(np.uint8))
        out["emb.npy"] = codecs.encode_npy(rng.standard_normal((1, 8)).astype(np.float32))
    out["json"] = codecs.encode_json(meta)
    return {k: v for k, v in out.items() if k not in drop}


def write(url: str, n: int = 48, per_shard: int = 16, seed: int = 0, damage: dict[int, dict] | None = None,
          refseg: bool = False) -> None:
    with ShardWriter(url, samples_per_shard=per_shard, name="faults", meta={"seed": seed}) as w:
        for i in range(n):
            w.write(sample(i, seed, refseg=refseg, **(damage or {}).get(i, {})))


def truncate_in_sample(shard: Path, keep: int) -> None:
    """Cut the shard inside the first member of sample number `keep` (0-based): `keep` samples stay readable."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in members))
    first = next(m for m in members if m.name.split(".", 1)[0] == keys[keep])
    data = shard.read_bytes()
    shard.write_bytes(data[: first.offset_data + 10])


def flip_bytes(shard: Path, member_suffix: str = "rgb.png") -> None:
    """Overwrite a few bytes inside a member in place: same size, different sha256."""
    with tarfile.open(shard) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(member_suffix))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + 20: member.offset_data + 30] = b"\xff" * 10
    shard.write_bytes(bytes(data))


def tar_keys(shard: Path) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(shard.read_bytes())) as tf:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tf.getmembers()))


def synthetic_stand_in(workdir: Path) -> None:
    """A one-sample dataset where a run's synthetic world goes (`<workdir>/data/synthetic/train`): enough for the
    CLI's check that a stage's data exists, for tests that stop before any rank reads it."""
    write(str(workdir / "data" / "synthetic" / "train"), n=1, per_shard=1)
