"""The `correspondence` evaluator (Probe3D protocol, paper Table 8): the recall measure, keypoint transfer and NAVI's
dense ratio-test matching on features with known answers (position-encoding features find the truth, shuffled ones
score at chance), the exact synthetic warp, the NAVI and SPair-71k readers on their fixtures (published layout and
prepared shards), and the evaluator end to end on the tiny backbones of the synthetic world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_helpers import prepare_split
from eval_helpers import eval_config
from PIL import Image
from pydantic import ValidationError

from versavit.config.schema import CorrespondenceConfig
from versavit.data.prepare import SOURCES
from versavit.data.prepare.correspondence import (
    NAVI_FIXTURE_DOWNSAMPLED,
    NAVI_FIXTURE_OBJECTS,
    NAVI_FIXTURE_SIZE,
    SPAIR_FIXTURE_PAIRS,
    list_navi,
    matrix_quaternion,
    navi_fixture_truth,
    quaternion_matrix,
    rotation_angle,
    spair_fixture_truth,
)
from versavit.data.prepare.runner import prepare_dataset
from versavit.eval.candidates import baseline_candidate, trained_candidate
from versavit.eval.datasets import NAVI, Benchmark, PreparedPairs, SPair, open_benchmark
from versavit.eval.evaluators import EvalContext, get
from versavit.eval.evaluators.correspondence import (
    back_project,
    correspondence_recall,
    dense_matches,
    match_keypoints,
    navi_view,
    warp_pair,
)

SEED = 3
SIZE = 64


# ------------------------------------------------------------------------------------------ the measure


def test_recall_counts_points_within_each_threshold_of_the_normaliser() -> None:
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 100, (50, 2))
    assert correspondence_recall(gt, gt, [0.01, 0.05, 0.1]) == {0.01: 1.0, 0.05: 1.0, 0.1: 1.0}
    # every prediction 3 px off, normaliser 50 px: error 0.06 of it
    off = gt + np.array([3.0, 0.0])
    assert correspondence_recall(off, gt, [0.05, 0.1], 50.0) == {0.05: 0.0, 0.1: 1.0}
    # a normaliser per point: half the points are judged against a box twice as large
    norm = np.where(np.arange(50) < 25, 50.0, 100.0)
    assert correspondence_recall(off, gt, [0.05], norm) == {0.05: 0.5}
    # 3D points in metres (NAVI)
    assert correspondence_recall(np.zeros((4, 3)), np.array([[0, 0, 0.005], [0, 0.015, 0], [0.03, 0, 0],
                                                            [0, 0, 0.1]]), [0.01, 0.02, 0.05]) == \
        {0.01: 0.25, 0.02: 0.5, 0.05: 0.75}
    with pytest.raises(ValueError, match="differ"):
        correspondence_recall(np.zeros((3, 2)), np.zeros((4, 2)), [0.1])


# ------------------------------------------------------------------------------------------ matching


def fourier(points: np.ndarray, dim: int = 256, bandwidth: float = 0.15, seed: int = 0) -> np.ndarray:
    """Features that encode position: random Fourier features of [N, k] points (fixed frequencies, so the same
    point always gets the same vector, and near points similar ones)."""
    rng = np.random.default_rng(seed)
    freq = rng.standard_normal((points.shape[1], dim // 2)) * bandwidth
    phase = points @ freq
    return np.concatenate([np.cos(phase), np.sin(phase)], 1).astype(np.float32)


def cell_centres(grid: int, size: int) -> np.ndarray:
    """(x, y) centres of a grid x grid map over a size x size image, row-major."""
    c = (np.arange(grid) + 0.5) * size / grid
    xs, ys = np.meshgrid(c, c)
    return np.stack([xs.ravel(), ys.ravel()], 1)


def warped_features(grid: int = 32, flip: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A's features encode A's positions; B is a crop (x0, y0, 40 x 44 px) of A resized to 64 x 64 and flipped:
    B's cell features are A's at the position each B cell shows. Returns (feat_a, feat_b, kps_a, kps_b) with
    keypoints in continuous pixels."""
    x0, y0, cw, ch = 10.0, 6.0, 40.0, 44.0

    def to_a(q: np.ndarray) -> np.ndarray:
        x = SIZE - q[:, 0] if flip else q[:, 0]
        return np.stack([x * cw / SIZE + x0, q[:, 1] * ch / SIZE + y0], 1)

    centres = cell_centres(grid, SIZE)
    feat_a = fourier(centres).T.reshape(-1, grid, grid)
    feat_b = fourier(to_a(centres)).T.reshape(-1, grid, grid)
    rng = np.random.default_rng(1)
    kps_b = rng.uniform(2, SIZE - 2, (200, 2))
    return feat_a, feat_b, to_a(kps_b), kps_b


