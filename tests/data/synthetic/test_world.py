"""The synthetic world: determinism, geometry consistency and truthful language."""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

import numpy as np
import pytest

from versavit.data.synthetic import (
    CLASSES,
    COLORS,
    DEPTH_MARGIN,
    MIN_AREA_FRACTION,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneSample,
    cast_scene,
    render_sample,
    render_scene,
    resolve_expression,
)
from versavit.data.synthetic.scene import _sample_scene

SIZE = 96  # small renders keep the many-scene tests fast
OPPOSITE = {"left of": "right of", "right of": "left of", "in front of": "behind", "behind": "in front of"}


@cache
def scenes(n: int = 40) -> tuple[SceneSample, ...]:
    return tuple(render_sample(3, "train", i, image_size=SIZE) for i in range(n))


def test_determinism() -> None:
    a, b = render_sample(0, "val", 5), render_sample(0, "val", 5)
    for field in ("image", "depth", "instances", "semantic"):
        assert getattr(a, field).tobytes() == getattr(b, field).tobytes()
    assert (a.key, a.objects, a.caption, a.qa) == (b.key, b.objects, b.caption, b.qa)
    assert a.key == "val-00000005"
    assert not np.array_equal(a.image, render_sample(0, "val", 6).image)
    assert not np.array_equal(a.image, render_sample(0, "train", 5).image)


def test_fields_shapes_and_ranges() -> None:
    s = render_sample(1, "test", 0, image_size=128, min_objects=2, max_objects=4)
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    assert s.depth.shape == (128, 128) and s.depth.dtype == np.float32
    assert np.isfinite(s.depth).all() and (s.depth > 0).all() and s.depth.max() < 20
    assert s.instances.dtype == np.uint16 and s.semantic.dtype == np.uint8
    assert 2 <= len(s.objects) <= 4
    assert s.instances.max() <= len(s.objects) and s.semantic.max() < len(CLASSES)
    assert set(np.unique(s.instances)) == set(range(len(s.objects) + 1))  # everything visible
    for k, o in enumerate(s.objects, 1):
        assert o["id"] == k and o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES
        assert o["area"] >= MIN_AREA_FRACTION * 128 * 128 and o["center_depth"] > 0
    assert 3 <= len(s.qa) <= 5 and s.caption.startswith(f"A room with {len(s.objects)} objects")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="train"):
        render_sample(0, "training", 0)
    with pytest.raises(ValueError, match="32"):
        render_sample(0, "train", 0, image_size=16)
    with pytest.raises(ValueError):
        render_sample(0, "train", 0, min_objects=4, max_objects=3)


def test_masks_follow_depth_ordering() -> None:
    checked_occlusion = False
    for index in range(6):
        rng = np.random.default_rng(index)
        sampled = None
        while sampled is None:
            sampled = _sample_scene(rng, 80, 6)
        scene = sampled[0]
        image, depth, inst, sem, per_obj = render_scene(scene)
        assert image.shape == (80, 80, 3) and per_obj.shape == (6, 80, 80)
        nearest = per_obj.min(0)
        obj_wins = nearest < cast_scene(scene).background_depth  # an object in front of floor/wall
        assert np.array_equal(inst > 0, obj_wins)
        assert np.array_equal(inst[obj_wins] - 1, per_obj.argmin(0)[obj_wins])
        for k in range(1, 7):
            m = inst == k
            assert np.array_equal(depth[m], per_obj[k - 1][m]) and (per_obj[:, m] >= depth[m]).all()
        # Some object is hit by rays where another one is in front of it: occlusion happens.
        checked_occlusion |= bool(((np.isfinite(per_obj).sum(0) > 1) & obj_wins).any())
    assert checked_occlusion


def test_semantic_agrees_with_instances_and_floor_perspective() -> None:
    for s in scenes()[:10]:
        shape_class = np.array([0] + [CLASSES.index(o["shape"]) for o in s.objects])
        obj = s.instances > 0
        assert np.array_equal(s.semantic[obj], shape_class[s.instances[obj]])
        assert set(np.unique(s.semantic[~obj])) <= {CLASSES.index("floor"), CLASSES.index("wall")}
        floor = (s.semantic == CLASSES.index("floor")) & ~obj
        rows = np.nonzero(floor.any(1))[0]
        top, bottom = rows[:5], rows[-5:]
        assert np.median(s.depth[bottom][floor[bottom]]) < np.median(s.depth[top][floor[top]])
        wall = s.semantic == CLASSES.index("wall")
        assert wall.any() and np.nonzero(wall.any(1))[0].max() < rows.max()  # wall above the floor


