"""3D correspondence with frozen final-layer features, the Probe3D protocol (El Banani et al., CVPR 2024; paper
Table 8: NAVI and SPair-71k recall). No head and no training: any backbone is scored, the baseline included.

What Probe3D does (github.com/mbanani/probe3d, read for this module):

- SPair-71k (evaluate_spair_correspondence.py, evals/datasets/spair.py, configs/spair_correspondence.yaml): each
  image padded with white to a square (bottom / right) and resized to the input side; the dense features
  L2-normalised; each source keypoint's feature sampled bilinearly from the source map (grid_sample), compared by
  dot product (cosine) with every patch of the target map, the best patch is the prediction (no upsampling,
  `argmax_2d`); the error, in the normalised image frame, divided by thresh_scale = max(target bbox w, h) /
  max(target image side) (use_bbox=False), i.e. the pixel error over the box's longer side; recall = errors
  < 0.10, per category, then averaged over the 18 categories (the "all" viewpoint column). Here: every pair of
  the split (Probe3D draws 200 per category), the prediction is the patch centre (Probe3D takes its corner:
  half a patch off), the source feature is sampled with the patch-centre convention.
- NAVI (evaluate_navi_correspondence.py, evals/utils/correspondence.py, evals/datasets/navi.py,
  configs/navi_correspondence.yaml): the in-the-wild pairs (versavit.data.prepare.correspondence); each view
  centre-cropped to a square, then cropped to a square around the object (`bbox_crop`) and resized; the pixels'
  3D points (depth back-projected) on a grid of 0.25 x the input side; the features upsampled (bicubic) to that
  grid; on object pixels, each source pixel's two nearest target pixels by cosine distance, weighted by Lowe's
  ratio test (1 - d1 / d2), the 1000 best matches kept; the error is the 3D distance between the source point
  moved into the target camera (Rt_01 = Rt_1 Rt_0^-1) and the matched target point; recall within 1, 2 and 5 cm
  (and 5 / 25 / 50 px, not reported here), 2 cm also binned by the cameras' rotation difference. Here: images
  resized bilinearly (Probe3D: nearest), the 3D points resized with nearest as Probe3D does.

The paper (VersaViT, Table 8) resizes to 448 px for NAVI and 896 px for SPair (`eval.correspondence.resolutions`,
rounded down to the backbone's resize factor) and reports "recall", which is read here as Probe3D's headline
numbers: SPair recall@0.10 (of the target box) and NAVI recall within 2 cm (`navi_headline_m`; Probe3D's paper
figure bins this one by viewpoint) - the `recall` column; every threshold is reported as well.

The synthetic stand-in (the tiny demo's benchmark): each evaluation image and an exact warp of it (a random crop
of 60-90 % of each side resized back, flipped left-right half the time), keypoints drawn on object pixels (the
instance masks) and mapped exactly, seeded by `eval.seed`; scored like SPair with the image side as normaliser.

Metrics (raw fractions): `recall` (the headline, per benchmark as above), `recall_05`, `recall_10`, ... (keypoint
benchmarks: threshold x 100), `recall_1cm`, `recall_2cm`, ... (NAVI), plus per-bin extras (`recall_10_vp0`,
`recall_2cm_0_30deg`, ...) and the counts `pairs` / `points`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from versavit.data.tasks import image_tensor
from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, register

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.config.schema import CorrespondenceConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark, BenchmarkReader, Sample

log = logging.getLogger(__name__)

HEADLINE = MetricSpec("recall")
NAVI_ANGLE_BINS = (0, 30, 60, 90, 120)  # Probe3D's viewpoint bins (degrees) of the 2 cm recall
FIGURE_MATCHES = 40  # lines drawn per pair in the figure
FEATURE_CACHE = 32  # images whose features are kept (SPair reuses each image in many pairs)


# ------------------------------------------------------------------------------------------ metric names


def _number(value: float) -> str:
    return f"{round(value):02d}" if abs(value - round(value)) < 1e-6 else f"{value:g}".replace(".", "p")


def keypoint_metric(threshold: float) -> str:
    """0.10 -> "recall_10" (threshold x 100; MLflow keys allow no "@")."""
    return f"recall_{_number(threshold * 100)}"


def navi_metric(threshold_m: float) -> str:
    """0.02 m -> "recall_2cm"."""
    cm = threshold_m * 100
    return f"recall_{f'{cm:g}'.replace('.', 'p')}cm"


def recall_specs(cfg: CorrespondenceConfig) -> dict[str, MetricSpec]:
    """The report's columns: the headline, then every keypoint and every NAVI threshold."""
    specs = {"recall": HEADLINE}
    specs.update({keypoint_metric(t): MetricSpec(f"recall@{t:.2f}") for t in cfg.thresholds})
    specs.update({navi_metric(t): MetricSpec(f"recall@{t * 100:g}cm") for t in cfg.navi_thresholds_m})
    return specs