def test_position_features_transfer_keypoints_and_shuffled_ones_score_at_chance() -> None:
    feat_a, feat_b, kps_a, kps_b = warped_features()
    pred = match_keypoints(feat_a, feat_b, kps_a, (SIZE, SIZE), (SIZE, SIZE))
    perfect = correspondence_recall(pred, kps_b, [0.05, 0.1], SIZE)
    assert perfect[0.05] >= 0.95 and perfect[0.1] == 1.0, perfect
    # the same features with B's cells shuffled: a match lands within 0.1 x 64 px by chance only (~3 %)
    d, h, w = feat_b.shape
    shuffled = feat_b.reshape(d, -1)[:, np.random.default_rng(2).permutation(h * w)].reshape(d, h, w)
    chance = correspondence_recall(match_keypoints(feat_a, shuffled, kps_a, (SIZE, SIZE), (SIZE, SIZE)), kps_b,
                                   [0.1], SIZE)
    assert chance[0.1] < 0.15, chance
    # predictions are patch centres in the target's pixels: a 32-cell map over a 128 px target has 4 px cells
    pred = match_keypoints(feat_a, feat_b, kps_a, (SIZE, SIZE), (SIZE * 2, SIZE * 2))
    assert np.all(pred % 4 == 2)


def test_match_keypoints_reads_x_as_columns() -> None:
    """A one-hot feature per cell: the keypoint (x=10, y=50) must land on the cell in row 50 // 8, column 10 // 8
    of the target, never on its transpose."""
    grid = 8
    feat = torch.eye(grid * grid).reshape(grid * grid, grid, grid)
    pred = match_keypoints(feat, feat, np.array([[10.0, 50.0]]), (SIZE, SIZE), (SIZE, SIZE))
    assert pred.tolist() == [[12.0, 52.0]]


