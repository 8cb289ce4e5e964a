"""Scene sampling and the scene's language: referring expressions, captions and QA.

Every text is generated from, and checked against, the same object records that
`resolve_expression` evaluates, so expressions are unique and answers are true by construction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from versavit.data.synthetic.render import CLASSES, SHAPES, Camera, Primitive, Scene, cast_scene, shade

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
SIZES: tuple[str, ...] = ("small", "large")
IGNORE_INDEX = 255
SPLITS: tuple[str, ...] = ("train", "val", "test")  # index = split code in the rng seed
RELATIONS: tuple[str, ...] = ("left of", "right of", "in front of", "behind")
LR_MARGIN = 0.08  # left/right needs centres this fraction of the image width apart
DEPTH_MARGIN = 0.5  # in front of/behind needs centre depths this many metres apart
MIN_AREA_FRACTION = 0.004  # every object keeps at least this much of the image visible

_PALETTE = {
    "red": (0.80, 0.12, 0.10), "green": (0.12, 0.62, 0.20), "blue": (0.12, 0.28, 0.85),
    "yellow": (0.92, 0.82, 0.12), "purple": (0.52, 0.18, 0.70), "orange": (0.95, 0.48, 0.08),
    "cyan": (0.10, 0.78, 0.82),
}
# (radius, height) in metres; large is ~1.8x small so sizes differ clearly at any depth.
_DIMS = {
    ("ball", "small"): (0.30, 0.60), ("ball", "large"): (0.55, 1.10),
    ("cube", "small"): (0.27, 0.54), ("cube", "large"): (0.50, 1.00),
    ("cylinder", "small"): (0.24, 0.65), ("cylinder", "large"): (0.45, 1.20),
}
# Attribute descriptions, shortest first.
_LEVELS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
_NUMBERS = ("no", "a", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_MAX_ATTEMPTS = 500

__all__ = ["CLASSES", "COLORS", "DEPTH_MARGIN", "IGNORE_INDEX", "LR_MARGIN", "MIN_AREA_FRACTION", "RELATIONS",
           "SHAPES", "SIZES", "SPLITS", "SceneSample", "render_sample", "resolve_expression"]


@dataclass
class SceneSample:
    """One rendered scene with all of its annotations."""

    key: str
    image: np.ndarray  # [H, W, 3] uint8 RGB
    depth: np.ndarray  # [H, W] float32 z-depth, metres
    instances: np.ndarray  # [H, W] uint16, 0 = floor/wall, k = objects[k - 1]
    semantic: np.ndarray  # [H, W] uint8 ids into CLASSES
    objects: list[dict]
    caption: str
    qa: list[dict]


# --------------------------------------------------------------------------- language


def _relation_holds(rel: str, a: dict, b: dict) -> bool:
    ua, ub = a["center_uv"][0], b["center_uv"][0]
    da, db = a["center_depth"], b["center_depth"]
    return {"left of": ua < ub - LR_MARGIN, "right of": ua > ub + LR_MARGIN,
            "in front of": da < db - DEPTH_MARGIN, "behind": da > db + DEPTH_MARGIN}[rel]


def _parse_description(text: str) -> dict[str, str]:
    """'the small blue cube' -> {'size': 'small', 'color': 'blue', 'shape': 'cube'}; noun 'object' = any."""
    words = text.split()
    if len(words) < 2 or words[0] != "the":
        raise ValueError(f"cannot parse description {text!r}")
    spec: dict[str, str] = {}
    if words[-1] != "object":
        if words[-1] not in SHAPES:
            raise ValueError(f"unknown shape {words[-1]!r} in {text!r}")
        spec["shape"] = words[-1]
    for w in words[1:-1]:
        key = "size" if w in SIZES else "color" if w in COLORS else None
        if key is None or key in spec:
            raise ValueError(f"unexpected word {w!r} in {text!r}")
        spec[key] = w
    return spec


def resolve_expression(expression: str, objects: list[dict]) -> list[int]:
    """Ids of ALL objects an expression of the scene grammar matches.

    Grammar: 'the [size] [color] (shape|object) [(left of|right of|in front of|behind) the [size]
    [color] shape]'. The relation holds if some other object matching the anchor satisfies it, using
    the same margins as generation (LR_MARGIN on `center_uv`, DEPTH_MARGIN on `center_depth`).
    """
    text = expression.strip().lower().rstrip("?.")
    relation = anchor_text = None
    for rel in RELATIONS:
        head, sep, tail = text.partition(f" {rel} the ")
        if sep:
            text, relation, anchor_text = head, rel, "the " + tail
            break
    spec = _parse_description(text)
    matches = [o for o in objects if all(o[k] == v for k, v in spec.items())]
    if relation is not None:
        aspec = _parse_description(anchor_text)
        anchors = [o for o in objects if all(o[k] == v for k, v in aspec.items())]
        matches = [o for o in matches
                   if any(a["id"] != o["id"] and _relation_holds(relation, o, a) for a in anchors)]
    return [o["id"] for o in matches]


def _describe(obj: dict, attrs: tuple[str, ...], noun: str | None = None) -> str:
    mods = [obj[k] for k in ("size", "color") if k in attrs]
    return " ".join(["the", *mods, noun or obj["shape"]])


def _unique(obj: dict, objects: list[dict], levels=_LEVELS, noun: str | None = None) -> str | None:
    """Shortest attribute description that picks out `obj` alone, if any."""
    for attrs in levels:
        desc = _describe(obj, attrs, noun)
        if resolve_expression(desc, objects) == [obj["id"]]:
            return desc
    return None


def _relational(obj: dict, objects: list[dict], anchors: dict[int, str], levels=_LEVELS) -> list[str]:
    """All unique '<target> <relation> <anchor>' expressions for `obj` (shortest target per pair)."""
    found = []
    for aid, adesc in anchors.items():
        other = objects[aid - 1]
        for rel in RELATIONS:
            if aid == obj["id"] or not _relation_holds(rel, obj, other):
                continue
            for attrs in levels:
                expr = f"{_describe(obj, attrs)} {rel} {adesc}"
                if resolve_expression(expr, objects) == [obj["id"]]:
                    found.append(expr)
                    break
    return found


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _caption(objects: list[dict], anchors: dict[int, str], rng: np.random.Generator) -> str | None:
    groups = Counter((o["size"], o["color"], o["shape"]) for o in objects)
    items = [f"{_NUMBERS[c] if c < len(_NUMBERS) else c} {s} {col} {sh}{'s' if c > 1 else ''}"
             for (s, col, sh), c in groups.items()]
    n = len(objects)
    text = f"A room with {n} object{'s' if n > 1 else ''}: {_join(items)}."
    by_depth = sorted(objects, key=lambda o: o["center_depth"])
    facts = []
    extremes = (("closest", by_depth[0], by_depth[1:]), ("farthest", by_depth[-1], by_depth[:-1]))
    for name, first, rest in extremes:
        if all(abs(first["center_depth"] - o["center_depth"]) > DEPTH_MARGIN for o in rest):
            facts.append(f"{first['expression'].capitalize()} is the {name} object.")
    pairs = [f"{anchors[a].capitalize()} is {rel} {anchors[b]}." for a in anchors for b in anchors
             for rel in RELATIONS if a != b and _relation_holds(rel, objects[a - 1], objects[b - 1])]
    if pairs:
        facts.append(pairs[rng.integers(len(pairs))])
    if not facts:
        return None  # no spatial fact is safely true: let the caller resample
    keep = rng.permutation(len(facts))[: rng.integers(1, 3)]
    return " ".join([text] + [facts[i] for i in sorted(keep)])


def _questions(objects: list[dict], anchors: dict[int, str], rng: np.random.Generator) -> list[dict]:
    """3-5 QA pairs mixing count, color, shape and spatial questions."""
    qa: dict[str, list[tuple[str, str]]] = {"count": [], "color": [], "shape": [], "spatial": []}
    for shape in SHAPES:
        qa["count"].append((f"How many {shape}s are there?", str(sum(o["shape"] == shape for o in objects))))
    absent = [c for c in COLORS if all(o["color"] != c for o in objects)]
    colors = sorted({o["color"] for o in objects}) + absent[: rng.integers(0, 2)]  # sometimes "0"
    for word in [*colors, *SIZES]:
        key = "size" if word in SIZES else "color"
        qa["count"].append((f"How many {word} objects are there?", str(sum(o[key] == word for o in objects))))
    no_color = (("shape",), ("size", "shape"))  # asking "what color is the red ball?" teaches nothing
    for o in objects:
        descs = [d for d in [_unique(o, objects, no_color)] if d] + _relational(o, objects, anchors, no_color)
        if descs:
            qa["color"].append((f"What color is {descs[rng.integers(len(descs))]}?", o["color"]))
        desc = _unique(o, objects, (("color",), ("size", "color")), noun="object")
        if desc:
            qa["shape"].append((f"What shape is {desc}?", o["shape"]))
    for a in anchors:
        for b in anchors:
            for rel, opposite in (("left of", "right of"), ("in front of", "behind")):
                oa, ob = objects[a - 1], objects[b - 1]
                if a < b and (_relation_holds(rel, oa, ob) or _relation_holds(opposite, oa, ob)):
                    ask = rel if rng.random() < 0.5 else opposite
                    answer = "yes" if _relation_holds(ask, oa, ob) else "no"
                    qa["spatial"].append((f"Is {anchors[a]} {ask} {anchors[b]}?", answer))
    n_questions = int(rng.integers(3, 6))
    kinds = [k for k in rng.permutation(list(qa)) if qa[k]]
    pools = {k: [qa[k][i] for i in rng.permutation(len(qa[k]))] for k in kinds}
    out: list[dict] = []
    while len(out) < n_questions and any(pools.values()):
        for kind in kinds:  # round robin so that every available kind appears
            if pools[kind] and len(out) < n_questions:
                q, a = pools[kind].pop()
                out.append({"question": q, "answer": a, "kind": str(kind)})
    return out


def _language(objects: list[dict], rng: np.random.Generator) -> tuple[str, list[dict]] | None:
    """Fill in referring expressions; return (caption, qa), or None when some object has no unique one."""
    anchors = {o["id"]: d for o in objects if (d := _unique(o, objects))}
    for o in objects:
        rel = _relational(o, objects, anchors)
        attr = anchors.get(o["id"])
        if attr and (not rel or rng.random() >= 0.3):  # relations also for variety, 30% of the time
            o["expression"] = attr
        elif rel:
            o["expression"] = rel[rng.integers(len(rel))]
        else:
            return None
    caption = _caption(objects, anchors, rng)
    return None if caption is None else (caption, _questions(objects, anchors, rng))


# --------------------------------------------------------------------------- scene sampling


Attrs = list[tuple[str, str, str]]  # (shape, color, size) per object


def _sample_scene(rng: np.random.Generator, size: int, n: int) -> tuple[Scene, Attrs] | None:
    """Jittered camera/light/background and n non-intersecting objects; None if placement failed."""
    fov = np.deg2rad(rng.uniform(50, 60))
    cam = Camera(height=rng.uniform(1.5, 1.9), pitch=np.deg2rad(rng.uniform(18, 26)),
                 focal=size / 2 / np.tan(fov / 2), size=size)
    wall_z = rng.uniform(8.5, 10.0)
    # Nearest visible floor depth along the bottom image edge bounds how close objects may stand.
    _, dy, dz = cam.rays()
    z_near = cam.height / -dy[-1, 0] * dz[-1, 0]

    attrs = [(SHAPES[rng.integers(3)], COLORS[rng.integers(len(COLORS))], SIZES[rng.integers(2)])
             for _ in range(n)]
    if n > 1 and rng.random() < 0.25:  # duplicates force relational expressions
        attrs[rng.integers(1, n)] = attrs[0]
    objects: list[Primitive] = []
    for shape, color, sz in attrs:
        radius, height = _DIMS[shape, sz]
        foot = radius * np.sqrt(2) if shape == "cube" else radius
        for _ in range(100):
            z = rng.uniform(z_near + foot + 0.3, min(wall_z - 1.5, 6.8))
            # Half-width of the view at the object's base, so that its centre lands in the image.
            depth = cam.height * np.sin(cam.pitch) + z * np.cos(cam.pitch)
            x = rng.uniform(-1, 1) * 0.85 * depth * (size / 2) / cam.focal
            if all(np.hypot(x - p.x, z - p.z) > foot + p.footprint + 0.15 for p in objects):
                break
        else:
            return None
        rgb = np.clip(np.asarray(_PALETTE[color]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
        yaw = rng.uniform(0, np.pi / 2) if shape == "cube" else 0.0
        objects.append(Primitive(shape, float(x), float(z), radius, height, tuple(rgb), yaw))

    az, el = rng.uniform(-1.0, 1.0), rng.uniform(0.6, 1.1)
    light = (np.sin(az) * np.cos(el), np.sin(el), -np.cos(az) * np.cos(el))  # from the camera side
    tone = rng.uniform(0.45, 0.7) * np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.05, 0.05, 3)
    floor = (tuple(np.clip(tone * rng.uniform(1.15, 1.3), 0, 1)),
             tuple(np.clip(tone * rng.uniform(0.7, 0.85), 0, 1)))
    wall_lo = rng.uniform(0.55, 0.8) + rng.uniform(-0.06, 0.06, 3)
    wall_hi = np.clip(wall_lo + rng.uniform(-0.25, 0.15, 3), 0.2, 0.95)
    scene = Scene(cam, tuple(objects), wall_z, light, rng.uniform(0.3, 0.45), floor, rng.uniform(0.45, 0.8),
                  (tuple(wall_lo), tuple(wall_hi)), rng.uniform(0.8, 1.5), int(rng.integers(2**31)))
    return scene, attrs


def _object_records(scene: Scene, instances: np.ndarray, attrs: Attrs) -> list[dict] | None:
    """Per-object annotations from the instance map; None if an object is not visible enough."""
    size = scene.camera.size
    counts = np.bincount(instances.ravel(), minlength=len(attrs) + 1)
    if counts[1:].min() < MIN_AREA_FRACTION * size * size:
        return None
    centers = np.stack([p.center for p in scene.objects])
    u, v, z = scene.camera.project(centers)
    records = []
    for k, (shape, color, sz) in enumerate(attrs, 1):
        rows, cols = np.nonzero((instances == k).any(1))[0], np.nonzero((instances == k).any(0))[0]
        records.append({
            "id": k, "shape": shape, "color": color, "size": sz, "expression": "",
            "bbox": [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1],
            "area": int(counts[k]),
            "center_depth": round(float(z[k - 1]), 3),
            "center_xy": [round(float(u[k - 1]), 2), round(float(v[k - 1]), 2)],
            # Resolution-free centre: relations use it so that resolve_expression needs no image size.
            "center_uv": [round(float(u[k - 1]) / size, 4), round(float(v[k - 1]) / size, 4)],
        })
    return records


def render_sample(seed: int, split: str, index: int, image_size: int = 224,
                  min_objects: int = 3, max_objects: int = 6) -> SceneSample:
    """Render scene `index` of `split`; depends only on the arguments (byte-identical on repeat)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    n = int(rng.integers(min_objects, max_objects + 1))
    for _ in range(_MAX_ATTEMPTS):
        sampled = _sample_scene(rng, image_size, n)
        if sampled is None:
            continue
        scene, attrs = sampled
        geo = cast_scene(scene)
        objects = _object_records(scene, geo.instances, attrs)
        language = None if objects is None else _language(objects, rng)
        if language is None:
            continue
        caption, qa = language
        return SceneSample(f"{split}-{index:08d}", shade(scene, geo), geo.depth, geo.instances,
                           geo.semantic, objects, caption, qa)
    raise RuntimeError(f"could not sample a valid scene with {n} objects at {image_size}px")


