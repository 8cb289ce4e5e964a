"""`images`: a plain folder of images (recursively: .jpg .jpeg .png .webp), for the depth sets the paper
pseudo-labels with Depth-Anything-V2 (Open Images, Google Landmarks v2, Places365, CC3M; Objects365 and SA-1B
have sources of their own). Samples carry the image alone; the depth label step adds the rest.

Lists published as URLs (CC3M, Open Images) are fetched first, e.g. with img2dataset
(`--output_format files`), into such a folder; its `.json`/`.txt` side files are ignored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from versavit import storage
from versavit.data.convert.common import SkipRecord, image_jpeg, load_image, safe_key
from versavit.data.prepare.base import Source

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(input_url: str, split: str) -> list[str]:
    """Every image below `input_url`, as paths relative to it, sorted (the split is not used: one folder)."""
    fs, root = storage.get_fs(input_url)
    try:
        found = fs.find(root)
    except Exception as exc:
        raise storage.describe_error(input_url, exc) from exc
    if not found and not fs.exists(root):
        raise storage.StorageError(f"{input_url} does not exist: pass the folder of images as --input",
                                   kind="missing")
    prefix = root.rstrip("/") + "/"
    return sorted(p[len(prefix):] for p in found if p.lower().endswith(IMAGE_SUFFIXES) and p.startswith(prefix))


def read_images(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """The images named by `units` as samples: rgb.jpg plus json {source, id, size}."""
    for rel in units:
        try:
            jpeg, (h, w) = image_jpeg(load_image(rel, input_url))
        except SkipRecord as skip:
            counts[skip.reason] += 1
            continue
        counts["images"] += 1
        yield {"__key__": safe_key(Path(rel).with_suffix("")), "rgb.jpg": jpeg,
               "json": {"source": "images", "id": rel, "size": [h, w]}}


def write_images_fixture(folder: Path, seed: int) -> None:
    """Eight synthetic scenes as JPEGs in two sub-folders (the layout is any tree of image files)."""
    from versavit.data import codecs
    from versavit.data.synthetic import render_sample

    for i in range(8):
        scene = render_sample(seed, "train", i, image_size=96)
        path = folder / f"part-{i % 2}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(codecs.encode_image(scene.image, "jpg"))


IMAGES = Source(
    name="images", kind="training", tasks=("depth",), splits=("train",),
    about="Any folder of images (searched recursively: .jpg .jpeg .png .webp), e.g. Open Images v7 train "
    "(1.7M used, ~500 GB), Google Landmarks v2 (2.7M, ~500 GB), Places365-Standard (8.0M incl. challenge, "
    "~100 GB at 256 px / ~500 GB high-res), CC3M (2.8M, ~400 GB via img2dataset --output_format files). "
    "Samples hold the image only; `labels: [depth]` adds Depth-Anything-V2 disparity.",
    list_units=list_images, read_units=read_images, write_fixture=write_images_fixture, units_per_shard=256)
