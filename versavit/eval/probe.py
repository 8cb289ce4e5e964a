"""Linear probes on frozen, cached backbone features (DINOv2 / DINOv3 linear protocol).

    semantic segmentation   BatchNorm2d(D) + 1x1 conv -> C logits per patch, bilinearly upsampled to the
                            label resolution; cross-entropy with ignore index; mIoU
    depth, "linear"         BatchNorm2d(D) + 1x1 conv -> 1 channel, depth = max_depth * sigmoid(.)
                            (DINOv2's regression output when scale_up is set)
    depth, "binned"         BatchNorm2d(D) + 1x1 conv -> n bins, depth = sum_i softmax_i * centre_i, centres
                            uniform in depth ("linear") or in log-depth ("log") over [min_depth, max_depth]
                            (DINOv2's classification head)
    depth loss              DINOv2's SigLoss: sqrt(Var(g) + 0.15 * mean(g)^2), g = log pred - log gt on valid
                            pixels; RMSE, AbsRel, delta1 after upsampling to the label resolution

Deterministic given the seed: head initialisation, batch order and the optimiser see only seeded generators
(the global RNG is left as it was), so two runs on the same cached features give identical weights.
Simplifications against the papers: no augmentation (features are cached), whole images resized to R x R
(no sliding window), no gradient-matching term in the depth loss.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from versavit.eval.features import FeatureSet
from versavit.eval.metrics import IGNORE_INDEX, DepthMeter, SegmentationMeter

EXAMPLES = 4  # validation predictions kept for the report's figures


@dataclass
class ProbeSettings:
    """The schedule shared by every backbone of one comparison (from `eval.probe` and `eval.seed`)."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 1e-4
    seed: int = 0
    depth_head: Literal["linear", "binned"] = "linear"
    depth_bins: int = 256
    depth_bins_space: Literal["linear", "log"] = "linear"
    device: str | None = None

    @classmethod
    def from_config(cls, eval_cfg: Any) -> ProbeSettings:
        """From `eval.probe` and `eval.seed`; weight decay and the depth bins keep the defaults above (the
        config has no keys for them)."""
        p = eval_cfg.probe
        return cls(epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=eval_cfg.seed, depth_head=p.depth_head)


@dataclass
class ProbeResult:
    task: str
    metrics: dict[str, Any]
    history: dict[str, list[float]]
    state: dict[str, torch.Tensor]
    examples: dict[str, np.ndarray] = field(default_factory=dict)


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv: [B, D, h, w] -> [B, C, h, w] logits."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class LinearDepthHead(nn.Module):
    """BatchNorm + 1x1 conv: [B, D, h, w] -> depth [B, h, w] in metres (regression or binned)."""

    def __init__(self, dim: int, min_depth: float, max_depth: float, mode: str = "linear", bins: int = 256,
                 bins_space: str = "linear") -> None:
        super().__init__()
        if mode not in ("linear", "binned"):
            raise ValueError(f"depth head must be 'linear' or 'binned', got {mode!r}")
        self.mode, self.max_depth = mode, float(max_depth)
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, 1 if mode == "linear" else bins, 1)
        if mode == "binned":
            if bins_space == "log":
                centres = torch.logspace(math.log10(min_depth), math.log10(max_depth), bins, dtype=torch.float64)
            elif bins_space == "linear":
                centres = torch.linspace(min_depth, max_depth, bins, dtype=torch.float64)
            else:
                raise ValueError(f"depth_bins_space must be 'linear' or 'log', got {bins_space!r}")
            self.register_buffer("centres", centres.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(self.bn(x))
        if self.mode == "linear":
            return self.max_depth * torch.sigmoid(out[:, 0])
        return torch.einsum("bkhw,k->bhw", out.softmax(1), self.centres)


def sig_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, variance_focus: float = 0.85,
             eps: float = 1e-6) -> torch.Tensor:
    """DINOv2's SigLoss (scale-invariant log error of Eigen et al.) over the valid pixels of a batch."""
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    if g.numel() == 0:
        return pred.sum() * 0.0
    dg = g.var(unbiased=False) + (1 - variance_focus) * g.mean() ** 2
    return torch.sqrt(dg.clamp_min(1e-12))


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[torch.Generator]:
    """Seeded, deterministic work that leaves the caller's RNG state and determinism flags as they were."""
    flag, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield torch.Generator().manual_seed(seed)
        finally:
            torch.use_deterministic_algorithms(flag, warn_only=warn)


