"""Helpers of the training tests: a tiny synthetic world with text embeddings, and a tiny run config.

A module of its own (not conftest.py): test files import it by name, and several test folders' conftest
modules would otherwise shadow each other when pytest runs them together.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
from tiny_model import TINY_MODEL

from versavit.config import load_config
from versavit.config.schema import RunConfig
from versavit.data import codecs
from versavit.data.shards import ShardWriter, read_manifest

ROOT = Path(__file__).resolve().parents[2]
EMB_DIM = int(__import__("os").environ.get("VV_EMB_DIM", 32))
TRAINED_STEPS = 40  # the steps of the session's shared `trained_run` (conftest.py)


def bag_of_words(text: str, dim: int = EMB_DIM) -> np.ndarray:
    """Test-only text embedding: a sum of fixed random word vectors (learnable, deterministic)."""
    vec = np.zeros(dim, np.float32)
    for word in text.lower().split():
        vec += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim).astype(np.float32)
    return vec / max(np.linalg.norm(vec), 1e-6)


def add_embeddings(url: str) -> None:
    """Rewrite a synthetic dataset in place with emb.npy for every object's expression."""
    from versavit.data.loader import shard_pipeline

    manifest = read_manifest(url)
    samples = list(shard_pipeline(manifest.shard_urls(), transform=None))
    raw = []
    import webdataset as wds

    for shard in manifest.shard_urls():
        raw += list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    assert len(raw) == len(samples)
    with ShardWriter(url, samples_per_shard=manifest.shards[0].num_samples, name=manifest.name,
                     meta=manifest.meta) as w:
        for r, s in zip(raw, samples, strict=True):
            r = {k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"}
            emb = np.stack([bag_of_words(o["expression"]) for o in s["json"]["objects"]])
            r["emb.npy"] = codecs.encode_npy(emb)
            w.write(r)


def tiny_overrides(workdir: Path) -> list[str]:
    return [
        f"workdir={workdir}", "data.num_workers=0", "data.shuffle_buffer=16",
        "data.synthetic.num_train=48", "data.synthetic.num_val=8", "data.synthetic.image_size=56",
        "data.synthetic.samples_per_shard=16",
        *TINY_MODEL, f"model.heads.refseg.text_dim={EMB_DIM}",
        "train.multitask.batch_size={caption: 2, depth: 4, refseg: 4}",
        "train.warmup.batch_size={caption: 2}", "train.warmup.global_batch=4",
        "tracking.experiment=train-test", "launch.nproc_per_node=2",
    ]


def tiny_config(workdir: Path, *extra: str) -> RunConfig:
    return load_config(ROOT / "configs/tiny.yaml", [*tiny_overrides(workdir), *extra])


def train_cmd(workdir: Path, stage: str, *extra: str) -> list[str]:
    """`versavit train <stage>` on the tiny config in `workdir` (2 processes under torchrun)."""
    return [sys.executable, "-m", "versavit.cli", "train", stage, "--config", "configs/tiny.yaml",
            *tiny_overrides(workdir), *extra]


def read_metrics(workdir: Path, stage: str) -> dict[int, dict]:
    """Per-step metrics (a resumed run re-logs steps after its checkpoint: the last record wins)."""
    out = {}
    for line in (workdir / "reports" / stage / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out