# ------------------------------------------------------------------------------------------ the measures


def correspondence_recall(pred: Any, gt: Any, thresholds: Sequence[float], normaliser: Any = 1.0
                          ) -> dict[float, float]:
    """Fraction of predictions whose distance to the truth, divided by `normaliser` (a number, or one per
    point), is below each threshold (Probe3D: `errors < thresh`). pred, gt: [N, k] points (pixels, metres)."""
    pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ")
    if pred.size == 0:
        return {float(t): float("nan") for t in thresholds}
    errors = np.linalg.norm(pred.reshape(len(pred), -1) - gt.reshape(len(gt), -1), axis=1)
    errors = errors / np.asarray(normaliser, np.float64)
    return {float(t): float(np.mean(errors < t)) for t in thresholds}


def _tensor(x: Any) -> torch.Tensor:
    return x.float() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float32)


def sample_features(feat: Any, points: Any, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear samples of a [D, h, w] map at (x, y) points [N, 2] in pixels of the [H, W] image it covers
    (pixel centres at +0.5, each patch covering its share of the image) -> [N, D]."""
    feat, pts = _tensor(feat), _tensor(points).to(_tensor(feat).device)
    h, w = size
    grid = torch.stack([pts[:, 0] / w * 2 - 1, pts[:, 1] / h * 2 - 1], -1)[None, None]
    return F.grid_sample(feat[None], grid, mode="bilinear", align_corners=False)[0, :, 0].T


def match_keypoints(feat_a: Any, feat_b: Any, kps_a: Any, size_a: tuple[int, int], size_b: tuple[int, int]
                    ) -> np.ndarray:
    """Each source keypoint's nearest target patch by cosine similarity (Probe3D's SPair matching).

    feat_a, feat_b: [D, h, w] feature maps of images of sizes size_a, size_b (H, W); kps_a: [N, 2] (x, y) in
    pixels of image a (pixel centres at +0.5). Returns [N, 2] (x, y) in pixels of image b: the centres of the
    best patches."""
    fa, fb = _tensor(feat_a), _tensor(feat_b)
    fb = fb.to(fa.device)
    query = F.normalize(sample_features(fa, kps_a, size_a), dim=1)
    d, h, w = fb.shape
    keys = F.normalize(fb.reshape(d, h * w), dim=0)
    best = (query @ keys).argmax(1).cpu().numpy()
    rows, cols = best // w, best % w
    return np.stack([(cols + 0.5) * size_b[1] / w, (rows + 0.5) * size_b[0] / h], 1).astype(np.float32)


def dense_matches(feat_a: Any, feat_b: Any, valid_a: Any, valid_b: Any, num_corr: int, chunk: int = 4096
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probe3D's NAVI matching: features upsampled (bicubic) to the [G, G'] grid of the valid masks; for each
    valid source cell the nearest valid target cell by cosine distance, weighted by Lowe's ratio test (1 -
    d1 / d2); the `num_corr` best kept. Returns (source cells, target cells, weights): flat indices into the
    grids, best first."""
    fa, fb = _tensor(feat_a), _tensor(feat_b)
    fb = fb.to(fa.device)
    va = torch.as_tensor(np.asarray(valid_a, bool)).reshape(-1)
    vb = torch.as_tensor(np.asarray(valid_b, bool)).reshape(-1)
    grid_a, grid_b = tuple(np.shape(valid_a)), tuple(np.shape(valid_b))
    if not va.any() or not vb.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    up_a = F.interpolate(fa[None], size=grid_a, mode="bicubic", align_corners=False)[0].flatten(1).T
    up_b = F.interpolate(fb[None], size=grid_b, mode="bicubic", align_corners=False)[0].flatten(1).T
    cells_a, cells_b = torch.nonzero(va).squeeze(1), torch.nonzero(vb).squeeze(1)
    qa = F.normalize(up_a[cells_a.to(up_a.device)], dim=1)
    kb = F.normalize(up_b[cells_b.to(up_b.device)], dim=1)
    k = min(2, len(kb))
    weights, nearest = [], []
    for start in range(0, len(qa), chunk):
        dist = 1 - qa[start:start + chunk] @ kb.T  # cosine distance, as Probe3D's knn_points
        d, idx = dist.topk(k, dim=1, largest=False)
        d = d.clamp(min=1e-9)
        ratio = d[:, 0] / d[:, 1] if k == 2 else torch.zeros_like(d[:, 0])
        weights.append(1 - ratio)
        nearest.append(idx[:, 0])
    weight, nn_idx = torch.cat(weights), torch.cat(nearest)
    top = weight.topk(min(num_corr, len(weight))).indices
    return (cells_a[top.cpu()].numpy(), cells_b[nn_idx[top].cpu()].numpy(),
            weight[top].cpu().numpy().astype(np.float32))