def test_bbox_and_area_match_mask() -> None:
    for s in scenes()[:10]:
        for o in s.objects:
            m = s.instances == o["id"]
            ys, xs = np.nonzero(m)
            assert o["area"] == m.sum()
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_referring_expressions_are_unique() -> None:
    relational = duplicates = 0
    for s in scenes():
        for o in s.objects:
            assert resolve_expression(o["expression"], s.objects) == [o["id"]], o["expression"]
            relational += any(f" {r} the " in o["expression"] for r in RELATIONS)
        duplicates += max(Counter((o["size"], o["color"], o["shape"]) for o in s.objects).values()) > 1
    assert relational >= 10 and duplicates >= 3


def test_resolver_semantics() -> None:
    def obj(k: int, shape: str, color: str, size: str, u: float, depth: float) -> dict:
        return {"id": k, "shape": shape, "color": color, "size": size, "center_uv": [u, 0.5],
                "center_depth": depth}

    objs = [obj(1, "ball", "red", "small", 0.2, 3.0), obj(2, "ball", "red", "small", 0.7, 3.2),
            obj(3, "cube", "blue", "large", 0.5, 5.0)]
    assert resolve_expression("the ball", objs) == [1, 2]
    assert resolve_expression("the ball left of the cube", objs) == [1]
    assert resolve_expression("The red ball right of the blue cube?", objs) == [2]
    assert resolve_expression("the ball in front of the cube", objs) == [1, 2]
    assert resolve_expression("the cube behind the ball", objs) == [3]
    assert resolve_expression("the ball behind the ball", objs) == []  # 0.2 m is within the margin
    assert resolve_expression("the large object", objs) == [3]
    with pytest.raises(ValueError):
        resolve_expression("a red thing", objs)


def test_caption_and_qa_are_true() -> None:
    kinds: Counter[str] = Counter()
    for s in scenes():
        objs = s.objects
        assert f"{len(objs)} objects" in s.caption
        for color in {o["color"] for o in objs}:
            assert color in s.caption
        assert 3 <= len(s.qa) <= 5
        for qa in s.qa:
            q, a, kind = qa["question"], qa["answer"], qa["kind"]
            kinds[kind] += 1
            if m := re.fullmatch(r"How many (\w+)s are there\?", q):
                assert kind == "count" and a == str(sum(o["shape"] == m[1] for o in objs))
            elif m := re.fullmatch(r"How many (\w+) objects are there\?", q):
                key = "size" if m[1] in SIZES else "color"
                assert kind == "count" and a == str(sum(o[key] == m[1] for o in objs))
            elif m := re.fullmatch(r"What color is (.+)\?", q):
                (oid,) = resolve_expression(m[1], objs)
                assert kind == "color" and a == objs[oid - 1]["color"]
            elif m := re.fullmatch(r"What shape is (.+)\?", q):
                (oid,) = resolve_expression(m[1], objs)
                assert kind == "shape" and a == objs[oid - 1]["shape"]
            elif m := re.fullmatch(r"Is (.+)\?", q):
                yes = resolve_expression(m[1], objs) != []  # both descriptions are unique
                assert kind == "spatial" and a == ("yes" if yes else "no"), q
                if not yes:  # "no" only when clearly false: the opposite relation holds
                    rel = next(r for r in RELATIONS if f" {r} the " in m[1])
                    assert resolve_expression(m[1].replace(f" {rel} ", f" {OPPOSITE[rel]} "), objs), q
            else:
                raise AssertionError(f"unexpected question {q!r}")
    assert set(kinds) == {"count", "color", "shape", "spatial"}


def test_closest_fact_is_true() -> None:
    seen = 0
    for s in scenes():
        if m := re.search(r"([A-Z][^.]*) is the closest object\.", s.caption):
            (oid,) = resolve_expression(m[1], s.objects)
            depths = sorted(o["center_depth"] for o in s.objects)
            assert s.objects[oid - 1]["center_depth"] == depths[0] and depths[1] - depths[0] > DEPTH_MARGIN
            seen += 1
    assert seen > 0
