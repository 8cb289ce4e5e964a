"""NAVI and SPair-71k, the correspondence benchmarks of Probe3D (paper Table 8), in their published layouts: the
`navi` and `spair71k` prepare sources, the parsing rules the published-layout readers (versavit.eval.datasets.
correspondence) share, and tiny stand-ins with exact correspondences.

SPair-71k (cvlab.postech.ac.kr/research/SPair-71k, SPair-71k.tar.gz; the layout Probe3D's evals/datasets/spair.py
and HPF's loader read):

    SPair-71k/JPEGImages/<category>/<name>.jpg
    SPair-71k/PairAnnotation/{trn,val,test}/<pair_id>-<src>-<trg>:<category>.json
        {"pair_id", "filename", "src_imname", "trg_imname", "src_imsize": [w, h, 3], "trg_imsize",
         "src_bndbox": [x1, y1, x2, y2], "trg_bndbox", "category", "src_kps": [[x, y], ...], "trg_kps": [[x, y], ...]
         (the keypoints visible in both, in correspondence order), "kps_ids", "mirror", "viewpoint_variation",
         "scale_variation", "truncation", "occlusion", ...}
    SPair-71k/ImageAnnotation/<category>/<name>.json, Segmentation/<category>/<name>.png, Layout/{large,small}/
        (not read: the pair files carry the keypoints of both images)

Keypoints are (x, y) = (column, row) pixel positions of the image as published. A pair is scored by PCK with the
target box's longer side as the normaliser (Probe3D, use_bbox=False: thresh_scale = max(bbox w, h) / max(image
side)).

NAVI (github.com/google/navi README; navi_v1.tar.gz as Probe3D's data_processing/README.md downloads it; Probe3D's
evals/datasets/navi.py):

    navi_v1/<object_id>/{wild_set, multiview-XX-<camera>, ...}/annotations.json
        [{"object_id", "camera": {"q": [w, x, y, z], "t": [x, y, z] (mm), "focal_length" (px), "camera_model"},
          "filename": "000.jpg", "image_size": [h, w], "scene_name", "split", "occluded"}, ...]
    navi_v1/<object_id>/<scene>/images/<id>.jpg, depth/<id>.png, masks/<id>.png
    (Probe3D's resize_navi.py adds images/downsampled_<id>.jpg and depth/downsampled_<id>.png, min side 1024;
    those are read when present, as Probe3D reads only them.)

Depth PNGs are 16-bit disparity codes (google/navi data_util.decode_depth, scale_factor 10): depth = 65535 * 10 /
code in millimetres, code 0 = no object. The camera: `q`, `t` give the object-to-camera transform [R | t]
(Probe3D's camera_matrices_from_annotation), camera frame x right, y down, z forward, principal point at the image
centre, as Probe3D back-projects depth (xyz = depth * K^-1 [u + 0.5, v + 0.5, 1]).

Probe3D's NAVI test split is every in-the-wild collection (`wild_set`) of the objects that also have another
scene; every fourth image (in object, then image order) is paired with another image of its collection whose
camera rotation differs by more than 0 and at most 120 degrees, drawn at random (here: seeded per image, seed 8
as Probe3D's torch.manual_seed(8)).

A prepared sample (both sources): the source image (rgb.jpg / rgb.png: JPEG bytes as published), the target
image (rgb_b.jpg / rgb_b.png), for NAVI the published depth PNGs (navi_depth.png, navi_depth_b.png: codes
unchanged), and json: SPair {benchmark, split, key (the pair file's name), file, category, src_imname, trg_imname,
size, size_b ([h, w]), src_kps, trg_kps, src_bndbox, trg_bndbox, and the pair's published attributes}; NAVI
{benchmark, split, key (<object>/<scene>/<id>-<id>), object, scene, image, image_b, file, file_b, depth_file,
depth_file_b, size, size_b, camera, camera_b, image_size, image_size_b (as annotated), angle (degrees)}.
`spair_target` / `navi_target` turn such a json into the evaluator's arrays, one definition for both readers.
"""

from __future__ import annotations

import io
import json
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from versavit import storage
from versavit.data import codecs
from versavit.data.convert.common import safe_key
from versavit.data.prepare.base import Source

# versavit.data.prepare imports benchmarks before this module (benchmarks' source list takes the sources from
# here, at its end), so these helpers are defined by the time this import runs
from versavit.data.prepare.benchmarks import _read, _Skip, descend, image_field

# ------------------------------------------------------------------------------------------ SPair-71k