# ------------------------------------------------------------------------------------------ views


def square_view(image: np.ndarray, resolution: int) -> tuple[torch.Tensor, float]:
    """Probe3D's SPair input: the image padded with white to a square (bottom / right), resized to R x R.
    Returns ([3, R, R] in [0, 1], scale: view pixels per image pixel)."""
    h, w = image.shape[:2]
    side = max(h, w)
    if (h, w) != (side, side):
        padded = np.full((side, side, 3), 255, np.uint8)
        padded[:h, :w] = image
        image = padded
    return image_tensor(image, (resolution, resolution)), resolution / side


@dataclass
class NaviView:
    """One NAVI view as matched: the backbone's input, the 3D points on the matching grid, the crop."""

    image: torch.Tensor  # [3, R, R] in [0, 1]
    xyz: np.ndarray  # [3, G, G] camera-frame metres (z = 0: no object)
    valid: np.ndarray  # [G, G] bool
    crop: tuple[int, int, int]  # (top, left, side) in pixels of the stored image


def back_project(depth: np.ndarray, focal: float) -> np.ndarray:
    """Depth [H, W] (metres, 0 = none) -> camera-frame points [3, H, W] (x right, y down, z forward; principal
    point at the image centre, pixel centres at +0.5: Probe3D's get_grid and intrinsics)."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    d = depth.astype(np.float64)
    return np.stack([(u - w / 2) / focal * d, (v - h / 2) / focal * d, d]).astype(np.float32)


def object_crop(valid: np.ndarray) -> tuple[int, int, int] | None:
    """Probe3D's NAVI crop: the centred square of the shorter side, then a square around the object's box within
    it (centred on the box, moved inside the image where it would leave it). (top, left, side) or None."""
    h, w = valid.shape
    m = min(h, w)
    oy, ox = (h - m) // 2, (w - m) // 2
    mask = valid[oy:oy + m, ox:ox + m]
    if not mask.any():
        return None
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    eh, ew = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    side = int(max(eh, ew))
    top = int(np.clip(rows[0] - (side - eh) // 2, 0, m - side))
    left = int(np.clip(cols[0] - (side - ew) // 2, 0, m - side))
    return oy + top, ox + left, side


def navi_view(image: np.ndarray, depth: np.ndarray, focal: float, resolution: int, grid: int) -> NaviView | None:
    """A NAVI view cropped around its object: the image at R x R, its 3D points on the G x G matching grid
    (nearest, as Probe3D resizes them). None when the view shows no object."""
    crop = object_crop(depth > 0)
    if crop is None:
        return None
    top, left, side = crop
    xyz = torch.from_numpy(back_project(depth, focal)[:, top:top + side, left:left + side].copy())
    xyz = F.interpolate(xyz[None], size=(grid, grid), mode="nearest-exact")[0].numpy()
    rgb = image_tensor(image[top:top + side, left:left + side], (resolution, resolution))
    return NaviView(rgb, xyz, xyz[2] > 0, crop)


def warp_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, num_keypoints: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A second view of `image` with exactly known correspondences: a random crop (60-90 % of each side)
    resized back to the image's size, flipped left-right half the time. Returns (image_b, kps, kps_b): up to
    `num_keypoints` (x, y) pixel positions on `mask` (anywhere when the crop holds none of it) and where they
    land in image_b (resizing maps continuous position p in the crop to p * size / crop size, exactly)."""
    h, w = image.shape[:2]
    frac = rng.uniform(0.6, 0.9)
    ch, cw = max(1, round(frac * h)), max(1, round(frac * w))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    flip = bool(rng.random() < 0.5)
    crop = image_tensor(image[y0:y0 + ch, x0:x0 + cw], (h, w))
    image_b = (crop.permute(1, 2, 0) * 255).round().byte().numpy()
    if flip:
        image_b = np.ascontiguousarray(image_b[:, ::-1])
    inside = mask[y0:y0 + ch, x0:x0 + cw]
    rows, cols = np.nonzero(inside if inside.any() else np.ones_like(inside, bool))
    pick = rng.choice(len(rows), size=min(num_keypoints, len(rows)), replace=False)
    rows, cols = rows[pick], cols[pick]
    kps = np.stack([cols + x0, rows + y0], 1).astype(np.float32)
    xb, yb = (cols + 0.5) * w / cw, (rows + 0.5) * h / ch  # continuous positions (pixel centres at +0.5)
    if flip:
        xb = w - xb
    kps_b = np.stack([xb - 0.5, yb - 0.5], 1).astype(np.float32)
    return image_b, kps, kps_b