def test_warp_pair_maps_keypoints_exactly() -> None:
    """An image whose red and green channels are 3 x and 3 y: the warped image, sampled at the mapped keypoints,
    reads back the source keypoints' coordinates (bilinear resizing is exact on linear ramps)."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    image = np.stack([3 * xs + 1.5, 3 * ys + 1.5, np.full_like(xs, 128)], -1).astype(np.uint8)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[20:50, 10:40] = True
    flips = set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        image_b, kps, kps_b = warp_pair(image, mask, rng, 30)
        assert image_b.shape == image.shape and len(kps) == 30
        assert mask[kps[:, 1].astype(int), kps[:, 0].astype(int)].all()  # keypoints on the object, (x, y)
        grid = torch.from_numpy(np.stack([(kps_b[:, 0] + 0.5) / SIZE * 2 - 1, (kps_b[:, 1] + 0.5) / SIZE * 2 - 1],
                                         -1)).float()[None, None]
        sampled = torch.nn.functional.grid_sample(torch.from_numpy(image_b).permute(2, 0, 1)[None].float(), grid,
                                                  align_corners=False, padding_mode="border")[0, :2, 0].T.numpy()
        err = np.abs((sampled - 1.5) / 3 - kps)
        assert np.median(err) < 0.2 and err.max() < 0.75, err.max()
        flips.add(bool(np.corrcoef(kps[:, 0], kps_b[:, 0])[0, 1] < 0))
    assert flips == {True, False}  # both warps exercised


# ------------------------------------------------------------------------------------------ the readers


def test_spair_reader_keypoints_exact(tmp_path: Path) -> None:
    SOURCES["spair71k"].write_fixture(tmp_path, SEED)
    reader = open_benchmark(f"spair={tmp_path}", str(tmp_path)).eval
    assert isinstance(reader, SPair) and reader.split == "test" and len(reader) == SPAIR_FIXTURE_PAIRS["test"]
    truths = {t["key"]: t for t in (spair_fixture_truth(SEED, "test", i) for i in range(len(reader)))}
    categories = []
    for image, target in reader:
        truth = truths[target["key"]]
        categories.append(target["category"])
        assert target["kind"] == "keypoints" and target["category"] == truth["category"]
        assert np.array_equal(target["kps"], truth["kps"]) and np.array_equal(target["kps_b"], truth["kps_b"])
        assert target["kps"].dtype == np.float32 and target["kps"].shape[1] == 2
        x1, y1, x2, y2 = truth["bbox_b"]
        assert target["norm"] == max(x2 - x1, y2 - y1) and target["bbox_b"] == truth["bbox_b"]
        assert image.shape == truth["image"].shape and target["image_b"].shape == truth["image_b"].shape
        assert image.shape[:2] != target["image_b"].shape[:2]  # not square, not equal: padding exercised
        # (x, y) = (column, row): the target pixel at kps_b shows the source pixel at kps (JPEG noise only)
        a = image[target["kps"][:, 1].astype(int), target["kps"][:, 0].astype(int)].astype(float)
        b = target["image_b"][target["kps_b"][:, 1].astype(int), target["kps_b"][:, 0].astype(int)].astype(float)
        hb, wb = target["image_b"].shape[:2]
        swapped = target["image_b"][np.clip(target["kps_b"][:, 0].astype(int), 0, hb - 1),
                                    np.clip(target["kps_b"][:, 1].astype(int), 0, wb - 1)].astype(float)
        assert np.abs(a - b).mean() < 10 < np.abs(a - swapped).mean()
    assert categories == sorted(categories)  # by category, as the evaluator's per-category recall reads them
    assert len(SPair(tmp_path, "val")) == SPAIR_FIXTURE_PAIRS["val"]


def test_navi_reader_depth_cameras_and_pairs(tmp_path: Path) -> None:
    SOURCES["navi"].write_fixture(tmp_path, SEED)
    reader = open_benchmark(f"navi={tmp_path}", str(tmp_path)).eval
    assert isinstance(reader, NAVI)
    # Probe3D's pairs: every 4th wild_set image (5 per object: 000 and 004 of the first, 003 of the second)
    units = list_navi(str(tmp_path), "test")
    assert [(u[0], u[2]) for u in units] == [(NAVI_FIXTURE_OBJECTS[0], "000"), (NAVI_FIXTURE_OBJECTS[0], "004"),
                                             (NAVI_FIXTURE_OBJECTS[1], "003")]
    assert all(0 < u[4] <= 120 and u[2] != u[3] for u in units)
    for (image, target), (obj, _, a, b, angle) in zip(reader, units, strict=True):
        o = NAVI_FIXTURE_OBJECTS.index(obj)
        ta, tb = navi_fixture_truth(SEED, o, int(a)), navi_fixture_truth(SEED, o, int(b))
        assert target["kind"] == "navi" and target["angle"] == angle
        assert rotation_angle(target["pose"][:3, :3], target["pose_b"][:3, :3]) == pytest.approx(angle, abs=1e-3)
        assert np.allclose(target["pose"], ta["pose"], atol=1e-9) and np.allclose(target["pose_b"], tb["pose"])
        if o == NAVI_FIXTURE_DOWNSAMPLED:  # Probe3D's downsampled_ copies are read: half size, half focal
            assert image.shape[:2] == target["depth"].shape == (NAVI_FIXTURE_SIZE // 2,) * 2
            assert target["focal"] == pytest.approx(ta["focal"] / 2)
        else:
            assert image.shape[:2] == target["depth"].shape == (NAVI_FIXTURE_SIZE,) * 2
            assert target["focal"] == pytest.approx(ta["focal"])
            on = ta["depth"] > 0
            assert np.array_equal(target["depth"] > 0, on)
            assert np.abs(target["depth"][on] - ta["depth"][on]).max() < 1e-3  # 16-bit disparity codes
        # the conventions (back-projection, pose direction, principal point): source points moved into the
        # target camera land on target pixels of the same depth
        assert _reprojection_error(target) < 0.003
        wrong = dict(target, pose=target["pose_b"], pose_b=target["pose"])  # the inverse transform
        assert _reprojection_error(wrong) > 3 * _reprojection_error(target)


def _reprojection_error(t: dict) -> float:
    """Median |z| mismatch (metres) of the source's object points projected into the target view."""
    xyz = back_project(t["depth"], t["focal"])
    pts = xyz.reshape(3, -1)[:, t["depth"].ravel() > 0].astype(np.float64)
    rt = t["pose_b"] @ np.linalg.inv(t["pose"])
    q = rt[:3, :3] @ pts + rt[:3, 3:]
    h, w = t["depth_b"].shape
    u = q[0] / q[2] * t["focal_b"] + w / 2
    v = q[1] / q[2] * t["focal_b"] + h / 2
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (q[2] > 0)
    if inside.mean() < 0.5:
        return float("inf")
    z = t["depth_b"][v[inside].astype(int), u[inside].astype(int)]
    return float(np.median(np.abs(z - q[2][inside])))


