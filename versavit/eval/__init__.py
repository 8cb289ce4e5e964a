"""Evaluation of post-trained backbones, separate from training (DINOv2-style: one evaluator per module).

    features   frozen-backbone patch features, cached per (backbone, split, resolution)
    probe      linear probes: semantic segmentation (mIoU), depth (RMSE, AbsRel, delta1)
    zeroshot   zero-shot depth with the multi-task DPT head (scale-and-shift aligned AbsRel, delta1)
    refseg     referring segmentation with the multi-task head (cIoU, mIoU)
    metrics    the metrics themselves
    datasets   benchmark readers (synthetic world, ADE20k, VOC, Cityscapes, NYUv2, KITTI, RefCOCO/+/g)
    report     comparison tables (markdown + JSON) and figures
    run        `run_eval(cfg)` and `compare_backbones({...}, cfg)`: the stage, tracked in MLflow
"""

from __future__ import annotations

from typing import Any

__all__ = ["compare_backbones", "run_eval"]


def run_eval(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See versavit.eval.run.run_eval (imported lazily: the package import stays cheap)."""
    from versavit.eval.run import run_eval as impl

    return impl(*args, **kwargs)


def compare_backbones(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See versavit.eval.run.compare_backbones."""
    from versavit.eval.run import compare_backbones as impl

    return impl(*args, **kwargs)
