"""The paper's numbers (../shared/RECIPE.md, "Evaluation"), shown as reference rows under the report's tables.

PAPER[(evaluator, benchmark, metric)] = {row: value}, values in display units (%, metres) as the paper prints
them; rows "Qwen2-VL ViT (paper)" (the baseline backbone) and "VersaViT (paper)". Metric "*" stands for the
evaluator's first report column (its headline: correspondence recall, DA-2K accuracy).
"""

from __future__ import annotations

BASE, OURS = "Qwen2-VL ViT (paper)", "VersaViT (paper)"

PAPER: dict[tuple[str, str, str], dict[str, float]] = {
    # Table 3: linear probes at 560 px; Table 14: at 448 px
    ("linear-probe", "ade20k", "seg_miou"): {BASE: 33.6, OURS: 49.6},
    ("linear-probe", "cityscapes", "seg_miou"): {BASE: 57.6, OURS: 74.5},
    ("linear-probe", "voc", "seg_miou"): {BASE: 67.5, OURS: 86.6},
    ("linear-probe", "ade20k", "seg_miou_448px"): {BASE: 31.4, OURS: 42.3},
    ("linear-probe", "cityscapes", "seg_miou_448px"): {BASE: 55.5, OURS: 66.7},
    ("linear-probe", "voc", "seg_miou_448px"): {BASE: 67.5, OURS: 81.0},
    ("linear-probe", "nyu", "depth_rmse"): {BASE: 0.541, OURS: 0.473},
    ("linear-probe", "kitti", "depth_rmse"): {BASE: 3.735, OURS: 3.136},
    # Table 9: zero-shot relative depth with the multi-task DPT head, DA-2K, fine-tuned depth
    ("zero-shot-depth", "kitti", "absrel"): {OURS: 9.4},
    ("zero-shot-depth", "kitti", "delta1"): {OURS: 90.5},
    ("zero-shot-depth", "nyu", "absrel"): {OURS: 7.7},
    ("zero-shot-depth", "nyu", "delta1"): {OURS: 94.4},
    ("da2k", "da2k", "*"): {OURS: 91.3},
    ("finetune-depth", "kitti", "absrel"): {OURS: 7.1},
    ("finetune-depth", "kitti", "delta1"): {OURS: 94.5},
    ("finetune-depth", "nyu", "absrel"): {OURS: 5.3},
    ("finetune-depth", "nyu", "delta1"): {OURS: 96.9},
    # Table 10: referring segmentation after the LoRA fine-tune
    ("refseg-finetune", "refcoco", "ciou"): {OURS: 78.8},
    ("refseg-finetune", "refcoco-testA", "ciou"): {OURS: 81.2},
    ("refseg-finetune", "refcoco-testB", "ciou"): {OURS: 76.2},
    # Table 8: 3D correspondence, Probe3D protocol
    ("correspondence", "navi", "*"): {BASE: 39.27, OURS: 41.64},
    ("correspondence", "spair", "*"): {BASE: 17.05, OURS: 26.99},
    # Table 11: COCO retrieval, R@1 (projection only; * backbone trained)
    ("retrieval", "coco-karpathy", "t2i_r1"): {OURS: 46.9},
    ("retrieval", "coco-karpathy", "i2t_r1"): {OURS: 60.5},
    ("retrieval", "coco-karpathy", "t2i_r1_bb"): {OURS: 54.8},
    ("retrieval", "coco-karpathy", "i2t_r1_bb"): {OURS: 69.5},
    # Table 2: the 8 OpenCompass VQA benchmarks (VLMEvalKit), frozen ViT + projector + Qwen3-8B (paper's
    # seeds/001: Qwen2-VL-ViT row, VersaViT row; average 64.8 -> 66.4)
    ("vqa", "opencompass", "average"): {BASE: 64.8, OURS: 66.4},
    **{("vqa", bench, "accuracy"): {BASE: base, OURS: ours} for bench, base, ours in (
        ("mmbench", 78.2, 78.0), ("mmstar", 59.3, 60.9), ("mmmu", 51.0, 53.1), ("mathvista", 62.1, 63.7),
        ("hallusionbench", 49.0, 51.3), ("ai2d", 79.4, 79.1), ("ocrbench", 80.6, 82.2), ("mmvet", 58.7, 62.6))},
}


def paper_value(evaluator: str, benchmark: str, metric: str, headline: str) -> dict[str, float]:
    """The paper's rows for one report column ({} when the paper has no number for it)."""
    found = PAPER.get((evaluator, benchmark, metric))
    if found is None and metric == headline:
        found = PAPER.get((evaluator, benchmark, "*"))
    return dict(found or {})
