"""Fine-tuned metric depth (paper Table 9, "fine-tuned"): backbone + DPT head trained on a benchmark's train split.

Protocol (RECIPE.md: backbone at 1e-5, the rest at 1e-4, batch 32 per GPU, 5 epochs; `eval.finetune_depth`):

    model       the candidate's backbone, trainable, plus a DPT depth head on three of its layers: the multi-task
                export's own depth head (and its layers) when the candidate is an export with one, else a fresh
                `DepthHead` from `model.heads.depth` (layers: its `layers` or the backbone's `uniform_layers(3)`),
                built exactly as `VersaViT.build` builds it, initialised from `eval.seed`
    output      metric depth in metres: the head's last activation becomes a sigmoid and its output is scaled by
                the benchmark's max_depth, i.e. transformers' `depth_estimation_type="metric"` head, which is
                Depth-Anything-V2's metric fine-tune (metric_depth/depth_anything_v2/dpt.py: sigmoid * max_depth)
    loss        scale-invariant log loss on valid pixels within (min_depth, max_depth): sqrt(Var(g) + 0.5 mean(g)^2),
                g = log pred - log gt, Depth-Anything-V2's metric `SiLogLoss(lambd=0.5)` (metric_depth/util/loss.py),
                i.e. `versavit.eval.probe.sig_loss` with variance_focus 0.5. Not versavit.losses.DepthLoss: that one
                is scale-and-shift invariant (relative depth), which cannot learn metres.
    optimiser   AdamW, two groups: backbone at lr_backbone, head at lr_head (biases / norms without weight decay);
                weight decay, betas, warm-up ratio and gradient clipping from `train.optim`; linear warm-up then
                cosine decay to 0 over min(epochs * ceil(N / batch), max_steps) steps
    data        train split, images resized to R x R (bilinear, antialiased: `versavit.data.tasks.image_tensor`),
                depth and valid mask to R x R (nearest: depth is never interpolated), R = `resolution` or
                `train.resolution.depth`; random horizontal flip (`flip`, as Depth-Anything-V2's metric
                fine-tune); a random-access split is permuted whole each epoch, a streamed (sharded) one is shuffled
                through a `shuffle_buffer`-sample buffer
    scoring     eval split, the prediction at R x R upsampled (bilinear) to the label's size, clamped to
                [min_depth, max_depth], NOT scale-aligned (metric depth); AbsRel, delta1 and RMSE per image over its
                valid pixels within (min_depth, max_depth), then averaged (versavit.eval.metrics.DepthMeter)

Seeded (`eval.seed`: head initialisation, sample order, flips) and deterministic on CPU; the caller's RNG state
is left as it was. On CUDA the backbone runs under bf16 autocast (the head, loss and optimiser in fp32) and
gradient checkpointing follows `model.backbone.gradient_checkpointing`. One process, one device: `batch_size` is
the batch of that device (the paper's "per GPU"; with one GPU the global batch is 32, not 32 x the paper's GPU
count).
A candidate given in memory (the random-init baseline) is copied before training: it is never modified.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from versavit.data.tasks import image_tensor
from versavit.eval.finetune import common
from versavit.eval.finetune.common import (
    Prefetch,
    batches,
    bf16_autocast,
    deterministic,
    random_access,
    reader_samples,
    relative_change,
    shuffled,
)
from versavit.eval.metrics import DepthMeter
from versavit.eval.probe import sig_loss
from versavit.eval.results import EvalResult, MetricSpec
from versavit.models.backbone import VisionBackbone
from versavit.models.heads.depth import DepthHead

if TYPE_CHECKING:
    from versavit.config import RunConfig
    from versavit.eval.candidates import Candidate
    from versavit.eval.datasets import Benchmark
    from versavit.eval.datasets.base import BenchmarkReader

log = logging.getLogger(__name__)

EVALUATOR = "finetune-depth"
EXAMPLES = 4  # evaluation predictions kept for the report's figure
_EXAMPLE_ARRAYS = ("image", "gt", "valid", "pred")  # what evaluate_metric_depth keeps of each example
SILOG_VARIANCE_FOCUS = 0.5  # Depth-Anything-V2's SiLogLoss(lambd=0.5): Var(g) + 0.5 mean(g)^2
METRIC_SPECS: dict[str, MetricSpec] = {
    "absrel": MetricSpec("AbsRel", higher_is_better=False),
    "delta1": MetricSpec("δ1"),
    "rmse": MetricSpec("RMSE", higher_is_better=False, scale=1.0, fmt=".3f"),
}


# ------------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class FinetuneSettings:
    """The schedule shared by every backbone of one comparison (`eval.finetune_depth`, `eval.seed`, `train.optim`)."""

    resolution: int
    epochs: int
    batch_size: int
    lr_backbone: float
    lr_head: float
    max_steps: int | None
    weight_decay: float
    betas: tuple[float, float]
    warmup_ratio: float
    grad_clip: float
    flip: bool
    shuffle_buffer: int
    log_every: int
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig) -> FinetuneSettings:
        f, optim = cfg.eval.finetune_depth, cfg.train.optim
        return cls(resolution=f.resolution or cfg.train.resolution.depth, epochs=f.epochs, batch_size=f.batch_size,
                   lr_backbone=f.lr_backbone, lr_head=f.lr_head, max_steps=f.max_steps,
                   weight_decay=optim.weight_decay, betas=tuple(optim.betas), warmup_ratio=optim.warmup_ratio,
                   grad_clip=optim.grad_clip, flip=f.flip, shuffle_buffer=f.shuffle_buffer, log_every=f.log_every,
                   seed=cfg.eval.seed)

    def total_steps(self, num_samples: int) -> int:
        """Optimiser steps: every batch of every epoch (the last one may be short), capped by max_steps."""
        steps = self.epochs * math.ceil(num_samples / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def describe_protocol(settings: FinetuneSettings) -> str:
    """One sentence on the schedule as configured (the evaluator's protocol note)."""
    cap = f", at most {settings.max_steps} steps" if settings.max_steps else ""
    return (f"Fine-tuned metric depth: backbone (lr {settings.lr_backbone:g}) + DPT head (lr {settings.lr_head:g}; "
            "the export's own head when it has one, else a fresh one), AdamW, "
            f"{100 * settings.warmup_ratio:g}% linear warm-up then cosine, batch {settings.batch_size}, "
            f"{settings.epochs} epochs{cap} on the train split at {settings.resolution} px"
            f"{' with horizontal flips' if settings.flip else ''}; output max_depth * sigmoid, SiLog loss; "
            "AbsRel and δ1 on the evaluation split in metres, no scale alignment.")


# ------------------------------------------------------------------------------------------------
# model


class MetricDepthModel(nn.Module):
    """Backbone + DPT head whose output is metric depth in metres: `forward(images, size)` -> [B, *size]."""

    def __init__(self, backbone: VisionBackbone, head: DepthHead, layers: list[int], max_depth: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.layers = list(layers)
        self.max_depth = float(max_depth)
        # transformers' metric DPT head (Depth-Anything-V2 metric): sigmoid, then * max_depth, in place of the
        # relative head's non-negative activation; the head's own convolutions are kept
        head.head.activation2 = nn.Sigmoid()
        head.head.max_depth = self.max_depth

    def forward(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        with bf16_autocast(images.device):
            out = self.backbone(images, layers=self.layers)
        # the head in fp32: a metric regression whose bf16 output would be quantised to 2-3 significant digits
        with torch.autocast(images.device.type, enabled=False):
            return self.head([out.layers[layer].float() for layer in self.layers], size)


def _export_depth_head(candidate: Candidate, cfg: RunConfig) -> tuple[VisionBackbone, DepthHead, list[int]] | None:
    if candidate.export is None or "depth" not in candidate.heads:
        return None
    from versavit.eval.candidates import load_multitask

    model = load_multitask(candidate, cfg, ["depth"])
    return model.backbone, model.heads["depth"], list(model.depth_layers)


def build_depth_model(candidate: Candidate, cfg: RunConfig, max_depth: float,
                      seed: int | None = None) -> tuple[MetricDepthModel, str]:
    """The model to fine-tune (fp32, on the CPU) and where its head comes from ("export" or "fresh").

    The backbone is the candidate's (a copy when it is held in memory); the head is the export's DPT head when
    the candidate has one, else a fresh one as `VersaViT.build` makes it, initialised under `seed`
    (default `eval.seed`) without touching the caller's RNG."""
    found = _export_depth_head(candidate, cfg)
    if found is not None:
        backbone, head, layers = found
        origin = "export"
    else:
        backbone = candidate.load_backbone()
        if candidate.backbone is not None:  # the candidate's own module: never train it in place
            backbone = copy.deepcopy(backbone)
        layers = cfg.model.heads.depth.layers or backbone.uniform_layers(3)
        bad = [layer for layer in layers if not 1 <= layer <= backbone.depth]
        if bad:
            raise ValueError(f"model.heads.depth.layers {bad} outside 1..{backbone.depth} of {candidate.name}'s "
                             "backbone")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.eval.seed if seed is None else seed)
            head = DepthHead(cfg.model.heads.depth, embed_dim=backbone.embed_dim, num_layers=len(layers))
        origin = "fresh"
    model = MetricDepthModel(backbone.float(), head.float(), layers, max_depth)
    model.backbone.set_gradient_checkpointing(cfg.model.backbone.gradient_checkpointing)
    return model, origin


# ------------------------------------------------------------------------------------------------
# scoring


class MetricDepthScorer:
    """Metric depth scoring, no alignment: each prediction upsampled (bilinear) to its label's size, clamped to
    [min_depth, max_depth], errors over the valid pixels with min_depth < gt < max_depth (DepthMeter)."""

    def __init__(self, min_depth: float, max_depth: float) -> None:
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.meter = DepthMeter()

    def prediction(self, pred: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """One [h, w] prediction in metres at the label's `shape`, clamped to the depth range."""
        pred = pred.detach().float().cpu()
        if tuple(pred.shape) != tuple(shape):
            pred = F.interpolate(pred[None, None], size=tuple(shape), mode="bilinear", align_corners=False)[0, 0]
        return pred.clamp(self.min_depth, self.max_depth)

    def valid(self, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return valid.bool() & (gt > self.min_depth) & (gt < self.max_depth)

    def update(self, pred: torch.Tensor, gt: torch.Tensor | np.ndarray,
               valid: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Score one image; returns the prediction as scored ([H, W] at label size)."""
        gt = torch.as_tensor(np.asarray(gt, np.float32))
        valid = torch.as_tensor(np.asarray(valid, bool))
        out = self.prediction(pred, tuple(gt.shape))
        self.meter.update(out, gt, self.valid(gt, valid))
        return out

    def compute(self) -> dict[str, float]:
        return self.meter.compute()


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class _Pair:
    image: torch.Tensor  # [3, R, R] uint8
    depth: torch.Tensor  # [R, R] float32 metres
    valid: torch.Tensor  # [R, R] bool


def _nearest(array: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array))
    if tuple(t.shape) == (size, size):
        return t
    return F.interpolate(t[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].to(t.dtype)


def _pair(image: np.ndarray, target: dict[str, Any], resolution: int, flip: bool) -> _Pair:
    x = (image_tensor(image, (resolution, resolution)) * 255).round().to(torch.uint8)  # uint8: 4x less to buffer
    depth = _nearest(np.asarray(target["depth"], np.float32), resolution)
    valid = _nearest(np.asarray(target["valid"], np.uint8), resolution).bool()
    if flip:
        x, depth, valid = x.flip(-1), depth.flip(-1), valid.flip(-1)
    return _Pair(x, depth, valid)


def _epoch_pairs(reader: BenchmarkReader, settings: FinetuneSettings, generator: torch.Generator
                 ) -> Iterator[_Pair]:
    """One epoch of training pairs in a seeded random order (flips drawn from the same generator): a random-access
    split permuted whole, a stream shuffled through a `shuffle_buffer`-pair buffer."""

    def flip() -> bool:
        return settings.flip and bool(torch.rand((), generator=generator) < 0.5)

    pairs = (_pair(image, target, settings.resolution, flip())
             for image, target in reader_samples(reader, generator) if "depth" in target)
    yield from pairs if random_access(reader) else shuffled(pairs, settings.shuffle_buffer, generator)


def _stack(batch: list[_Pair]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.stack([p.image for p in batch]), torch.stack([p.depth for p in batch]),
            torch.stack([p.valid for p in batch]))


# ------------------------------------------------------------------------------------------------
# training and evaluation


def _check_benchmark(benchmark: Benchmark) -> BenchmarkReader:
    if "depth" not in benchmark.tasks:
        raise ValueError(f"finetune-depth: benchmark {benchmark.name!r} has no depth task (tasks: "
                         f"{', '.join(benchmark.tasks) or 'none'}); use a depth benchmark such as nyu or kitti")
    if benchmark.train is None:
        raise ValueError(f"finetune-depth: benchmark {benchmark.name!r} has no train split to fine-tune on (root "
                         f"{benchmark.root}); prepare its train split too (e.g. `versavit data prepare nyuv2 "
                         "--split train`)")
    return benchmark.train


def train_metric_depth(model: MetricDepthModel, reader: BenchmarkReader, settings: FinetuneSettings,
                       device: torch.device, label: str = "") -> list[float]:
    """Fine-tune `model` in place on `reader` (its train split); returns the loss of every optimiser step.

    Call it inside a seeded context (`finetune_depth` does); the data order uses its own generator of
    `settings.seed`."""
    from versavit.train.optim import param_groups, warmup_cosine

    unit = model.backbone.patch_size * model.backbone.merge_size
    if settings.resolution % unit:
        raise ValueError(f"finetune-depth: resolution {settings.resolution} is not a multiple of {unit} "
                         f"({label or 'backbone'}: patch {model.backbone.patch_size} x merge "
                         f"{model.backbone.merge_size})")
    total = settings.total_steps(len(reader))
    groups = param_groups({"backbone": model.backbone.parameters(), "head": model.head.parameters()},
                          {"backbone": settings.lr_backbone, "head": settings.lr_head}, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=settings.betas, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, settings.warmup_ratio, "cosine"))
    generator = torch.Generator().manual_seed(settings.seed)
    size = (settings.resolution, settings.resolution)
    lo, hi = reader.min_depth, reader.max_depth
    losses: list[float] = []
    model.to(device).train()
    log.info("finetune-depth %s on %s/%s: %d samples, %d steps (batch %d, %d epochs%s) at %d px, lr %g / %g",
             label, reader.name, reader.split, len(reader), total, settings.batch_size, settings.epochs,
             f", capped at {settings.max_steps}" if settings.max_steps else "", settings.resolution,
             settings.lr_backbone, settings.lr_head)
    start = time.monotonic()
    epoch = 0
    while len(losses) < total:
        epoch += 1
        before = len(losses)
        prefetch = Prefetch(batches(_epoch_pairs(reader, settings, generator), settings.batch_size, _stack),
                            name="finetune-depth-data")
        try:
            for x, depth, valid in prefetch:
                x = x.to(device, non_blocking=True).float().div_(255)
                depth, valid = depth.to(device), valid.to(device)
                valid = valid & (depth > lo) & (depth < hi)
                pred = model(x, size)
                loss = sig_loss(pred, depth, valid, variance_focus=SILOG_VARIANCE_FOCUS)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], settings.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                step = len(losses)
                if step % settings.log_every == 0 or step == total:
                    rate = step * settings.batch_size / max(time.monotonic() - start, 1e-9)
                    log.info("finetune-depth %s %s: step %d/%d epoch %d loss %.4f lr %.3g/%.3g (%.1f samples/s)",
                             label, reader.name, step, total, epoch, losses[-1], optimizer.param_groups[0]["lr"],
                             scheduler.get_last_lr()[-1], rate)
                if step >= total:
                    break
        finally:
            prefetch.close()
        if len(losses) == before:
            raise ValueError(f"finetune-depth: {reader.name}/{reader.split} yielded no sample with depth")
    return losses


@torch.inference_mode()
def evaluate_metric_depth(model: MetricDepthModel, reader: BenchmarkReader, resolution: int, batch_size: int,
                          device: torch.device, examples: int = EXAMPLES) -> tuple[dict[str, float], dict[str, list]]:
    """AbsRel, delta1 and RMSE in metres of `model` on `reader` (no alignment; `MetricDepthScorer`), and the first
    `examples` (image, gt, valid, pred) for a figure."""
    model.to(device).eval()
    scorer = MetricDepthScorer(reader.min_depth, reader.max_depth)
    kept: dict[str, list[np.ndarray]] = {"image": [], "gt": [], "valid": [], "pred": []}
    pending: list[tuple[np.ndarray, dict[str, Any]]] = []
    size = (resolution, resolution)

    def run() -> None:
        x = torch.stack([image_tensor(image, size) for image, _ in pending]).to(device)
        preds = model(x, size).float().cpu()
        for (image, target), pred in zip(pending, preds, strict=True):
            gt, valid = np.asarray(target["depth"], np.float32), np.asarray(target["valid"], bool)
            scored = scorer.update(pred, gt, valid)
            if len(kept["pred"]) < examples:
                kept["image"].append(np.asarray(image))
                kept["gt"].append(gt)
                kept["valid"].append(np.asarray(scorer.valid(torch.from_numpy(gt), torch.from_numpy(valid))))
                kept["pred"].append(scored.numpy())
        pending.clear()

    for sample in reader:
        if "depth" in sample[1]:
            pending.append(sample)
            if len(pending) == batch_size:
                run()
    if pending:
        run()
    return scorer.compute(), kept


def finetune_depth(candidate: Candidate, benchmark: Benchmark, cfg: RunConfig,
                   device: torch.device | str | None = None, out_dir: Path | None = None) -> EvalResult:
    """Fine-tune `candidate`'s backbone + a DPT head on `benchmark.train` for metric depth, score `benchmark.eval`.

    Returns an EvalResult with metrics "absrel", "delta1" (fractions; shown in %) and "rmse" (metres), the curve
    "train_loss" (per optimiser step) and artifacts "examples" (first eval images, truths, valid masks and
    predictions in metres), "head" (export / fresh), "backbone_update" (relative L2 change of the backbone's
    trainable weights) and "settings". With `out_dir`, also writes `<out_dir>/<stem>.json` (everything but the
    arrays) and `<stem>.npz` (the examples); `load_result` reads them back."""
    train_reader = _check_benchmark(benchmark)
    settings = FinetuneSettings.from_config(cfg)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.monotonic()
    result = EvalResult(EVALUATOR, benchmark.name, candidate.name)
    # deterministic algorithms on CPU only: on a GPU they would cost speed for a 5-epoch fine-tune
    with deterministic(settings.seed, algorithms=device.type == "cpu"):
        model, origin = build_depth_model(candidate, cfg, benchmark.eval.max_depth, settings.seed)
        # a CPU copy of the starting weights (2.5 GB for a paper-size ViT) to report how far training moved them
        before = {n: p.detach().cpu().clone() for n, p in model.backbone.named_parameters() if p.requires_grad}
        losses = train_metric_depth(model, train_reader, settings, device, label=candidate.name)
        update = relative_change(before, model.backbone)
        del before
        metrics, examples = evaluate_metric_depth(model, benchmark.eval, settings.resolution, settings.batch_size,
                                                  device)
    for key, spec in METRIC_SPECS.items():
        result.add(key, metrics[key], spec)
    result.curves["train_loss"] = losses
    result.artifacts.update({"examples": examples, "head": origin, "backbone_update": update,
                             "settings": settings.as_dict(), "eval_images": metrics.get("images", 0)})
    result.notes.append(f"{candidate.name}: {'the export' if origin == 'export' else 'a fresh'} DPT head, "
                        f"{len(losses)} steps, final loss {losses[-1]:.4f}, backbone weights moved {update:.2e} "
                        "(relative L2)")
    result.elapsed_s = time.monotonic() - started
    log.info("finetune-depth %s on %s: AbsRel %.2f%% δ1 %.2f%% RMSE %.3f m (%d images, %.0f s)", candidate.name,
             benchmark.name, 100 * metrics["absrel"], 100 * metrics["delta1"], metrics["rmse"],
             metrics.get("images", 0), result.elapsed_s)
    if out_dir is not None:
        write_result(result, Path(out_dir))
    return result


# ------------------------------------------------------------------------------------------------
# results on disk (a fine-tune run as its own job hands its result back through these files)


def write_result(result: EvalResult, out_dir: Path) -> Path:
    """`<out_dir>/finetune-depth-<benchmark>-<backbone>.json` (metrics, curves, notes, settings) and `.npz` (the
    figure's examples); returns the JSON's path."""
    return common.write_result(result, out_dir, arrays=_EXAMPLE_ARRAYS)


def load_result(path: Path) -> EvalResult:
    """An EvalResult from what `write_result` wrote (examples included when the .npz is there)."""
    return common.load_result(path, arrays=_EXAMPLE_ARRAYS)


__all__: list[str] = ["METRIC_SPECS", "FinetuneSettings", "MetricDepthModel", "MetricDepthScorer",
                      "build_depth_model", "describe_protocol", "evaluate_metric_depth", "finetune_depth",
                      "load_result", "train_metric_depth", "write_result"]