def _batch(fs: FeatureSet, index: np.ndarray, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    order = np.sort(index)  # memory maps read fastest in file order; the batch's content is what matters
    x = torch.from_numpy(np.asarray(fs.features[order], dtype=np.float32)).to(device)
    targets = {k: torch.from_numpy(np.asarray(v[order])).to(device) for k, v in fs.targets.items()}
    return x, targets


def _fit(head: nn.Module, loss_fn: Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
         train: FeatureSet, settings: ProbeSettings, generator: torch.Generator, device: torch.device,
         label: str) -> dict[str, list[float]]:
    from versavit.progress import progress_bar

    n = len(train)
    if n < 2:
        raise ValueError(f"a linear probe needs at least 2 training samples, got {n}")
    # a last batch of one sample is dropped (BatchNorm needs two); which one is left out depends on the seed
    per_epoch = n // settings.batch_size + (1 if n % settings.batch_size >= 2 else 0)
    total = per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    # cosine decay to 0 over the whole schedule: the same for every backbone of a comparison
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    history: dict[str, list[float]] = {"step_loss": [], "epoch_loss": []}
    head.train()
    with progress_bar() as bar:
        task = bar.add_task(f"probe {label}", total=total)
        for epoch in range(settings.epochs):
            perm = torch.randperm(n, generator=generator).numpy()
            losses = []
            for b in range(per_epoch):
                index = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
                x, targets = _batch(train, index, device)
                loss = loss_fn(head, x, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                history["step_loss"].append(losses[-1])
                bar.update(task, advance=1, description=f"probe {label} epoch {epoch + 1} loss {losses[-1]:.3f}")
            history["epoch_loss"].append(float(np.mean(losses)) if losses else float("nan"))
    return history


def _device(settings: ProbeSettings) -> torch.device:
    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _state(head: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}


def train_seg_probe(train: FeatureSet, val: FeatureSet, num_classes: int, settings: ProbeSettings,
                    ignore_index: int = IGNORE_INDEX, label: str = "seg") -> ProbeResult:
    """Fit the linear segmentation probe on `train`, report mIoU (and pixel accuracy) on `val`."""
    for fs in (train, val):
        if "seg" not in fs.targets:
            raise ValueError("the segmentation probe needs seg targets in the feature set")
    device = _device(settings)
    dim = train.features.shape[1]

    def loss_fn(head: nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        seg = t["seg"].long()
        logits = F.interpolate(head(x), size=seg.shape[-2:], mode="bilinear", align_corners=False)
        if not bool((seg != ignore_index).any()):
            return logits.sum() * 0.0
        return F.cross_entropy(logits, seg, ignore_index=ignore_index)

    with _deterministic(settings.seed) as gen:
        head = LinearSegHead(dim, num_classes).to(device)
        history = _fit(head, loss_fn, train, settings, gen, device, label)
    head.eval()
    meter = SegmentationMeter(num_classes, ignore_index)
    examples: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(val), settings.batch_size):
            x, t = _batch(val, np.arange(start, min(start + settings.batch_size, len(val))), device)
            seg = t["seg"].long()
            pred = F.interpolate(head(x), size=seg.shape[-2:], mode="bilinear", align_corners=False).argmax(1)
            meter.update(pred.cpu(), seg.cpu())
            examples += [p.numpy().astype(np.uint8) for p in pred.cpu()][: EXAMPLES - len(examples)]
    return ProbeResult("seg", meter.compute(), history, _state(head), {"pred": np.stack(examples)})


def train_depth_probe(train: FeatureSet, val: FeatureSet, min_depth: float, max_depth: float,
                      settings: ProbeSettings, label: str = "depth") -> ProbeResult:
    """Fit the linear (or binned) depth probe on `train`, report RMSE, AbsRel and delta1 on `val`."""
    for fs in (train, val):
        if "depth" not in fs.targets:
            raise ValueError("the depth probe needs depth targets in the feature set")
    device = _device(settings)
    dim = train.features.shape[1]

    def predict(head: nn.Module, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(head(x)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]

    def loss_fn(head: nn.Module, x: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        valid = t["valid"] & (t["depth"] > min_depth) & (t["depth"] < max_depth)
        return sig_loss(predict(head, x, tuple(t["depth"].shape[-2:])), t["depth"], valid)

    with _deterministic(settings.seed) as gen:
        head = LinearDepthHead(dim, min_depth, max_depth, settings.depth_head, settings.depth_bins,
                               settings.depth_bins_space).to(device)
        history = _fit(head, loss_fn, train, settings, gen, device, label)
    head.eval()
    meter = DepthMeter()
    examples: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(val), settings.batch_size):
            x, t = _batch(val, np.arange(start, min(start + settings.batch_size, len(val))), device)
            pred = predict(head, x, tuple(t["depth"].shape[-2:])).clamp(min_depth, max_depth).cpu()
            valid = (t["valid"] & (t["depth"] > min_depth) & (t["depth"] < max_depth)).cpu()
            meter.update(pred, t["depth"].cpu(), valid)
            examples += [p.numpy() for p in pred][: EXAMPLES - len(examples)]
    return ProbeResult("depth", meter.compute(), history, _state(head), {"pred": np.stack(examples)})
