"""DA-2K (Depth Anything V2's relative-depth benchmark) in its published layout: the `da2k` prepare source, the
annotation parser the published-layout reader (versavit.eval.datasets.da2k) shares, and a tiny stand-in.

The layout, from DA-2K.md of github.com/DepthAnything/Depth-Anything-V2 and the release on the Hugging Face hub
(huggingface.co/datasets/depth-anything/DA-2K: DA-2K.zip, 681 MB, unzipping to DA-2K/):

    DA-2K/annotations.json          {"images/<scene>/<file>.jpg": [{"point1": [h1, w1], "point2": [h2, w2],
                                                                   "closer_point": "point1"}, ...], ...}
    DA-2K/images/<scene>/<file>     scene: indoor, outdoor, non_real, transparent_reflective, adverse_style,
                                    aerial, underwater, object (about 1K images, 2K pairs in all)

DA-2K.md: each key is the path of an image (relative to DA-2K/, as scripts that open `"DA-2K/" + key` rely on),
each point is `[h, w]` = (vertical, horizontal) = (row, column) in pixels of the image as published, and
"closer_point" names the point nearer the camera ("we always set point1 as the closer one"; both values are read).
Here a pair is `((r1, c1), (r2, c2), closer)` with closer 0 (point1) or 1 (point2).

A prepared sample: the image as published (rgb.jpg / rgb.png) and json {benchmark, split, key (the annotation's
image path), file, size [h, w], scene, pairs [[[r1, c1], [r2, c2], closer], ...], annotations (as published)}.
An image whose annotations are malformed or whose points fall outside it is skipped and counted (bad_record);
a missing or undecodable image likewise (missing_image, bad_image). annotations.json that is not the documented
object is an error of the whole benchmark.

`draw_pairs` draws DA-2K-style pairs from an exact depth map (the synthetic world's, and the fixture's): two
valid pixels whose true depths differ by at least MARGIN (relative), so each pair has one right answer, as
DA-2K's annotators kept only the pairs they found unambiguous.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from versavit import storage
from versavit.data import codecs
from versavit.data.convert.common import safe_key
from versavit.data.prepare.base import Source

# versavit.data.prepare imports benchmarks before this module (benchmarks' source list takes DA2K_SOURCE from
# here, at its end), so these helpers are defined by the time this import runs
from versavit.data.prepare.benchmarks import _read, _Skip, descend, image_field

ANNOTATIONS = "annotations.json"
SPLITS = ("test",)  # DA-2K is an evaluation set: one split
SCENES = ("indoor", "outdoor", "non_real", "transparent_reflective", "adverse_style", "aerial", "underwater",
          "object")
CLOSER = {"point1": 0, "point2": 1}
# The farther point of a drawn pair is at least 10% deeper than the closer one: far above the synthetic
# renderer's precision and the quantisation of 16-bit depth PNGs (< 0.1%), so the true order is never in doubt.
MARGIN = 0.10

Point = tuple[int, int]
Pair = tuple[Point, Point, int]


# ------------------------------------------------------------------------------------------ annotations


def da2k_root(root: str) -> str:
    """The DA-2K folder (holding annotations.json), given it or the folder DA-2K.zip was unzipped in."""
    return descend(root, "DA-2K")


def parse_annotations(text: str, where: str = ANNOTATIONS) -> dict[str, list[Any]]:
    """annotations.json's text -> {image path: [annotation, ...]} (entries unchecked: `parse_entries`)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"da2k: {where} is not valid JSON ({exc}); re-download DA-2K.zip") from None
    if not isinstance(data, dict):
        raise ValueError(f"da2k: {where} must be a JSON object {{image path: [annotations]}}, got "
                         f"{type(data).__name__}")
    for key, entries in data.items():
        if not isinstance(entries, list):
            raise ValueError(f"da2k: {where}: {key!r} must map to a list of annotations, got "
                             f"{type(entries).__name__}")
    return data