SPAIR_SPLITS = {"test": "test", "val": "val", "trn": "trn", "train": "trn", "valid": "val"}
SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
                    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")
# the pair's attributes kept as published (difficulty flags: Probe3D reports recall per viewpoint_variation)
SPAIR_ATTRIBUTES = ("pair_id", "kps_ids", "mirror", "viewpoint_variation", "scale_variation", "truncation",
                    "occlusion", "src_pose", "trg_pose")


def spair_root(root: str) -> str:
    """The SPair-71k folder, given it or the folder the tar was extracted in."""
    return descend(root, "SPair-71k")


def _spair_split(split: str) -> str:
    if split not in SPAIR_SPLITS:
        raise ValueError(f"spair split must be one of {sorted(SPAIR_SPLITS)}, got {split!r}")
    return SPAIR_SPLITS[split]


def _pair_category(name: str) -> str:
    """`<pair_id>-<src>-<trg>:<category>.json` -> category ("" when the name does not say)."""
    stem = name[:-5] if name.endswith(".json") else name
    return stem.rsplit(":", 1)[1] if ":" in stem else ""


def list_spair(input_url: str, split: str) -> list[str]:
    """PairAnnotation/<split>/*.json relative to the SPair-71k folder, by category, then file name."""
    folder = _spair_split(split)
    url = storage.join(spair_root(input_url), "PairAnnotation", folder)
    names = [u.rsplit("/", 1)[-1] for u in storage.list_files(url, ".json")]
    return [f"PairAnnotation/{folder}/{n}" for n in sorted(names, key=lambda n: (_pair_category(n), n))]


def _points(value: Any, name: str) -> list[list[float]]:
    if not isinstance(value, list) or not all(
            isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                                 and np.isfinite(v) for v in p) for p in value):
        raise ValueError(f"{name} must be a list of [x, y] points, got {str(value)[:80]}")
    return [[float(p[0]), float(p[1])] for p in value]


def _box(value: Any, name: str) -> list[float]:
    if (not isinstance(value, list | tuple) or len(value) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name} must be [x1, y1, x2, y2], got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{name} {value!r} is empty (expected [x1, y1, x2, y2] corners)")
    return [x1, y1, x2, y2]


def parse_spair_pair(data: Any, where: str) -> dict[str, Any]:
    """A pair annotation (the published JSON object) -> the fields a sample keeps, checked; ValueError naming
    the file when one is missing or malformed."""
    try:
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        for k in ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "src_bndbox", "trg_bndbox"):
            if k not in data:
                raise ValueError(f"no {k!r}")
        src, trg = _points(data["src_kps"], "src_kps"), _points(data["trg_kps"], "trg_kps")
        if len(src) != len(trg) or not src:
            raise ValueError(f"src_kps ({len(src)}) and trg_kps ({len(trg)}) must pair up, at least one")
        out = {"category": str(data["category"]), "src_imname": str(data["src_imname"]),
               "trg_imname": str(data["trg_imname"]), "src_kps": src, "trg_kps": trg,
               "src_bndbox": _box(data["src_bndbox"], "src_bndbox"),
               "trg_bndbox": _box(data["trg_bndbox"], "trg_bndbox")}
    except ValueError as exc:
        raise ValueError(f"spair: {where}: {exc}") from None
    out.update({k: data[k] for k in SPAIR_ATTRIBUTES if k in data})
    return out


def _inside(points: list[list[float]], size: tuple[int, int]) -> bool:
    h, w = size
    return all(0 <= x <= w and 0 <= y <= h for x, y in points)