def test_quaternions_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.standard_normal(4)
        q = q / np.linalg.norm(q) * np.sign(q[0])
        assert np.allclose(matrix_quaternion(quaternion_matrix(q)), q, atol=1e-9)


@pytest.mark.parametrize(("source", "name"), [("spair71k", "spair"), ("navi", "navi")])
def test_prepared_pairs_read_back_like_the_published_layout(source: str, name: str, tmp_path: Path) -> None:
    SOURCES[source].write_fixture(tmp_path / "raw", SEED)
    _, counts = prepare_split(source, str(tmp_path / "raw"), str(tmp_path / "bench" / "test"), "test")
    n = SPAIR_FIXTURE_PAIRS["test"] if name == "spair" else 3
    assert counts == {"records": n, "samples": n}
    prepared = open_benchmark(f"{name}={tmp_path / 'bench'}", str(tmp_path))
    published = open_benchmark(f"{name}={tmp_path / 'raw'}", str(tmp_path))
    assert isinstance(prepared.eval, PreparedPairs) and prepared.train is None and published.train is None
    assert prepared.tasks == published.tasks == ("correspondence",) and len(prepared.eval) == n
    for (image, target), (image2, target2) in zip(prepared.eval, published.eval, strict=True):
        assert np.array_equal(image, image2) and target.keys() == target2.keys()
        for k, v in target.items():
            assert np.array_equal(v, target2[k]) if isinstance(v, np.ndarray) else v == target2[k], k


def test_corrupt_pairs_are_skipped_and_counted(tmp_path: Path) -> None:
    SOURCES["spair71k"].write_fixture(tmp_path, SEED)
    root = tmp_path / "SPair-71k"
    first, second = sorted((root / "PairAnnotation" / "test").glob("*.json"))[:2]
    (root / "JPEGImages" / "aeroplane" / json.loads(first.read_text())["trg_imname"]).unlink()
    second.write_text('{"src_imname": "x.jpg"')
    summary = prepare_dataset("spair71k", str(tmp_path), str(tmp_path / "out"), "test")
    n = SPAIR_FIXTURE_PAIRS["test"]
    assert summary["counts"] == {"records": n, "samples": n - 2, "missing_image": 1, "bad_json": 1}
    SOURCES["navi"].write_fixture(tmp_path / "navi", SEED)
    depth = tmp_path / "navi" / "navi_v1" / NAVI_FIXTURE_OBJECTS[0] / "wild_set" / "depth" / "001.png"
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(depth)  # not the image's size
    summary = prepare_dataset("navi", str(tmp_path / "navi"), str(tmp_path / "navi-out"), "test")
    assert summary["counts"] == {"records": 3, "samples": 2, "size_mismatch": 1}


# ------------------------------------------------------------------------------------------ NAVI matching


def test_navi_matching_with_position_features_finds_the_3d_truth(tmp_path: Path) -> None:
    """Features that encode each pixel's object-frame 3D position: the ratio-test matches land on the nearest 3D
    point; random features do not."""
    SOURCES["navi"].write_fixture(tmp_path, SEED)
    image, t = next(iter(NAVI(tmp_path)))
    grid = 32
    views = [navi_view(image, t["depth"], t["focal"], 56, grid),
             navi_view(t["image_b"], t["depth_b"], t["focal_b"], 56, grid)]
    assert all(v is not None and v.valid.mean() > 0.3 for v in views)  # cropped around the object

    def features(view, pose: np.ndarray) -> np.ndarray:  # noqa: ANN001
        cam = view.xyz.reshape(3, -1).astype(np.float64)
        world = (np.linalg.inv(pose) @ np.vstack([cam, np.ones(cam.shape[1])]))[:3]
        return fourier(world.T, bandwidth=60.0).T.reshape(-1, grid, grid)

    rt = t["pose_b"] @ np.linalg.inv(t["pose"])

    def recall(fa: np.ndarray, fb: np.ndarray) -> dict[float, float]:
        ia, ib, weights = dense_matches(fa, fb, views[0].valid, views[1].valid, 200)
        assert len(ia) == 200 and np.all(np.diff(weights) <= 1e-6)  # the most distinctive first
        assert views[0].valid.ravel()[ia].all() and views[1].valid.ravel()[ib].all()
        pa = views[0].xyz.reshape(3, -1)[:, ia].astype(np.float64)
        pb = views[1].xyz.reshape(3, -1)[:, ib].astype(np.float64)
        return correspondence_recall((rt[:3, :3] @ pa + rt[:3, 3:]).T, pb.T, [0.003, 0.02])

    good = recall(features(views[0], t["pose"]), features(views[1], t["pose_b"]))
    # grid cells are ~5 mm on the object: the nearest feature is the nearest 3D point, within 3 mm
    assert good[0.003] > 0.9 and good[0.02] == 1.0, good
    rng = np.random.default_rng(0)
    bad = recall(rng.standard_normal((64, grid, grid)), rng.standard_normal((64, grid, grid)))
    assert bad[0.02] < 0.5 and bad[0.02] < good[0.02] - 0.4, bad


