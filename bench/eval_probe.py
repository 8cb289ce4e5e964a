"""Linear-probe cost: feature extraction once vs. reading the cache, and probe training on cached features.

The point of caching (versavit.eval.features): a probe's epochs, and a second probe on the same split, read
float16 features from a memory map instead of running the frozen backbone again. Reports images/s of the
backbone pass, the time to reopen the cache, and probe optimiser steps/s (seg and depth heads).

    python bench/eval_probe.py [--images 64] [--resolution 224] [--embed-dim 64 --depth 4] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from versavit.config.schema import BackboneConfig, SyntheticConfig
from versavit.data.build import build_synthetic
from versavit.eval.datasets import SyntheticWorld
from versavit.eval.features import cached_features
from versavit.eval.probe import ProbeSettings, train_depth_probe, train_seg_probe
from versavit.models.backbone import VisionBackbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_synthetic(tmp, SyntheticConfig(num_train=args.images, num_val=max(2, args.images // 4),
                                             image_size=args.resolution, samples_per_shard=64))
        torch.manual_seed(0)
        backbone = VisionBackbone.build(BackboneConfig(embed_dim=args.embed_dim, depth=args.depth, num_heads=4,
                                                       mlp_ratio=2.0, gradient_checkpointing=False))
        reader, val_reader = SyntheticWorld(f"{tmp}/train"), SyntheticWorld(f"{tmp}/val")
        cache = Path(tmp) / "cache"
        t0 = time.perf_counter()
        train = cached_features(backbone, reader, args.resolution, cache)
        t1 = time.perf_counter()
        cached_features(backbone, reader, args.resolution, cache)
        t2 = time.perf_counter()
        val = cached_features(backbone, val_reader, args.resolution, cache)
        settings = ProbeSettings(epochs=args.epochs, batch_size=16, lr=1e-2)
        t3 = time.perf_counter()
        seg = train_seg_probe(train, val, reader.num_classes, settings)
        t4 = time.perf_counter()
        depth = train_depth_probe(train, val, reader.min_depth, reader.max_depth, settings)
        t5 = time.perf_counter()
    steps = len(seg.history["step_loss"])
    print(f"extract {args.images} images at {args.resolution}px: {t1 - t0:.2f} s ({args.images / (t1 - t0):.1f} img/s)")
    print(f"reopen the cache: {(t2 - t1) * 1e3:.1f} ms ({(t1 - t0) / max(t2 - t1, 1e-9):.0f}x faster than extracting)")
    print(f"seg probe: {steps} steps in {t4 - t3:.2f} s ({steps / (t4 - t3):.1f} steps/s), "
          f"mIoU {seg.metrics['miou']:.3f}")
    print(f"depth probe: {steps} steps in {t5 - t4:.2f} s ({steps / (t5 - t4):.1f} steps/s), "
          f"RMSE {depth.metrics['rmse']:.3f} m")


if __name__ == "__main__":
    main()