def read_spair(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """SPair-71k pairs: both images as published + the pair annotation (keypoints, boxes, attributes)."""
    root = spair_root(input_url)
    for rel in units:
        counts["records"] += 1
        try:
            try:
                pair = parse_spair_pair(json.loads(_read(storage.join(root, rel), "bad_json")), rel)
            except ValueError:
                raise _Skip("bad_json") from None
            images = []
            for which in ("src", "trg"):
                path = f"JPEGImages/{pair['category']}/{pair[f'{which}_imname']}"
                name, data, size = image_field(_read(storage.join(root, path), "missing_image"))
                if not _inside(pair[f"{which}_kps"], size):
                    raise _Skip("bad_record")  # keypoints outside the image: not this image's annotation
                images.append((name, data, size))
        except _Skip as skip:
            counts[skip.reason] += 1
            continue
        counts["samples"] += 1
        stem = rel.rsplit("/", 1)[-1][:-len(".json")]
        (name_a, data_a, size_a), (name_b, data_b, size_b) = images
        meta = {"benchmark": "spair", "split": _spair_split(split), "key": stem, "file": rel, **pair,
                "size": list(size_a), "size_b": list(size_b)}
        yield {"__key__": safe_key(stem), name_a: data_a, name_b.replace("rgb", "rgb_b"): data_b, "json": meta}


def spair_target(meta: dict[str, Any]) -> dict[str, Any]:
    """A prepared / parsed SPair pair's json -> the evaluator's target (see versavit.eval.datasets.correspondence):
    keypoints [N, 2] float32 (x, y) in pixels of each image, the PCK normaliser (the target box's longer side)."""
    x1, y1, x2, y2 = meta["trg_bndbox"]
    return {"key": meta["key"], "kind": "keypoints", "category": meta["category"],
            "kps": np.asarray(meta["src_kps"], np.float32).reshape(-1, 2),
            "kps_b": np.asarray(meta["trg_kps"], np.float32).reshape(-1, 2),
            "norm": float(max(x2 - x1, y2 - y1)), "bbox": list(meta["src_bndbox"]), "bbox_b": [x1, y1, x2, y2],
            "image_id": f"{meta['category']}/{meta['src_imname']}",
            "image_id_b": f"{meta['category']}/{meta['trg_imname']}",
            "viewpoint_variation": meta.get("viewpoint_variation")}


# ------------------------------------------------------------------------------------------ NAVI

NAVI_SPLITS = ("test",)  # Probe3D's correspondence test split: the in-the-wild collections
NAVI_SCENE = "wild_set"
NAVI_STRIDE = 4  # Probe3D: self.instances[::4]
NAVI_MAX_ANGLE = 120.0  # degrees (Probe3D's max_angle)
NAVI_PAIR_SEED = 8  # Probe3D: torch.manual_seed(8) before drawing the partners
NAVI_DEPTH_SCALE = 65535 * 10.0  # google/navi decode_depth: disparity = code / (65535 * 10), depth = 1 / disparity
DOWNSAMPLED = "downsampled_"  # Probe3D's resize_navi.py prefix


def navi_root(root: str) -> str:
    """The navi_v1 folder (holding <object_id>/<scene>/annotations.json), given it or the folder above."""
    return descend(root, "navi_v1", "navi_v1.5", "navi_v1.0")


def quaternion_matrix(q: Any) -> np.ndarray:
    """[w, x, y, z] -> 3x3 rotation (Probe3D's quaternion_to_rotation_matrix; unnormalised input is scaled)."""
    w, x, y, z = (float(v) for v in q)
    s = 2.0 / (w * w + x * x + y * y + z * z)
    return np.array([[1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
                     [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
                     [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)]])


def matrix_quaternion(rot: np.ndarray) -> list[float]:
    """3x3 rotation -> [w, x, y, z] with w >= 0 (the inverse of `quaternion_matrix`)."""
    m = np.asarray(rot, np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * np.sqrt(1.0 + tr)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = [0.0] * 4
        q[0] = (m[k, j] - m[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    return (q if q[0] >= 0 else -q).tolist()


def camera_pose(camera: dict[str, Any]) -> np.ndarray:
    """An annotation's camera -> 4x4 object-to-camera transform in metres (t is published in millimetres)."""
    pose = np.eye(4)
    pose[:3, :3] = quaternion_matrix(camera["q"])
    pose[:3, 3] = np.asarray(camera["t"], np.float64) / 1000.0
    return pose


def rotation_angle(rot_a: np.ndarray, rot_b: np.ndarray) -> float:
    """The angle between two camera rotations, degrees (Probe3D's acos((trace(R_a R_b^T) - 1) / 2))."""
    cos = (np.trace(rot_a @ rot_b.T) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _check_navi_split(split: str) -> None:
    if split not in NAVI_SPLITS:
        raise ValueError(f"navi split must be one of {list(NAVI_SPLITS)} (Probe3D's in-the-wild test pairs), "
                         f"got {split!r}")


def _annotations(root: str, obj: str, scene: str) -> dict[str, dict[str, Any]]:
    """<object>/<scene>/annotations.json -> {image id: annotation}."""
    data = json.loads(storage.read_text(storage.join(root, obj, scene, "annotations.json")))
    if not isinstance(data, list):
        raise ValueError(f"navi: {obj}/{scene}/annotations.json must be a list of annotations")
    return {str(a["filename"]).rsplit(".", 1)[0]: a for a in data}


def _navi_partner(key: str, rots: list[np.ndarray], i: int) -> tuple[int, float] | None:
    """Probe3D's partner of image i: uniform among the images of its collection at (0, 120] degrees."""
    angles = np.array([rotation_angle(rots[i], r) for r in rots])
    candidates = np.nonzero((angles > 0) & (angles <= NAVI_MAX_ANGLE))[0]
    if not len(candidates):
        return None
    j = int(np.random.default_rng([NAVI_PAIR_SEED, zlib.crc32(key.encode())]).choice(candidates))
    return j, round(float(angles[j]), 4)


def list_navi(input_url: str, split: str) -> list[list[Any]]:
    """[object, scene, image id, partner id, angle] of Probe3D's test pairs (see the module docstring)."""
    _check_navi_split(split)
    root = navi_root(input_url)
    fs, path = storage.get_fs(root)
    try:
        found = fs.glob(f"{path.rstrip('/')}/*/*/annotations.json")
    except Exception as exc:
        raise storage.describe_error(root, exc) from exc
    scenes: dict[str, set[str]] = {}
    for p in found:
        obj, scene = p.rstrip("/").split("/")[-3:-1]
        scenes.setdefault(obj, set()).add(scene)
    instances: list[tuple[str, str, str]] = []
    rotations: dict[str, tuple[list[str], list[np.ndarray]]] = {}
    for obj in sorted(scenes):
        if NAVI_SCENE not in scenes[obj] or len(scenes[obj]) == 1:  # Probe3D skips such objects
            continue
        annotations = _annotations(root, obj, NAVI_SCENE)
        ids = sorted(i for i in annotations if "_" not in i)  # Probe3D drops ids with "_" (downsampled_, small_)
        rotations[obj] = (ids, [quaternion_matrix(annotations[i]["camera"]["q"]) for i in ids])
        instances += [(obj, NAVI_SCENE, i) for i in ids]
    units = []
    for obj, scene, image in instances[::NAVI_STRIDE]:
        ids, rots = rotations[obj]
        partner = _navi_partner(f"{obj}/{scene}/{image}", rots, ids.index(image))
        if partner is not None:
            units.append([obj, scene, image, ids[partner[0]], partner[1]])
    return units


def navi_files(root: str, obj: str, scene: str, image: str, filename: str) -> tuple[str, str]:
    """(image, depth) paths of one view relative to the NAVI root: Probe3D's downsampled copies when present."""
    base = f"{obj}/{scene}"
    stem = filename.rsplit(".", 1)[0]
    small = f"{base}/images/{DOWNSAMPLED}{filename}"
    if storage.exists(storage.join(root, small)):
        return small, f"{base}/depth/{DOWNSAMPLED}{stem}.png"
    return f"{base}/images/{filename}", f"{base}/depth/{stem}.png"


def _navi_image(data: bytes) -> tuple[str, bytes, tuple[int, int]]:
    """Image bytes as published, turned upright first where EXIF says so (NAVI's phone photos; the annotations
    and depth maps are of the upright image): then stored as a lossless PNG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(0x0112, 1)
            if orientation not in (None, 1):
                rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
                return "rgb.png", codecs.encode_image(rgb, "png"), (rgb.shape[0], rgb.shape[1])
    except Exception:
        raise _Skip("bad_image") from None
    return image_field(data)


def read_navi(input_url: str, split: str, units: list[Any], counts: Counter) -> Iterator[dict[str, Any]]:
    """NAVI pairs: both images, their depth PNGs as published, cameras and annotated sizes."""
    _check_navi_split(split)
    root = navi_root(input_url)
    cache: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for obj, scene, image_a, image_b, angle in units:
        counts["records"] += 1
        try:
            if (obj, scene) not in cache:
                try:
                    cache[obj, scene] = _annotations(root, obj, scene)
                except (ValueError, KeyError, TypeError, storage.StorageError):
                    raise _Skip("bad_json") from None
            views = []
            for image in (image_a, image_b):
                anno = cache[obj, scene].get(image)
                if anno is None or "camera" not in anno or "image_size" not in anno:
                    raise _Skip("bad_record")
                image_rel, depth_rel = navi_files(root, obj, scene, image, str(anno["filename"]))
                name, data, size = _navi_image(_read(storage.join(root, image_rel), "missing_image"))
                depth = _read(storage.join(root, depth_rel), "missing_depth")
                try:
                    codes = codecs.decode_png(depth)
                except Exception:
                    raise _Skip("bad_depth") from None
                if codes.ndim != 2 or codes.dtype != np.uint16:
                    raise _Skip("bad_depth")
                if codes.shape != size:
                    raise _Skip("size_mismatch")
                views.append((anno, image_rel, depth_rel, name, data, size, depth))
        except _Skip as skip:
            counts[skip.reason] += 1
            continue
        counts["samples"] += 1
        (anno_a, rel_a, drel_a, name_a, data_a, size_a, depth_a), (anno_b, rel_b, drel_b, name_b, data_b, size_b,
                                                                   depth_b) = views
        key = f"{obj}/{scene}/{image_a}-{image_b}"
        meta = {"benchmark": "navi", "split": split, "key": key, "object": obj, "scene": scene, "image": image_a,
                "image_b": image_b, "file": rel_a, "file_b": rel_b, "depth_file": drel_a, "depth_file_b": drel_b,
                "size": list(size_a), "size_b": list(size_b), "camera": anno_a["camera"], "camera_b": anno_b["camera"],
                "image_size": list(anno_a["image_size"]), "image_size_b": list(anno_b["image_size"]),
                "angle": angle}
        yield {"__key__": safe_key("navi", key), name_a: data_a, name_b.replace("rgb", "rgb_b"): data_b,
               "navi_depth.png": depth_a, "navi_depth_b.png": depth_b, "json": meta}


def navi_depth(codes: np.ndarray) -> np.ndarray:
    """NAVI depth PNG codes -> depth in metres (float32), 0 where there is no object."""
    codes = np.asarray(codes)
    out = np.zeros(codes.shape, np.float32)
    ok = codes > 0
    out[ok] = NAVI_DEPTH_SCALE / codes[ok].astype(np.float64) / 1000.0
    return out


def navi_focal(camera: dict[str, Any], annotated: list[int] | tuple[int, int], size: tuple[int, int]) -> float:
    """The focal length in pixels of the image as stored: the annotation's (full-size image) scaled by the
    ratio of the shorter sides (Probe3D: orig_fx * min(image_h, image_w) / min(orig_h, orig_w))."""
    return float(camera["focal_length"]) * min(size) / min(int(annotated[0]), int(annotated[1]))


def navi_target(meta: dict[str, Any], codes_a: np.ndarray, codes_b: np.ndarray) -> dict[str, Any]:
    """A prepared / parsed NAVI pair -> the evaluator's target (see versavit.eval.datasets.correspondence)."""
    size_a, size_b = tuple(codes_a.shape), tuple(codes_b.shape)
    return {"key": meta["key"], "kind": "navi", "category": meta["object"],
            "depth": navi_depth(codes_a), "depth_b": navi_depth(codes_b),
            "focal": navi_focal(meta["camera"], meta["image_size"], size_a),
            "focal_b": navi_focal(meta["camera_b"], meta["image_size_b"], size_b),
            "pose": camera_pose(meta["camera"]), "pose_b": camera_pose(meta["camera_b"]),
            "angle": float(meta["angle"]),
            "image_id": f"{meta['object']}/{meta['scene']}/{meta['image']}",
            "image_id_b": f"{meta['object']}/{meta['scene']}/{meta['image_b']}"}


# ------------------------------------------------------------------------------------------ fixtures

SPAIR_FIXTURE_SIZE = 64
SPAIR_FIXTURE_PAIRS = {"test": 4, "val": 2, "trn": 2}
SPAIR_FIXTURE_CATEGORIES = ("aeroplane", "car")
SPAIR_FIXTURE_KEYPOINTS = 6
NAVI_FIXTURE_SIZE = 64
NAVI_FIXTURE_OBJECTS = ("3d_dollhouse_sink", "keywest_pineapple")
NAVI_FIXTURE_VIEWS = 5  # wild_set images per object: pairs from images 0, 4 (object 0) and 3 (object 1)
NAVI_FIXTURE_SCALE = 0.1  # the synthetic world's metres -> NAVI's: toys half a metre from the camera
NAVI_FIXTURE_DOWNSAMPLED = 1  # this object also gets Probe3D's downsampled copies (half size)


def _spair_scene(seed: int, split: str, index: int) -> Any:
    from versavit.data.synthetic import render_sample

    return render_sample(seed, "test" if split == "test" else "val" if split == "val" else "train", index,
                         image_size=SPAIR_FIXTURE_SIZE)


def _spair_crop(seed: int, split: str, index: int) -> tuple[int, int, int, int, bool]:
    """The target of fixture pair `index`: a crop (x0, y0, w, h) of the source, flipped left-right or not, so
    every correspondence is an exact integer pixel and the two images differ in size (SPair's are not square)."""
    rng = np.random.default_rng([seed, 72, list(SPAIR_FIXTURE_PAIRS).index(split), index])
    w = int(rng.integers(40, 57))
    h = int(rng.integers(36, 53))
    x0 = int(rng.integers(0, SPAIR_FIXTURE_SIZE - w + 1))
    y0 = int(rng.integers(0, SPAIR_FIXTURE_SIZE - h + 1))
    return x0, y0, w, h, bool(index % 2)


def _box_of(mask: np.ndarray) -> list[int]:
    mask = mask if mask.any() else np.ones_like(mask)
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def spair_fixture_truth(seed: int, split: str, index: int) -> dict[str, Any]:
    """Fixture pair `index` of `split`: "key", "category", "image" / "image_b" (as rendered, before JPEG),
    "kps" / "kps_b" ([N, 2] int (x, y): target = source mapped exactly), "bbox" / "bbox_b", "src" / "trg"
    (image names), "viewpoint_variation"."""
    scene = _spair_scene(seed, split, index)
    x0, y0, w, h, flip = _spair_crop(seed, split, index)
    image_b = scene.image[y0:y0 + h, x0:x0 + w]
    objects_b = scene.instances[y0:y0 + h, x0:x0 + w] > 0
    if flip:
        image_b, objects_b = image_b[:, ::-1], objects_b[:, ::-1]
    rows, cols = np.nonzero(objects_b if objects_b.any() else np.ones_like(objects_b))
    rng = np.random.default_rng([seed, 73, index])
    pick = rng.choice(len(rows), size=min(SPAIR_FIXTURE_KEYPOINTS, len(rows)), replace=False)
    kps_b = np.stack([cols[pick], rows[pick]], 1).astype(np.int64)
    kps = kps_b.copy()
    kps[:, 0] = (w - 1 - kps_b[:, 0] if flip else kps_b[:, 0]) + x0
    kps[:, 1] = kps_b[:, 1] + y0
    category = SPAIR_FIXTURE_CATEGORIES[index % len(SPAIR_FIXTURE_CATEGORIES)]
    year = {"test": 2008, "val": 2009, "trn": 2010}[split]
    src, trg = f"{year}_{index:06d}", f"{year}_{100 + index:06d}"
    return {"key": f"{index + 1:06d}-{src}-{trg}:{category}", "category": category, "image": scene.image,
            "image_b": np.ascontiguousarray(image_b), "kps": kps, "kps_b": kps_b,
            "bbox": _box_of(scene.instances > 0), "bbox_b": _box_of(objects_b), "src": src, "trg": trg,
            "viewpoint_variation": index % 3}


def write_spair_fixture(folder: Path, seed: int) -> None:
    """SPair-71k/{JPEGImages,ImageAnnotation,Segmentation}/<category>/, PairAnnotation/{trn,val,test}/*.json and
    Layout/large/*.txt: each pair a source image and an exact crop (some flipped) of it as the target."""
    from versavit.data.prepare.benchmarks import _jpg, _png

    root = folder / "SPair-71k"
    class_ids = {c: SPAIR_CATEGORIES.index(c) + 1 for c in SPAIR_CATEGORIES}
    for split, n in SPAIR_FIXTURE_PAIRS.items():
        names = []
        for i in range(n):
            t = spair_fixture_truth(seed, split, i)
            cat = t["category"]
            masks = {"src": _spair_scene(seed, split, i).instances > 0}
            x0, y0, w, h, flip = _spair_crop(seed, split, i)
            masks["trg"] = masks["src"][y0:y0 + h, x0:x0 + w][:, ::-1] if flip else masks["src"][y0:y0 + h, x0:x0 + w]
            for which, image, kps, box in (("src", t["image"], t["kps"], t["bbox"]),
                                           ("trg", t["image_b"], t["kps_b"], t["bbox_b"])):
                name = t[which]
                _jpg(root / "JPEGImages" / cat / f"{name}.jpg", image)
                _png(root / "Segmentation" / cat / f"{name}.png", (masks[which] * class_ids[cat]).astype(np.uint8))
                anno = {"filename": f"{name}.jpg", "src_database": "PASCAL VOC 2012", "src_annotation": "",
                        "src_image": f"{name}.jpg", "image_width": int(image.shape[1]),
                        "image_height": int(image.shape[0]), "image_depth": 3, "category": cat, "pose": "Frontal",
                        "truncated": 0, "occluded": 0, "difficult": 0, "bndbox": box,
                        "kps": {str(k): [int(x), int(y)] for k, (x, y) in enumerate(kps)}}
                path = root / "ImageAnnotation" / cat / f"{name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(anno))
            (h, w), (hb, wb) = t["image"].shape[:2], t["image_b"].shape[:2]
            pair = {"pair_id": i + 1, "filename": t["key"], "src_imname": f"{t['src']}.jpg",
                    "trg_imname": f"{t['trg']}.jpg", "src_imsize": [w, h, 3], "trg_imsize": [wb, hb, 3],
                    "src_bndbox": t["bbox"], "trg_bndbox": t["bbox_b"], "category": cat, "src_pose": "Frontal",
                    "trg_pose": "Frontal", "src_kps": t["kps"].tolist(), "trg_kps": t["kps_b"].tolist(),
                    "kps_ids": [str(k) for k in range(len(t["kps"]))], "mirror": int(flip),
                    "viewpoint_variation": t["viewpoint_variation"], "scale_variation": 0, "truncation": 0,
                    "occlusion": 0}
            path = root / "PairAnnotation" / split / f"{t['key']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(pair))
            names.append(t["key"])
        (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
        (root / "Layout" / "large" / f"{split}.txt").write_text("\n".join(names) + "\n")


def _navi_world(seed: int, obj: int) -> Any:
    """A toy "object" (a cube and a ball standing together) on the synthetic world's floor."""
    from versavit.data.synthetic.render import Camera, Primitive, Scene

    rng = np.random.default_rng([seed, 74, obj])
    colours = rng.uniform(0.2, 0.9, (2, 3))
    objects = (Primitive("cube", float(rng.uniform(-0.35, -0.2)), 3.2, 0.32, 0.64, tuple(colours[0]),
                         float(rng.uniform(0, 1.5))),
               Primitive("ball", float(rng.uniform(0.15, 0.3)), 3.0, 0.28, 0.56, tuple(colours[1])))
    camera = Camera(height=1.6, pitch=0.4, focal=NAVI_FIXTURE_SIZE / 2 / np.tan(np.radians(25)), size=NAVI_FIXTURE_SIZE)
    return Scene(camera=camera, objects=objects, wall_z=9.0, light=(0.36, 0.8, -0.48), ambient=0.35,
                 floor_colors=((0.55, 0.5, 0.45), (0.35, 0.3, 0.28)), tile=0.4,
                 wall_colors=((0.7, 0.72, 0.75), (0.85, 0.86, 0.88)), panel=0.9, noise_seed=seed, noise_std=0.0)


def _navi_view(seed: int, obj: int, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """View `view` of object `obj`: (image, depth in NAVI metres with 0 off the object, object-to-camera pose in
    metres, focal px). Cameras at heights 1.0..2.4 (world units) aim at the object: rotations differ by a few
    to twenty degrees."""
    from versavit.data.synthetic.render import cast_scene, shade

    world = _navi_world(seed, obj)
    height = 1.0 + 1.4 * view / (NAVI_FIXTURE_VIEWS - 1) + 0.05 * obj
    camera = replace(world.camera, height=height, pitch=float(np.arctan2(height - 0.3, 3.1)))
    scene = replace(world, camera=camera)
    geo = cast_scene(scene)
    image = shade(scene, geo)
    depth = np.where(geo.instances > 0, geo.depth * NAVI_FIXTURE_SCALE, 0).astype(np.float32)
    right, up, fwd = camera.axes()
    to_camera = np.stack([right, -up, fwd])  # world -> camera (x right, y down, z forward): a reflection, as the
    # renderer's world (x right, y up, z away) is left-handed; the object frame is the world with z negated
    pose = np.eye(4)
    pose[:3, :3] = to_camera @ np.diag([1.0, 1.0, -1.0])  # a rotation (det +1)
    pose[:3, 3] = -to_camera @ np.array([0.0, height, 0.0]) * NAVI_FIXTURE_SCALE
    return image, depth, pose, float(camera.focal)


def navi_depth_codes(depth_m: np.ndarray) -> np.ndarray:
    """Depth in metres -> NAVI's 16-bit disparity codes (0 where depth is 0)."""
    codes = np.zeros(depth_m.shape, np.uint16)
    ok = depth_m > 0
    codes[ok] = np.clip(np.rint(NAVI_DEPTH_SCALE / (depth_m[ok] * 1000.0)), 1, 65535).astype(np.uint16)
    return codes


def navi_fixture_truth(seed: int, obj: int, view: int) -> dict[str, Any]:
    """View `view` of fixture object `obj`: "image", "depth" (exact metres, 0 off the object), "pose" (object to
    camera, metres), "focal" (px of the full-size image), "object" (its id), "id" (image id)."""
    image, depth, pose, focal = _navi_view(seed, obj, view)
    return {"image": image, "depth": depth, "pose": pose, "focal": focal, "object": NAVI_FIXTURE_OBJECTS[obj],
            "id": f"{view:03d}"}


def write_navi_fixture(folder: Path, seed: int) -> None:
    """navi_v1/<object>/{wild_set, multiview-00-pixel_5}/{annotations.json, images/, depth/, masks/}; the second
    object also has Probe3D's downsampled_ copies (half size: images bicubic, depth nearest)."""
    from versavit.data.prepare.benchmarks import _jpg, _png

    root = folder / "navi_v1"
    for o, obj in enumerate(NAVI_FIXTURE_OBJECTS):
        for scene, views in (("wild_set", range(NAVI_FIXTURE_VIEWS)), ("multiview-00-pixel_5", range(1))):
            annotations = []
            for v in views:
                t = navi_fixture_truth(seed, o, v if scene == "wild_set" else NAVI_FIXTURE_VIEWS - 1)
                name = f"{v:03d}"
                base = root / obj / scene
                codes = navi_depth_codes(t["depth"])
                _jpg(base / "images" / f"{name}.jpg", t["image"])
                _png(base / "depth" / f"{name}.png", codes)
                _png(base / "masks" / f"{name}.png", ((t["depth"] > 0) * 255).astype(np.uint8))
                if o == NAVI_FIXTURE_DOWNSAMPLED:
                    half = NAVI_FIXTURE_SIZE // 2
                    small = np.asarray(Image.fromarray(t["image"]).resize((half, half), Image.BICUBIC))
                    _jpg(base / "images" / f"{DOWNSAMPLED}{name}.jpg", small)
                    _png(base / "depth" / f"{DOWNSAMPLED}{name}.png",
                         np.asarray(Image.fromarray(codes).resize((half, half), Image.NEAREST)).astype(np.uint16))
                annotations.append({
                    "object_id": obj,
                    "camera": {"q": matrix_quaternion(t["pose"][:3, :3]), "t": (t["pose"][:3, 3] * 1000).tolist(),
                               "focal_length": t["focal"], "camera_model": "pixel_5"},
                    "filename": f"{name}.jpg", "filename_original": f"PXL_{o}{v:03d}",
                    "image_size": [NAVI_FIXTURE_SIZE, NAVI_FIXTURE_SIZE], "scene_name": scene,
                    "split": "val" if v % 5 == 4 else "train", "occluded": False})
            (root / obj / scene / "annotations.json").write_text(json.dumps(annotations, indent=1))


# ------------------------------------------------------------------------------------------ the sources

NAVI_SOURCE = Source(
    name="navi", kind="benchmark", tasks=("correspondence",), splits=NAVI_SPLITS,
    about="NAVI v1 (Google; objects with aligned 3D scans): navi_v1.tar.gz (about 16 GB, "
    "https://storage.googleapis.com/gresearch/navi-dataset/navi_v1.0.tar.gz; Probe3D's data_processing/"
    "resize_navi.py may add downsampled_ copies, which are then read); --input is navi_v1/ or the folder holding "
    "it: <object>/<scene>/{annotations.json, images/<id>.jpg, depth/<id>.png (16-bit disparity, "
    "depth mm = 655350 / code)}. Probe3D's test split: the wild_set collections of the objects with another "
    "scene, every fourth image paired with one at (0, 120] degrees (about 570 pairs, ~1 GB of shards from the "
    "downsampled images).",
    list_units=list_navi, read_units=read_navi, write_fixture=write_navi_fixture, units_per_shard=64)

SPAIR_SOURCE = Source(
    name="spair71k", kind="benchmark", tasks=("correspondence",), splits=("test", "val", "trn"),
    about="SPair-71k (semantic keypoint pairs, 18 categories): SPair-71k.tar.gz (about 230 MB, "
    "http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz), extracted; --input is SPair-71k/ or "
    "the folder holding it: JPEGImages/<category>/*.jpg + PairAnnotation/{trn,val,test}/<id>-<src>-<trg>:"
    "<category>.json (src_kps / trg_kps as [x, y], src_bndbox / trg_bndbox as [x1, y1, x2, y2]). 12,234 test / "
    "5,384 val / 53,340 trn pairs; each prepared pair stores both JPEGs (~1.5 GB of shards for test).",
    list_units=list_spair, read_units=read_spair, write_fixture=write_spair_fixture, units_per_shard=256)
