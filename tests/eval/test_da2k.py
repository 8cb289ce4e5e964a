"""DA-2K: the pair-order metric, the published-layout reader (annotations.json schema, (row, col) points), the
`da2k` prepare source and its shard reader, and the evaluator end to end on the tiny export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import eval_config
from PIL import Image

from versavit.data.prepare import SOURCES
from versavit.data.prepare.da2k import (
    FIXTURE_IMAGES,
    FIXTURE_SHAPE,
    MARGIN,
    draw_pairs,
    fixture_truth,
    write_da2k_fixture,
)
from versavit.data.prepare.runner import prepare_dataset
from versavit.data.synthetic import render_sample
from versavit.eval.candidates import baseline_candidate, trained_candidate
from versavit.eval.datasets import DA2K, PreparedDA2K, open_benchmark
from versavit.eval.evaluators import EvalContext, Skipped, get
from versavit.eval.evaluators.da2k import pair_accuracy

SEED = 5


def _depth() -> np.ndarray:
    return render_sample(SEED, "val", 0, image_size=64).depth


# ------------------------------------------------------------------------------------------ the metric


def test_pair_accuracy_perfect_reversed_random() -> None:
    depth = _depth()
    pairs = draw_pairs(depth, np.ones_like(depth, bool), 200, np.random.default_rng(0))
    assert len(pairs) == 200 and {c for _, _, c in pairs} == {0, 1}  # both orders listed
    assert pair_accuracy(depth, pairs, "depth") == 1.0
    assert pair_accuracy(depth.max() + depth.min() - depth, pairs, "depth") == 0.0  # order reversed
    assert pair_accuracy(1.0 / depth, pairs, "disparity") == 1.0  # closer = larger disparity
    assert pair_accuracy(depth, pairs, "disparity") == 0.0  # depth read as disparity: every pair reversed
    assert pair_accuracy(np.full_like(depth, 3.0), pairs, "depth") == 0.0  # a tie orders nothing
    rng = np.random.default_rng(1)
    random = [pair_accuracy(rng.random(depth.shape), pairs, "depth") for _ in range(10)]
    assert abs(np.mean(random) - 0.5) < 0.05 and all(0.3 < a < 0.7 for a in random)
    with pytest.raises(ValueError, match="no pairs"):
        pair_accuracy(depth, [], "depth")
    with pytest.raises(ValueError, match="outside"):
        pair_accuracy(depth, [((0, 0), (64, 3), 0)], "depth")


def test_drawn_pairs_have_a_clear_true_order() -> None:
    depth = _depth()
    valid = np.ones_like(depth, bool)
    valid[:, :20] = False
    pairs = draw_pairs(depth, valid, 50, np.random.default_rng(3))
    assert len(pairs) == 50 and len(set(pairs)) == 50
    for p1, p2, closer in pairs:
        assert valid[p1] and valid[p2]
        near, far = (p1, p2) if closer == 0 else (p2, p1)
        assert depth[far] >= (1 + MARGIN) * depth[near]
    assert draw_pairs(np.full((8, 8), 2.0), np.ones((8, 8), bool), 5, np.random.default_rng(0)) == []  # flat
    again = draw_pairs(depth, valid, 50, np.random.default_rng(3))
    assert again == pairs  # seeded


# ------------------------------------------------------------------------------------------ the reader


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """The fixture in the published layout: <raw>/DA-2K/{annotations.json, images/<scene>/*.jpg}."""
    write_da2k_fixture(tmp_path / "raw", SEED)
    return tmp_path / "raw"


def test_reader_gives_the_fixture_pairs_in_row_col(raw: Path) -> None:
    truths = [fixture_truth(SEED, i) for i in range(FIXTURE_IMAGES)]
    for root in (raw, raw / "DA-2K"):  # the unzip folder or DA-2K/ itself
        reader = DA2K(root)
        assert reader.root == raw / "DA-2K" and len(reader) == FIXTURE_IMAGES and reader.tasks == ("depth-pairs",)
        samples = {t["key"]: (image, t) for image, t in reader}
        assert sorted(samples) == sorted(t["key"] for t in truths)
        for truth in truths:
            image, target = samples[truth["key"]]
            assert image.shape == (*FIXTURE_SHAPE, 3)
            assert target["pairs"] == truth["pairs"] and target["scene"] == truth["scene"]
            # the true depth orders every pair right: points are (row, col) and closer_point is honoured
            assert pair_accuracy(truth["depth"], target["pairs"], "depth") == 1.0
    first = fixture_truth(SEED, 0)
    assert first["pairs"][-1][2] == 1  # the entry listed farther-first, closer_point "point2"
    # read as (x, y) the points would fall outside the 48-row image or land on other pixels
    h = FIXTURE_SHAPE[0]
    assert any(c >= h for t in truths for p1, p2, _ in t["pairs"] for _, c in (p1, p2))
    right = total = 0
    for t in truths:
        swapped = [((c1, r1), (c2, r2), k) for (r1, c1), (r2, c2), k in t["pairs"] if max(c1, c2) < h]
        if swapped:
            right += round(pair_accuracy(t["depth"], swapped, "depth") * len(swapped))
            total += len(swapped)
    assert right < total

    bench = open_benchmark(f"da2k={raw}", str(raw))
    assert isinstance(bench.eval, DA2K) and bench.train is None and bench.eval.split == "test"


def _annotations(raw: Path) -> tuple[Path, dict]:
    path = raw / "DA-2K" / "annotations.json"
    return path, json.loads(path.read_text())


def test_corrupt_annotations_give_a_clear_error(raw: Path) -> None:
    path, good = _annotations(raw)
    key = sorted(good)[0]
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match="annotations.json is not valid JSON"):
        DA2K(raw)
    cases = [
        ({**good[key][0], "closer_point": "point3"}, "closer_point must be 'point1' or 'point2'"),
        ({"point1": good[key][0]["point1"], "closer_point": "point1"}, r"without \['point2'\]"),
        ({**good[key][0], "point2": {"x": 3, "y": 4}}, r"point2 must be \[h, w\]"),
    ]
    for entry, message in cases:
        path.write_text(json.dumps({**good, key: [entry]}))
        with pytest.raises(ValueError, match=message) as info:
            DA2K(raw)
        assert key in str(info.value) and "annotation 0" in str(info.value)  # says where
    path.write_text(json.dumps({**good, key: [{**good[key][0], "point1": [10, 70]}]}))  # w = 70 > 64 columns
    reader = DA2K(raw)
    with pytest.raises(ValueError, match=r"\[10, 70\] lies outside the 48x64 image"):
        list(reader)
    path.write_text(json.dumps({**good, "images/indoor/absent.jpg": good[key]}))
    with pytest.raises(ValueError, match="1 image\\(s\\) named in annotations.json are missing"):
        DA2K(raw)
    path.write_text(json.dumps([good]))
    with pytest.raises(ValueError, match="must be a JSON object"):
        DA2K(raw)


# ------------------------------------------------------------------------------------------ prepare


def test_prepare_and_read_back(raw: Path, tmp_path: Path) -> None:
    summary = prepare_dataset("da2k", str(raw), str(tmp_path / "bench"), units_per_shard=2)
    assert summary["counts"] == {"records": FIXTURE_IMAGES, "samples": FIXTURE_IMAGES} and summary["corrupt"] == 0
    published = {t["key"]: (image, t) for image, t in DA2K(raw)}
    for root, kind in ((tmp_path / "bench", "one split"), (tmp_path / "splits", "<split>/")):
        if kind == "<split>/":
            prepare_dataset("da2k", str(raw), str(tmp_path / "splits" / "test"), "test")
        bench = open_benchmark(f"da2k={root}", str(tmp_path))
        assert isinstance(bench.eval, PreparedDA2K) and bench.train is None and len(bench.eval) == FIXTURE_IMAGES
        samples = list(bench.eval)
        assert len(samples) == FIXTURE_IMAGES
        for image, target in samples:
            image2, target2 = published[target["key"]]
            assert (image == image2).all()  # JPEG bytes as published
            assert target["pairs"] == target2["pairs"] == fixture_truth(SEED, int(target["key"][-8:-4]))["pairs"]
            assert target["scene"] == target2["scene"]


def test_prepare_skips_and_counts_bad_inputs(raw: Path, tmp_path: Path) -> None:
    path, good = _annotations(raw)
    keys = sorted(good)
    good[keys[0]][0]["closer_point"] = "both"  # malformed: the image's pairs cannot be read
    good[keys[1]][0]["point1"] = [100, 10]  # outside the 48-row image
    path.write_text(json.dumps(good))
    (raw / "DA-2K" / keys[2]).write_bytes(b"\xff\xd8 not a jpeg")
    summary = prepare_dataset("da2k", str(raw), str(tmp_path / "out"))
    assert summary["counts"] == {"records": 3, "samples": 0, "bad_record": 2, "bad_image": 1}
    assert summary["corrupt"] == 3
    assert SOURCES["da2k"].splits == ("test",) and "681 MB" in SOURCES["da2k"].about


# ------------------------------------------------------------------------------------------ the evaluator


def _ctx(eval_run: Path, tmp_path: Path, *extra: str) -> EvalContext:
    cfg = eval_config(eval_run, "eval.da2k={resolution: 56, pairs_per_image: 8}", *extra)
    return EvalContext(cfg, tmp_path / "cache", tmp_path / "out", device="cpu")


def test_evaluator_end_to_end(eval_run: Path, tmp_path: Path, raw: Path) -> None:
    ctx = _ctx(eval_run, tmp_path)
    evaluator = get("da2k")(ctx)
    assert (evaluator.name, evaluator.needs_heads, evaluator.kind) == ("da2k", ("depth",), "inference")
    trained = trained_candidate(ctx.cfg)
    synthetic = open_benchmark("synthetic", ctx.cfg.workdir, with_train=False)
    da2k = open_benchmark(f"da2k={raw}", ctx.cfg.workdir)
    assert evaluator.applies_to(synthetic) and evaluator.applies_to(da2k)

    result = evaluator.run(trained, synthetic)  # pairs drawn from the world's exact depth
    acc = result.value("accuracy")
    assert 0.0 <= acc <= 1.0 and result.artifacts["pairs"] == 8 * len(synthetic.eval)
    assert result.metrics[0].spec.label == "pair accuracy" and "drawn" in result.notes[0]
    assert result.artifacts["space"] in ("depth", "disparity")
    again = evaluator.run(trained, synthetic)
    assert again.value("accuracy") == acc  # seeded pairs, deterministic head

    # the space matters: the same head read in the other space orders every (untied) pair the other way
    flipped = tmp_path / "flipped"
    shutil.copytree(trained.export, flipped)
    meta = json.loads((flipped / "versavit.json").read_text())
    meta["depth_target"] = "disparity" if result.artifacts["space"] == "depth" else "depth"
    (flipped / "versavit.json").write_text(json.dumps(meta))
    other = evaluator.run(type(trained)("flipped", str(flipped), export=flipped, heads=trained.heads), synthetic)
    assert other.value("accuracy") == pytest.approx(1.0 - acc)
    for mine, theirs in zip(result.artifacts["examples"], other.artifacts["examples"], strict=True):
        assert mine["pairs"] == theirs["pairs"] and [not ok for ok in mine["correct"]] == theirs["correct"]

    on_da2k = evaluator.run(trained, da2k)  # annotated pairs, per scene too
    n = sum(len(fixture_truth(SEED, i)["pairs"]) for i in range(FIXTURE_IMAGES))
    assert on_da2k.artifacts["pairs"] == n and 0.0 <= on_da2k.value("accuracy") <= 1.0
    assert {m.name for m in on_da2k.metrics} == {"accuracy", "accuracy_indoor", "accuracy_outdoor", "accuracy_object"}
    assert "annotated" in on_da2k.notes[0]

    with pytest.raises(Skipped, match="no depth head"):
        evaluator.run(baseline_candidate(ctx.cfg), synthetic)  # a bare backbone

    ctx.out_dir.mkdir(parents=True)
    figure = evaluator.figure([result, other], ctx.out_dir / "da2k_synthetic.png")
    assert figure is not None and figure.stat().st_size > 5000
    assert evaluator.figure([], ctx.out_dir / "none.png") is None
    assert "56 px" in evaluator.protocol_note() and evaluator.settings()["pairs_per_image"] == 8


class _RedOracle(torch.nn.Module):
    """A stand-in multi-task model whose "depth head" returns the input's red channel: the evaluator's resizing
    (image -> R x R -> image size), point reading and space handling are all that stand between it and the truth."""

    depth_layers = [0]

    def __init__(self) -> None:
        super().__init__()
        self.heads = {"depth": lambda feats, size: F.interpolate(feats[0], size=size, mode="bilinear")[:, 0]}

    def backbone(self, x: torch.Tensor, layers: list[int]) -> SimpleNamespace:
        assert x.shape[-2:] == (56, 56)  # eval.da2k.resolution
        return SimpleNamespace(layers={0: x[:, :1]})


def test_evaluator_orders_pairs_of_a_perfect_predictor(eval_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Images whose red channel is a depth (or disparity) map, pairs of that map in DA-2K's layout: read in
    the right space the red channel orders every pair right, read in the other space none."""
    import versavit.eval.evaluators.da2k as module

    h, w = 40, 72
    rows, cols = np.mgrid[0:h, 0:w]
    # metres: smooth (it survives the resizing) but not monotonic, so reading another pixel changes the order
    depth = (3.0 + np.sin(3 * np.pi * rows / h) + np.cos(2 * np.pi * cols / w)).astype(np.float32)
    rng = np.random.default_rng(0)
    root = tmp_path / "DA-2K"
    annotations = {}
    for i in range(3):
        pairs = draw_pairs(depth, np.ones_like(depth, bool), 6, rng, margin=0.3)
        annotations[f"images/indoor/{i}.png"] = [
            {"point1": list(p1), "point2": list(p2), "closer_point": "point1" if k == 0 else "point2"}
            for p1, p2, k in pairs]
    (root / "annotations.json").parent.mkdir(parents=True)
    (root / "annotations.json").write_text(json.dumps(annotations))
    ctx = _ctx(eval_run, tmp_path)
    evaluator = get("da2k")(ctx)
    trained = trained_candidate(ctx.cfg)
    monkeypatch.setattr(module, "load_multitask", lambda cand, cfg, heads: _RedOracle())
    for red_is, space, expected in (("depth", "depth", 1.0), ("disparity", "disparity", 1.0),
                                    ("depth", "disparity", 0.0)):
        values = depth if red_is == "depth" else 1.0 / depth
        red = np.round(30 + 200 * (values - values.min()) / (values.max() - values.min())).astype(np.uint8)
        for key in annotations:
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([red, red // 2, red // 3], -1)).save(root / key)
        monkeypatch.setattr(module, "depth_space", lambda cand, model, s=space: s)
        result = evaluator.run(trained, open_benchmark(f"da2k={tmp_path}", ctx.cfg.workdir))
        assert result.value("accuracy") == expected and result.artifacts["pairs"] == 18, (red_is, space)