def synthetic_pairs(reader: BenchmarkReader, seed: int, num_keypoints: int) -> Iterator[Sample]:
    """The synthetic world's evaluation images as keypoint pairs (the target format of
    versavit.eval.datasets.correspondence, kind "keypoints"; normaliser: the image side)."""
    for index, (image, target) in enumerate(reader):
        masks = target.get("masks") or []
        mask = np.any(np.stack(masks), 0) if masks else np.ones(image.shape[:2], bool)
        image_b, kps, kps_b = warp_pair(image, mask, np.random.default_rng([seed, index]), num_keypoints)
        key = str(target.get("key", index))
        yield image, {"key": key, "kind": "keypoints", "category": "synthetic", "image_b": image_b, "kps": kps,
                      "kps_b": kps_b, "norm": float(max(image.shape[:2])), "image_id": None, "image_id_b": None}


# ------------------------------------------------------------------------------------------ the evaluator


class _Features:
    """Final-layer features of the views of one evaluation, L2-normalised; an image's kept while others come
    (SPair pairs reuse images), keyed by its id and the view's resolution."""

    def __init__(self, backbone: Any, device: torch.device) -> None:
        self.backbone, self.device = backbone, device
        self.cache: OrderedDict[Any, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def __call__(self, views: list[torch.Tensor], ids: list[Any]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [self.cache.get(i) if i is not None else None for i in ids]
        todo = [k for k, f in enumerate(out) if f is None]
        if todo:
            maps = self.backbone(torch.stack([views[k] for k in todo]).to(self.device)).maps.float()
            for k, fmap in zip(todo, F.normalize(maps, dim=1), strict=True):
                out[k] = fmap
                if ids[k] is not None:
                    self.cache[ids[k]] = fmap
                    while len(self.cache) > FEATURE_CACHE:
                        self.cache.popitem(last=False)
        return out  # type: ignore[return-value]


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


@register
class Correspondence(Evaluator):
    name = "correspondence"
    title = "3D correspondence, Probe3D protocol: final-layer features, nearest neighbours (paper Table 8)"
    paper_table = "Table 8"
    kind = "inference"
    benchmarks_help = "navi, spair (Probe3D); synthetic (a view and an exact warp of it); any backbone, no heads"
    needs_heads = ()
    metric_specs = {
        "recall": HEADLINE,
        "recall_05": MetricSpec("recall@0.05"), "recall_10": MetricSpec("recall@0.10"),
        "recall_15": MetricSpec("recall@0.15"),
        "recall_1cm": MetricSpec("recall@1cm"), "recall_2cm": MetricSpec("recall@2cm"),
        "recall_5cm": MetricSpec("recall@5cm"),
    }

    @property
    def config(self) -> CorrespondenceConfig:
        return self.ctx.cfg.eval.correspondence

    def columns(self) -> dict[str, MetricSpec]:
        return recall_specs(self.config)

    def applies_to(self, benchmark: Benchmark) -> bool:
        return benchmark.name in ("navi", "spair", "synthetic")

    def resolution(self, benchmark: str, backbone: Any) -> int:
        """The configured side for `benchmark`, rounded down to the backbone's resize factor (28 or 32)."""
        unit = int(backbone.patch_size * backbone.merge_size)
        side = self.config.resolutions.get(benchmark, self.config.default_resolution)
        return max(unit, side // unit * unit)

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        start = time.time()
        device = torch.device(self.ctx.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        backbone = candidate.load_backbone().to(device).eval()
        resolution = self.resolution(benchmark.name, backbone)
        features = _Features(backbone, device)
        result = EvalResult(self.name, benchmark.name, candidate.name)
        if benchmark.name == "navi":
            self._navi(benchmark.eval, features, resolution, result)
        else:
            pairs = (synthetic_pairs(benchmark.eval, self.ctx.cfg.eval.seed, self.config.keypoints_per_pair)
                     if benchmark.name != "spair" else iter(benchmark.eval))
            self._keypoints(pairs, features, resolution, result)
        result.notes.append(f"{benchmark.name}: {int(result.value('pairs') or 0)} pairs at {resolution} px")
        result.elapsed_s = time.time() - start
        return result

    def _pairs(self, pairs: Iterator[Sample]) -> Iterator[Sample]:
        for n, pair in enumerate(pairs):
            if self.config.max_pairs is not None and n >= self.config.max_pairs:
                return
            yield pair

    def _keypoints(self, pairs: Iterator[Sample], features: _Features, resolution: int, result: EvalResult) -> None:
        """SPair / synthetic: keypoint transfer, recall per category, averaged over categories."""
        cfg = self.config
        by_category: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
        by_viewpoint: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
        size = (resolution, resolution)
        for image, target in self._pairs(pairs):
            (view_a, scale_a), (view_b, scale_b) = square_view(image, resolution), square_view(target["image_b"],
                                                                                              resolution)
            fa, fb = features([view_a, view_b], [target.get("image_id"), target.get("image_id_b")])
            kps_view = (np.asarray(target["kps"], np.float32) + 0.5) * scale_a  # pixel index -> continuous
            pred_view = match_keypoints(fa, fb, kps_view, size, size)
            pred = pred_view / scale_b - 0.5
            norm = np.full(len(pred), float(target["norm"]), np.float32)
            entry = (pred, np.asarray(target["kps_b"], np.float32), norm)
            by_category[str(target.get("category", ""))].append(entry)
            if target.get("viewpoint_variation") is not None:
                by_viewpoint[int(target["viewpoint_variation"])].append(entry)
            if "example" not in result.artifacts:
                ok = np.linalg.norm(pred - entry[1], axis=1) / norm < cfg.headline_threshold
                result.artifacts["example"] = {
                    "key": target["key"], "image": _uint8(view_a), "image_b": _uint8(view_b),
                    "points": kps_view, "matches": pred_view, "ok": ok,
                    "threshold": f"{cfg.headline_threshold:.2f} x normaliser", "recall": float(ok.mean())}

        def recalls(groups: dict[Any, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]) -> dict[Any, dict]:
            return {g: correspondence_recall(np.concatenate([e[0] for e in es]), np.concatenate([e[1] for e in es]),
                                             cfg.thresholds, np.concatenate([e[2] for e in es]))
                    for g, es in groups.items()}

        per_category = recalls(by_category)
        # Probe3D: the mean of the per-category recalls
        values = {t: _mean([r[t] for r in per_category.values()]) for t in cfg.thresholds}
        result.add("recall", values[cfg.headline_threshold], HEADLINE)
        for t in cfg.thresholds:
            result.add(keypoint_metric(t), values[t], MetricSpec(f"recall@{t:.2f}"))
        for vp, r in sorted(recalls(by_viewpoint).items()):
            result.add(f"{keypoint_metric(cfg.headline_threshold)}_vp{vp}", r[cfg.headline_threshold],
                       MetricSpec(f"recall@{cfg.headline_threshold:.2f}, viewpoint variation {vp}"))
        result.add("pairs", sum(len(es) for es in by_category.values()), MetricSpec("pairs", scale=1.0, fmt=".0f"))
        result.add("points", sum(len(e[0]) for es in by_category.values() for e in es),
                   MetricSpec("keypoints", scale=1.0, fmt=".0f"))
        result.artifacts["per_category"] = {c: r[cfg.headline_threshold] for c, r in per_category.items()}

    def _navi(self, reader: BenchmarkReader, features: _Features, resolution: int, result: EvalResult) -> None:
        """NAVI: dense ratio-test matches on object pixels, 3D error, recall per pair averaged over pairs."""
        cfg = self.config
        grid = max(1, round(resolution * cfg.navi_grid_scale))
        per_pair: list[dict[float, float]] = []
        angles: list[float] = []
        skipped = 0
        for image, target in self._pairs(iter(reader)):
            view_a = navi_view(image, target["depth"], target["focal"], resolution, grid)
            view_b = navi_view(target["image_b"], target["depth_b"], target["focal_b"], resolution, grid)
            if view_a is None or view_b is None:
                skipped += 1
                continue
            fa, fb = features([view_a.image, view_b.image], [target.get("image_id"), target.get("image_id_b")])
            cells_a, cells_b, _ = dense_matches(fa, fb, view_a.valid, view_b.valid, cfg.navi_num_corr)
            if not len(cells_a):
                skipped += 1
                continue
            rt = np.asarray(target["pose_b"]) @ np.linalg.inv(np.asarray(target["pose"]))
            pa = view_a.xyz.reshape(3, -1)[:, cells_a].astype(np.float64)
            pb = view_b.xyz.reshape(3, -1)[:, cells_b].astype(np.float64)
            moved = (rt[:3, :3] @ pa + rt[:3, 3:]).T
            per_pair.append(correspondence_recall(moved, pb.T, cfg.navi_thresholds_m))
            angles.append(float(target.get("angle", float("nan"))))
            if "example" not in result.artifacts:
                ok = np.linalg.norm(moved - pb.T, axis=1) < cfg.navi_headline_m
                result.artifacts["example"] = {
                    "key": target["key"], "image": _uint8(view_a.image), "image_b": _uint8(view_b.image),
                    "points": _cell_centres(cells_a[:FIGURE_MATCHES], grid, resolution),
                    "matches": _cell_centres(cells_b[:FIGURE_MATCHES], grid, resolution),
                    "ok": ok[:FIGURE_MATCHES], "threshold": f"{cfg.navi_headline_m * 100:g} cm",
                    "recall": float(ok.mean())}
        result.add("recall", _mean([r[cfg.navi_headline_m] for r in per_pair]), HEADLINE)
        for t in cfg.navi_thresholds_m:
            result.add(navi_metric(t), _mean([r[t] for r in per_pair]), MetricSpec(f"recall@{t * 100:g}cm"))
        angle = np.asarray(angles)
        for lo, hi in zip(NAVI_ANGLE_BINS[:-1], NAVI_ANGLE_BINS[1:], strict=True):
            inside = [r[cfg.navi_headline_m] for r, a in zip(per_pair, angle, strict=True) if lo <= a < hi]
            if inside:
                result.add(f"{navi_metric(cfg.navi_headline_m)}_{lo}_{hi}deg", _mean(inside),
                           MetricSpec(f"recall@{cfg.navi_headline_m * 100:g}cm, {lo}-{hi} deg"))
        result.add("pairs", len(per_pair), MetricSpec("pairs", scale=1.0, fmt=".0f"))
        if skipped:
            result.notes.append(f"navi: {skipped} pairs without object pixels or matches skipped")

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        """The first pair of the benchmark, one row per backbone: both views side by side, each shown match a
        line (green within the headline threshold, red outside)."""
        from versavit.eval.report import BENCHMARK_LABELS, _plt

        shown = [r for r in results if r.artifacts.get("example")]
        if not shown:
            return None
        plt = _plt()
        fig, axes = plt.subplots(len(shown), 1, figsize=(7.0, 3.6 * len(shown) + 0.5), squeeze=False)
        for ax, r in zip(axes[:, 0], shown, strict=True):
            ex = r.artifacts["example"]
            a, b = ex["image"], ex["image_b"]
            height = max(a.shape[0], b.shape[0])
            canvas = np.full((height, a.shape[1] + b.shape[1], 3), 255, np.uint8)
            canvas[:a.shape[0], :a.shape[1]] = a
            canvas[:b.shape[0], a.shape[1]:] = b
            ax.imshow(canvas)
            for (xa, ya), (xb, yb), ok in zip(ex["points"], ex["matches"], ex["ok"], strict=True):
                colour = "lime" if ok else "red"
                ax.plot([xa - 0.5, xb - 0.5 + a.shape[1]], [ya - 0.5, yb - 0.5], color=colour, lw=0.8)
                ax.plot([xa - 0.5, xb - 0.5 + a.shape[1]], [ya - 0.5, yb - 0.5], "o", color=colour, ms=2)
            ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
            ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
            ax.axis("off")
            headline = r.value("recall")
            ax.set_title(f"{r.backbone}: recall {100 * (headline or 0):.1f}% ({ex['key']}: "
                         f"{100 * ex['recall']:.0f}% of {len(ex['ok'])} shown within {ex['threshold']})", fontsize=8)
        bench = results[0].benchmark
        fig.suptitle(f"{BENCHMARK_LABELS.get(bench, bench)}: correspondences from final-layer features "
                     "(green: within the threshold)", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def protocol_note(self) -> str:
        c = self.config
        res = ", ".join(f"{k} {v}" for k, v in c.resolutions.items())
        return (f"3D correspondence (Probe3D): frozen final-layer patch features, L2-normalised, at {res} px "
                f"(else {c.default_resolution}). SPair: images padded to squares, each source keypoint matched "
                f"to the most similar target patch; recall = keypoints within {c.headline_threshold:.2f} x the "
                f"target box's longer side, averaged over categories. NAVI: object crops, features upsampled to "
                f"a {c.navi_grid_scale:g} x side grid, ratio-test matches (best {c.navi_num_corr}); recall = "
                f"matches whose 3D points lie within {c.navi_headline_m * 100:g} cm. Synthetic: a view and an "
                f"exact crop/flip of it, {c.keypoints_per_pair} object keypoints, threshold x the image side.")

    def settings(self) -> dict[str, Any]:
        return self.config.model_dump()


def _cell_centres(cells: np.ndarray, grid: int, resolution: int) -> np.ndarray:
    """Flat indices of a G x G grid -> (x, y) centres in pixels of the R x R view."""
    cell = resolution / grid
    return np.stack([(cells % grid + 0.5) * cell, (cells // grid + 0.5) * cell], 1)


def _uint8(view: torch.Tensor) -> np.ndarray:
    return (view.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().cpu().numpy()