# ------------------------------------------------------------------------------------------ the evaluator


def _evaluator(workdir: Path, *overrides: str):  # noqa: ANN202
    cfg = eval_config(workdir, "eval.correspondence.resolutions={synthetic: 56, spair: 56, navi: 56}",
                      "tracking.enabled=false", *overrides)
    return get("correspondence")(EvalContext(cfg, workdir / "cache", workdir / "out", "cpu")), cfg


def test_evaluator_on_the_synthetic_world(eval_run: Path, tmp_path: Path) -> None:
    ev, cfg = _evaluator(eval_run)
    assert ev.kind == "inference" and ev.needs_heads == () and next(iter(ev.columns())) == "recall"
    assert next(iter(type(ev).metric_specs)) == "recall"
    bench = open_benchmark("synthetic", str(eval_run), with_train=False)
    assert ev.applies_to(bench)
    assert not ev.applies_to(Benchmark("nyu", "", bench.eval, None, ("depth",)))
    results = []
    for cand in (baseline_candidate(cfg), trained_candidate(cfg)):  # a bare tower and an export with heads
        r = ev.run(cand, bench)
        values = r.as_dict()
        assert {"recall", "recall_05", "recall_10", "recall_15"} <= set(values)
        assert values["recall"] == values["recall_10"]
        assert 0 <= values["recall_05"] <= values["recall_10"] <= values["recall_15"] <= 1
        assert values["pairs"] == 8 and values["points"] == 8 * cfg.eval.correspondence.keypoints_per_pair
        results.append(r)
    again = ev.run(baseline_candidate(cfg), bench)
    assert again.as_dict() == results[0].as_dict()  # seeded warps, deterministic matching
    path = ev.figure(results, tmp_path / "correspondence_synthetic.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 300
    assert "Probe3D" in ev.protocol_note() and ev.settings()["navi_num_corr"] == 1000


def test_evaluator_on_navi_and_spair_fixtures(eval_run: Path, tmp_path: Path) -> None:
    ev, cfg = _evaluator(eval_run, "eval.correspondence.max_pairs=3")
    cand = baseline_candidate(cfg)
    for source, name in (("spair71k", "spair"), ("navi", "navi")):
        SOURCES[source].write_fixture(tmp_path / name, SEED)
        bench = open_benchmark(f"{name}={tmp_path / name}", str(tmp_path))
        assert ev.applies_to(bench)
        r = ev.run(cand, bench)
        values = r.as_dict()
        assert values["pairs"] == 3  # max_pairs
        keys = ("recall_1cm", "recall_2cm", "recall_5cm") if name == "navi" else ("recall_05", "recall_10",
                                                                                   "recall_15")
        assert values["recall"] == values[keys[1]] and all(0 <= values[k] <= 1 for k in keys)
        assert values[keys[0]] <= values[keys[1]] <= values[keys[2]]
        assert ev.figure([r], tmp_path / f"{name}.png").is_file()


def test_resolution_is_rounded_down_to_the_resize_factor(eval_run: Path) -> None:
    ev, cfg = _evaluator(eval_run, "eval.correspondence.resolutions={spair: 900, navi: 20}",
                         "eval.correspondence.default_resolution=100")
    backbone = baseline_candidate(cfg).load_backbone()
    assert (ev.resolution("spair", backbone), ev.resolution("navi", backbone), ev.resolution("x", backbone)) == \
        (896, 28, 84)
    assert CorrespondenceConfig().resolutions == {"navi": 448, "spair": 896, "synthetic": 224}
    with pytest.raises(ValidationError, match="headline_threshold"):
        CorrespondenceConfig(thresholds=[0.05], headline_threshold=0.1)