def _point(value: Any, name: str) -> Point:
    if (not isinstance(value, list | tuple) or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
        raise ValueError(f"{name} must be [h, w] (two numbers), got {value!r}")
    return int(round(value[0])), int(round(value[1]))


def parse_entry(entry: Any) -> Pair:
    """One annotation {"point1": [h, w], "point2": [h, w], "closer_point": "point1" | "point2"} -> a pair."""
    if not isinstance(entry, dict):
        raise ValueError(f"an annotation must be an object, got {type(entry).__name__}")
    missing = [k for k in ("point1", "point2", "closer_point") if k not in entry]
    if missing:
        raise ValueError(f"annotation without {missing}: {entry!r}")
    if entry["closer_point"] not in CLOSER:
        raise ValueError(f"closer_point must be 'point1' or 'point2', got {entry['closer_point']!r}")
    return _point(entry["point1"], "point1"), _point(entry["point2"], "point2"), CLOSER[entry["closer_point"]]


def parse_entries(image_path: str, entries: Sequence[Any]) -> list[Pair]:
    """An image's annotations -> pairs; ValueError naming the image and the annotation when one is malformed."""
    if not entries:
        raise ValueError(f"da2k: {image_path} has no annotations")
    pairs = []
    for i, entry in enumerate(entries):
        try:
            pairs.append(parse_entry(entry))
        except ValueError as exc:
            raise ValueError(f"da2k: {ANNOTATIONS}, {image_path}, annotation {i}: {exc}") from None
    return pairs


def inside(pairs: Sequence[Pair], shape: tuple[int, int], image_path: str) -> list[Pair]:
    """The pairs with every point inside an image of `shape` (h, w). A point on the far border (h or w: a
    rounding of an annotation at the edge) is moved onto the last pixel; one further out is an error."""
    h, w = shape
    out = []
    for p1, p2, closer in pairs:
        points = []
        for r, c in (p1, p2):
            if not (0 <= r <= h and 0 <= c <= w):
                raise ValueError(f"da2k: {image_path}: point [h, w] = [{r}, {c}] lies outside the {h}x{w} image "
                                 "(points are [row, column] in pixels of the published image)")
            points.append((min(r, h - 1), min(c, w - 1)))
        out.append((points[0], points[1], closer))
    return out


def scene_of(image_path: str) -> str:
    """images/<scene>/<file> -> <scene> ("" when the path does not say)."""
    parts = image_path.strip("/").split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "images" else ""


def pairs_json(pairs: Sequence[Pair]) -> list[list[Any]]:
    return [[list(p1), list(p2), int(closer)] for p1, p2, closer in pairs]


def pairs_from_json(value: Sequence[Sequence[Any]]) -> list[Pair]:
    return [((int(p1[0]), int(p1[1])), (int(p2[0]), int(p2[1])), int(closer)) for p1, p2, closer in value]


# ------------------------------------------------------------------------------------------ pairs from exact depth


def draw_pairs(depth: np.ndarray, valid: np.ndarray, n: int, rng: np.random.Generator,
               margin: float = MARGIN) -> list[Pair]:
    """Up to `n` pairs of valid pixels whose true depths differ by at least `margin` (relative); which of the
    two is listed first is random, so `closer` is 0 or 1. Fewer when the image has too little depth range."""
    rows, cols = np.nonzero(valid & np.isfinite(depth) & (depth > 0))
    if rows.size < 2:
        return []
    pairs: list[Pair] = []
    seen: set[tuple[int, int]] = set()
    for _ in range(16):  # rounds of candidates; a flat image yields none and stops here
        a, b = rng.integers(0, rows.size, (2, 8 * n))
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            d1, d2 = float(depth[rows[i], cols[i]]), float(depth[rows[j], cols[j]])
            if max(d1, d2) < (1 + margin) * min(d1, d2) or (i, j) in seen or (j, i) in seen:
                continue
            seen.add((i, j))
            pairs.append(((int(rows[i]), int(cols[i])), (int(rows[j]), int(cols[j])), 0 if d1 < d2 else 1))
            if len(pairs) == n:
                return pairs
    return pairs


# ------------------------------------------------------------------------------------------ the source


def list_da2k(input_url: str, split: str) -> list[list[Any]]:
    """[image path, its annotations as published] per image of annotations.json, sorted by path."""
    if split not in SPLITS:
        raise ValueError(f"da2k split must be one of {list(SPLITS)}, got {split!r}")
    url = storage.join(da2k_root(input_url), ANNOTATIONS)
    annotations = parse_annotations(storage.read_text(url), url)
    return [[path, annotations[path]] for path in sorted(annotations)]


def read_da2k(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """DA-2K images as published + their pairs as [row, col] points (json)."""
    root = da2k_root(input_url)
    for image_path, entries in units:
        counts["records"] += 1
        try:
            try:
                pairs = parse_entries(image_path, entries)
            except ValueError:
                raise _Skip("bad_record") from None
            name, data, size = image_field(_read(storage.join(root, image_path), "missing_image"))
            try:
                pairs = inside(pairs, size, image_path)
            except ValueError:
                raise _Skip("bad_record") from None
        except _Skip as skip:
            counts[skip.reason] += 1
            continue
        counts["samples"] += 1
        yield {"__key__": safe_key(Path(image_path).with_suffix("")), name: data,
               "json": {"benchmark": "da2k", "split": split, "key": image_path, "file": image_path,
                        "size": list(size), "scene": scene_of(image_path), "pairs": pairs_json(pairs),
                        "point_convention": "[row, col] pixels; closer 0 = point1, 1 = point2",
                        "annotations": entries}}


# ------------------------------------------------------------------------------------------ fixture

FIXTURE_IMAGES = 3
FIXTURE_SHAPE = (48, 64)  # (h, w): not square, so (row, col) read as (x, y) lands elsewhere or outside
FIXTURE_PAIRS = 4  # per image
_FIXTURE_SCENES = ("indoor", "outdoor", "object")


def _fixture_path(index: int) -> str:
    return f"images/{_FIXTURE_SCENES[index % len(_FIXTURE_SCENES)]}/{index:04d}.jpg"


def fixture_truth(seed: int, index: int) -> dict[str, Any]:
    """Fixture image `index`: "image" (as rendered, before JPEG), "depth" (exact metres), "valid", "key" (the
    annotation's image path), "scene" and "pairs" (what the reader must give back: point1 is the closer one, as
    published, except the last pair of image 0, listed farther-first with closer_point "point2")."""
    from versavit.data.synthetic import render_sample

    h, w = FIXTURE_SHAPE
    scene = render_sample(seed, "test", index, image_size=max(h, w))
    depth = scene.depth[:h, :w]
    drawn = draw_pairs(depth, np.ones_like(depth, bool), FIXTURE_PAIRS, np.random.default_rng([seed, index]))
    pairs: list[Pair] = [(p1, p2, 0) if closer == 0 else (p2, p1, 0) for p1, p2, closer in drawn]
    if index == 0:
        p1, p2, _ = pairs[-1]
        pairs[-1] = (p2, p1, 1)
    path = _fixture_path(index)
    return {"image": scene.image[:h, :w], "depth": depth, "valid": np.ones_like(depth, bool), "key": path,
            "scene": scene_of(path), "pairs": pairs}


def write_da2k_fixture(folder: Path, seed: int) -> None:
    """DA-2K/annotations.json + DA-2K/images/<scene>/*.jpg, pairs exact from the rendered depth."""
    root = folder / "DA-2K"
    annotations: dict[str, list[dict[str, Any]]] = {}
    for i in range(FIXTURE_IMAGES):
        truth = fixture_truth(seed, i)
        path = root / truth["key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(codecs.encode_image(truth["image"], "jpg"))
        annotations[truth["key"]] = [{"point1": list(p1), "point2": list(p2),
                                      "closer_point": "point1" if closer == 0 else "point2"}
                                     for p1, p2, closer in truth["pairs"]]
    (root / ANNOTATIONS).write_text(json.dumps(annotations, indent=2))


DA2K_SOURCE = Source(
    name="da2k", kind="benchmark", tasks=("depth",), splits=SPLITS,
    about="DA-2K, Depth Anything V2's relative-depth benchmark (about 1K images, 2K annotated point pairs, 8 scene "
    "types): DA-2K.zip (681 MB, https://huggingface.co/datasets/depth-anything/DA-2K), unzipped; --input is DA-2K/ "
    "or the folder holding it: annotations.json ({\"images/<scene>/<file>\": [{\"point1\": [h, w], \"point2\": "
    "[h, w], \"closer_point\": \"point1\"}, ...]}) + images/<scene>/*.jpg. One split (test); images kept as "
    "published, pairs stored in the sample's json as [row, col] points with the closer one's index.",
    list_units=list_da2k, read_units=read_da2k, write_fixture=write_da2k_fixture, units_per_shard=128)
