"""DA-2K relative depth with the multi-task export's own DPT head (paper Table 9: VersaViT 91.3% accuracy).

DA-2K (Depth Anything V2) annotates point pairs, each with the point nearer the camera; a model orders a pair
right when its prediction puts that point nearer: a smaller value where the head predicts depth, a larger one
where it predicts disparity (the space the export records: `depth_space`). Accuracy = right pairs / all pairs,
over the whole benchmark (plus one accuracy per scene type, not shown in the table). A tie orders nothing and
counts as wrong.

Each image is resized to R x R (R = eval.da2k.resolution, else train.resolution.depth: what the head was trained
at), the head's output is resized back to the image's own size (bilinear) and read at the annotated pixels.

On a benchmark with depth but no DA-2K annotations (the synthetic world: the tiny demo) the pairs are drawn:
eval.da2k.pairs_per_image per image, seeded by (eval.seed, image index), from valid pixels whose true depths
differ by at least 10% (versavit.data.prepare.da2k.draw_pairs): DA-2K's annotators kept only pairs whose order
was unambiguous, and a margin keeps pairs at near-equal depth, whose order is noise, out of the score.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from versavit.data.prepare.da2k import MARGIN, Pair, draw_pairs
from versavit.eval.candidates import load_multitask
from versavit.eval.evaluators.base import EvalResult, Evaluator, MetricSpec, Skipped, register
from versavit.eval.evaluators.zero_shot_depth import depth_space

if TYPE_CHECKING:
    from pathlib import Path

    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark

EXAMPLES = 4  # images kept per backbone for the figure
ACCURACY = MetricSpec("pair accuracy")


def pair_correct(pred: np.ndarray, pairs: Sequence[Pair], space: str) -> np.ndarray:
    """Per pair ((r1, c1), (r2, c2), closer): whether `pred` ([H, W] depth or disparity) puts the closer point
    nearer. Points are (row, column) pixels of `pred`; equal values (or NaN) order nothing: wrong."""
    if space not in ("depth", "disparity"):
        raise ValueError(f"space must be 'depth' or 'disparity', got {space!r}")
    if not len(pairs):
        return np.zeros(0, bool)
    pred = np.asarray(pred)
    idx = np.asarray([(p1[0], p1[1], p2[0], p2[1], closer) for p1, p2, closer in pairs], np.int64)
    if idx[:, :4].min() < 0 or idx[:, [0, 2]].max() >= pred.shape[0] or idx[:, [1, 3]].max() >= pred.shape[1]:
        raise ValueError(f"a point lies outside the {pred.shape[0]}x{pred.shape[1]} prediction")
    first, second = pred[idx[:, 0], idx[:, 1]], pred[idx[:, 2], idx[:, 3]]
    first_nearer = first < second if space == "depth" else first > second
    second_nearer = second < first if space == "depth" else second > first
    predicted = np.where(first_nearer, 0, np.where(second_nearer, 1, -1))  # -1: a tie
    return predicted == idx[:, 4]


def pair_accuracy(pred: np.ndarray, pairs: Sequence[Pair], space: str) -> float:
    """Fraction of `pairs` that `pred` ([H, W], in `space`: depth or disparity) orders right."""
    if not len(pairs):
        raise ValueError("no pairs to score")
    return float(pair_correct(pred, pairs, space).mean())


@register
class DA2K(Evaluator):
    name = "da2k"
    title = "DA-2K relative depth, multi-task DPT head (paper Table 9)"
    paper_table = "Table 9"
    kind = "inference"
    benchmarks_help = ("da2k (annotated point pairs); any depth benchmark (synthetic, nyu, kitti) with pairs drawn "
                       "from its ground truth; needs an export with a depth head")
    needs_heads = ("depth",)
    metric_specs = {"accuracy": ACCURACY}

    @property
    def resolution(self) -> int:
        cfg = self.ctx.cfg
        return cfg.eval.da2k.resolution or cfg.train.resolution.depth

    def applies_to(self, benchmark: Benchmark) -> bool:
        return benchmark.name == "da2k" or "depth" in benchmark.tasks

    def run(self, candidate: Candidate, benchmark: Benchmark) -> EvalResult:
        if "depth" not in candidate.heads or candidate.export is None:
            raise Skipped(f"{candidate.name} has no depth head (not a multi-task export with one)")
        started = time.perf_counter()
        cfg = self.ctx.cfg
        model = load_multitask(candidate, cfg, ["depth"])
        space = depth_space(candidate, model)
        device = torch.device(self.ctx.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(device).eval()
        right: Counter = Counter()
        total: Counter = Counter()
        examples: list[dict[str, Any]] = []
        drawn = 0
        images = 0
        pending: list[tuple[np.ndarray, list[Pair], str]] = []

        @torch.inference_mode()
        def flush() -> None:
            from versavit.data.tasks import image_tensor

            r = self.resolution
            x = torch.stack([image_tensor(img, (r, r)) for img, _, _ in pending]).to(device)
            out = model.backbone(x, layers=model.depth_layers)
            feats = [out.layers[layer] for layer in model.depth_layers]
            for i, (image, pairs, scene) in enumerate(pending):
                # the head resizes its output to the image's own size (bilinear), where the points are
                pred = model.heads["depth"]([f[i:i + 1] for f in feats], tuple(image.shape[:2]))[0]
                ok = pair_correct(pred.float().cpu().numpy(), pairs, space)
                for key in ("", scene) if scene else ("",):
                    right[key] += int(ok.sum())
                    total[key] += len(ok)
                if len(examples) < EXAMPLES:
                    examples.append({"image": image, "pairs": list(pairs), "correct": ok.tolist()})
            pending.clear()

        from versavit.progress import progress_bar

        batch = cfg.eval.probe.batch_size
        with progress_bar() as bar:
            task = bar.add_task(f"DA-2K {candidate.name} {benchmark.name}/{benchmark.eval.split}",
                                total=len(benchmark.eval))
            for index, (image, target) in enumerate(benchmark.eval):
                bar.update(task, completed=index + 1)
                pairs = target.get("pairs")
                if pairs is None:
                    if "depth" not in target:
                        continue
                    pairs = draw_pairs(np.asarray(target["depth"]), np.asarray(target["valid"], bool),
                                       cfg.eval.da2k.pairs_per_image,
                                       np.random.default_rng([cfg.eval.seed, index]))
                    drawn += len(pairs)
                if not pairs:
                    continue
                images += 1
                pending.append((np.asarray(image), list(pairs), str(target.get("scene") or "")))
                if len(pending) == batch:
                    flush()
            if pending:
                flush()
        if not total[""]:
            raise Skipped(f"{benchmark.name} has no point pairs to score (no DA-2K annotations, no valid depth)")

        result = EvalResult(self.name, benchmark.name, candidate.name)
        result.add("accuracy", right[""] / total[""], ACCURACY)
        for scene in sorted(k for k in total if k):
            result.add(f"accuracy_{scene}", right[scene] / total[scene], MetricSpec(f"DA-2K {scene} acc."))
        result.artifacts.update(examples=examples, space=space, pairs=total[""], images=images)
        origin = (f"drawn from the ground-truth depth ({cfg.eval.da2k.pairs_per_image} per image, seed "
                  f"{cfg.eval.seed}, depths >= {MARGIN:.0%} apart)") if drawn else "annotated"
        result.notes.append(f"DA-2K on {benchmark.name}: {total['']} pairs on {images} images, {origin}; head "
                            f"predicts {space}")
        result.elapsed_s = time.perf_counter() - started
        return result

    def figure(self, results: list[EvalResult], path: Path) -> Path | None:
        """A few images per backbone (one row each) with their pairs: green when ordered right, red when wrong;
        the filled dot is the truly closer point."""
        from versavit.eval import report

        shown = [r for r in results if r.artifacts.get("examples")]
        if not shown:
            return None
        plt = report._plt()
        n_cols = max(len(r.artifacts["examples"]) for r in shown)
        fig, axes = plt.subplots(len(shown), n_cols, figsize=(2.8 * n_cols, 2.8 * len(shown) + 0.5), squeeze=False)
        for result, row in zip(shown, axes, strict=True):
            for ax, ex in zip_longest(row, result.artifacts["examples"]):
                ax.axis("off")
                if ex is None:
                    continue
                h, w = ex["image"].shape[:2]
                ax.imshow(ex["image"])
                for (p1, p2, closer), ok in zip(ex["pairs"], ex["correct"], strict=True):
                    colour = "#2ca02c" if ok else "#d62728"
                    near, far = (p1, p2) if closer == 0 else (p2, p1)
                    ax.plot([near[1], far[1]], [near[0], far[0]], "-", color=colour, linewidth=1.2)
                    ax.plot(near[1], near[0], "o", color=colour, markersize=5)
                    ax.plot(far[1], far[0], "o", markerfacecolor="none", markeredgecolor=colour, markersize=5)
                ax.set_xlim(-0.5, w - 0.5)
                ax.set_ylim(h - 0.5, -0.5)
                ax.set_title(f"{result.backbone}: {sum(ex['correct'])}/{len(ex['correct'])} right", fontsize=8)
        fig.suptitle(f"{results[0].benchmark}: DA-2K point pairs (green: ordered right, red: wrong; filled dot: "
                     "the closer point)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def protocol_note(self) -> str:
        cfg = self.ctx.cfg
        return (f"DA-2K: the export's DPT head at {self.resolution} px (image resized to R x R, prediction resized "
                "back to the image), a pair right when the annotated closer point is predicted nearer (smaller "
                "depth, larger disparity; ties wrong); on depth benchmarks without annotations, "
                f"{cfg.eval.da2k.pairs_per_image} pairs per image drawn (seed {cfg.eval.seed}) from valid pixels "
                f"whose true depths differ by >= {MARGIN:.0%}.")

    def settings(self) -> dict[str, Any]:
        cfg = self.ctx.cfg
        return {"resolution": self.resolution, "pairs_per_image": cfg.eval.da2k.pairs_per_image,
                "margin": MARGIN, "seed": cfg.eval.seed}
