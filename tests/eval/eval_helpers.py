"""Helpers of the evaluation tests: a tiny synthetic world with text embeddings, a tiny VersaViT export, and the
config that evaluates them in seconds (a uniquely named module: every test folder has its own conftest)."""

from __future__ import annotations

import json
import pickle
import zlib
from pathlib import Path

import numpy as np
import torch
from tiny_model import TINY_MODEL

from versavit.config import load_config
from versavit.config.schema import RunConfig
from versavit.data import codecs
from versavit.data.shards import ShardWriter, read_manifest

ROOT = Path(__file__).resolve().parents[2]
EMB_DIM = 16


def bag_of_words(text: str, dim: int = EMB_DIM) -> np.ndarray:
    """Test-only text embedding: a normalised sum of fixed random word vectors."""
    vec = np.zeros(dim, np.float32)
    for word in text.lower().split():
        vec += np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim).astype(np.float32)
    return vec / max(float(np.linalg.norm(vec)), 1e-6)


def add_embeddings(url: str) -> None:
    """Rewrite a synthetic dataset in place with emb.npy (one row per object, in object order)."""
    import webdataset as wds

    manifest = read_manifest(url)
    raw = []
    for shard in manifest.shard_urls():
        raw += list(wds.WebDataset(shard, shardshuffle=False, empty_check=False))
    with ShardWriter(url, samples_per_shard=manifest.shards[0].num_samples, name=manifest.name,
                     meta=manifest.meta) as writer:
        for r in raw:
            sample = {k: v for k, v in r.items() if not k.startswith("__") or k == "__key__"}
            objects = codecs.decode_json(sample["json"])["objects"]
            sample["emb.npy"] = codecs.encode_npy(np.stack([bag_of_words(o["expression"]) for o in objects]))
            writer.write(sample)


def eval_overrides(workdir: Path) -> list[str]:
    return [
        f"workdir={workdir}", "data.num_workers=0",
        "data.synthetic.num_train=24", "data.synthetic.num_val=8", "data.synthetic.image_size=56",
        "data.synthetic.samples_per_shard=8",
        *TINY_MODEL, f"model.heads.refseg.text_dim={EMB_DIM}",
        "eval.probe={seg_resolution: 56, depth_resolution: 56, epochs: 3, batch_size: 8, lr: 0.01}",
        "eval.correspondence.resolutions={synthetic: 56}", "eval.correspondence.keypoints_per_pair=8",
        "tracking.experiment=eval-test",
    ]


def eval_config(workdir: Path, *extra: str) -> RunConfig:
    return load_config(ROOT / "configs/tiny.yaml", [*eval_overrides(workdir), *extra])


def save_export(cfg: RunConfig, url: str, seed: int = 1, tasks: tuple[str, ...] = ("caption", "depth", "refseg")
                ) -> None:
    """A tiny VersaViT export (random weights of `seed`) where the multi-task stage would write it."""
    from versavit.models.multitask import VersaViT

    torch.manual_seed(seed)
    VersaViT.build(cfg.model, tasks=list(tasks)).save_pretrained(url)


def _flat_rgb(path: Path, value: int, shape: tuple[int, int] = (20, 30)) -> None:
    """A flat-colour image: its colour tells which sample it is (pairing checks survive JPEG)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(path)


def _noise_rgb(path: Path, seed: int, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    return image


def write_nyu(root: Path, per_split: int = 3, shape: tuple[int, int] = (48, 64)) -> None:
    """A small NYUv2 in the BTS layout (train in sync/, test in official_splits/test/), depth in mm."""
    from PIL import Image

    for split, folder, listing in (("train", "sync", "nyudepthv2_train_files_with_gt.txt"),
                                   ("test", "official_splits/test", "nyudepthv2_test_files_with_gt.txt")):
        lines = []
        for i in range(per_split):
            name = f"scene{i % 2}/rgb_{i:05d}"
            image = _noise_rgb(root / folder / f"{name}.jpg", zlib.crc32(f"{split}{i}".encode()) % 1000, shape)
            depth = (1000 + 20 * image[..., 0].astype(np.int64)).astype(np.uint16)  # depth follows red: learnable
            Image.fromarray(depth).save(root / folder / f"{name.replace('rgb_', 'sync_depth_')}.png")
            lines.append(f"{name}.jpg {name.replace('rgb_', 'sync_depth_')}.png 518.8579")
        (root / listing).write_text("\n".join(lines) + "\n")


def write_ade20k(root: Path, per_split: int = 3, shape: tuple[int, int] = (40, 52)) -> None:
    """A small ADEChallengeData2016 (labels 0..3: 0 = ignore)."""
    from PIL import Image

    for split, prefix in (("training", "train"), ("validation", "val")):
        for i in range(per_split):
            stem = f"ADE_{prefix}_{i + 1:08d}"
            image = _noise_rgb(root / "images" / split / f"{stem}.jpg", i + (0 if prefix == "train" else 50), shape)
            label = (image[..., 1] // 64).astype(np.uint8)  # 0..3
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(root / "annotations" / split / f"{stem}.png")


def write_refer(root: Path) -> None:
    """A refer-toolkit RefCOCO layout: 3 images, 4 refs (val: images 1 and 3), polygons and a compressed RLE."""
    from pycocotools import mask as mask_utils

    images = root / "images/mscoco/images/train2014"
    for i, colour in ((1, 40), (2, 90), (3, 170)):
        _flat_rgb(images / f"COCO_train2014_{i:012d}.jpg", colour, (40, 60))
    rle_mask = np.zeros((40, 60), np.uint8)
    rle_mask[30:35, 50:58] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    rle["counts"] = rle["counts"].decode()
    instances = {
        "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 40, "width": 60}
                   for i in (1, 2, 3)],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": [[10, 10, 20, 10, 20, 30, 10, 30]]},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": [[30, 0, 40, 0, 40, 10, 30, 10]]},
            {"id": 20, "image_id": 2, "category_id": 1, "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
            {"id": 30, "image_id": 3, "category_id": 3, "segmentation": rle},
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
    }
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val", "category_id": 1,
         "sentences": [{"sent": "left box", "raw": "Left box"}, {"sent": "the tall one", "raw": "the tall one"}]},
        {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "category_id": 2,
         "sentences": [{"sent": "top right", "raw": "top right"}]},
        {"ref_id": 2, "ann_id": 20, "image_id": 2, "split": "testA", "category_id": 1,
         "sentences": [{"sent": "corner", "raw": "corner"}]},
        {"ref_id": 3, "ann_id": 30, "image_id": 3, "split": "val", "category_id": 3,
         "sentences": [{"sent": "small thing", "raw": "small thing"}]},
    ]
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco/instances.json").write_text(json.dumps(instances))
    with open(root / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
